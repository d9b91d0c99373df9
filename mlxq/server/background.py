"""Listening sockets, and a ``Server`` run on a free loopback port in a background thread
(tests, benchmarks)."""

import contextlib
import socket
import threading
import time

import uvicorn


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one); OSError if it cannot be.
    Bound here rather than by uvicorn so a taken port is one clear error, before loading."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def running(server, host: str = "127.0.0.1", startup_timeout: float = 60.0):
    """Yields the base URL (``http://127.0.0.1:PORT``); shuts the server down on exit."""
    sock = bind_socket(host, 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(server.app, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=5)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()
