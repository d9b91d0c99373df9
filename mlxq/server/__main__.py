"""``python -m mlxq.server``: serve one model over OpenAI-compatible HTTP endpoints.

Flags are named as mlx_lm.server's where they overlap; the --kv-* flags are
``mlxq.generate``'s.
"""

import argparse
import ipaddress
import os
import re
import sys

from ..errors import ArgumentParser, MlxqError, cli_main
from ..generate import add_kv_args, check_kv_args, kv_options_from_args
from . import (
    DEFAULT_DECODE_CONCURRENCY,
    DEFAULT_KV_MEMORY_FRACTION,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PORT,
    DEFAULT_PROMPT_CACHE_SIZE,
)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def parse_bytes(text: str) -> int:
    """``"2GB"``, ``"512MiB"``, ``"1000000"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 4GB or 512MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def machine_memory() -> int | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mlxq.server",
                                description="OpenAI-compatible HTTP server for an mlxq model.")
    p.add_argument("--model", help="model folder or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="completion tokens when a request does not say (default: %(default)s)")
    p.add_argument("--decode-concurrency", type=int, default=DEFAULT_DECODE_CONCURRENCY,
                   help="most requests generating at once (default: %(default)s)")
    p.add_argument("--max-kv-memory", type=parse_bytes, default=None, metavar="SIZE",
                   help="KV-cache memory for running requests and the prefix cache, e.g. "
                        f"4GB (default: {DEFAULT_KV_MEMORY_FRACTION:.0%} of the machine's "
                        "memory); a request that does not fit waits")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests that may wait for memory; beyond: HTTP 503 with "
                        "Retry-After (default: %(default)s)")
    p.add_argument("--prompt-cache-size", type=int, default=DEFAULT_PROMPT_CACHE_SIZE,
                   help="most cached conversations kept for prefix reuse; 0 disables "
                        "(default: %(default)s)")
    p.add_argument("--prompt-cache-bytes", type=parse_bytes, default=None, metavar="SIZE",
                   help="most bytes the prefix cache holds (default: a quarter of "
                        "--max-kv-memory)")
    p.add_argument("--prefill-step-size", type=int, default=512,
                   help="prompt tokens per prefill chunk; running streams wait at most one "
                        "chunk per token (default: %(default)s)")
    add_kv_args(p)
    p.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"))
    return p


def _check(args) -> None:
    check_kv_args(args)
    for flag, value, low in (("--port", args.port, 0), ("--max-tokens", args.max_tokens, 1),
                             ("--decode-concurrency", args.decode_concurrency, 1),
                             ("--max-waiting", args.max_waiting, 0),
                             ("--prompt-cache-size", args.prompt_cache_size, 0),
                             ("--prefill-step-size", args.prefill_step_size, 1)):
        if value < low:
            raise MlxqError(f"{flag} must be at least {low}, got {value}")
    if args.port > 65535:
        raise MlxqError(f"--port must be at most 65535, got {args.port}")
    if args.max_kv_memory is not None and args.max_kv_memory < 1:
        raise MlxqError("--max-kv-memory must be more than 0 bytes")


@cli_main
def main(argv=None):
    args = _parser().parse_args(argv)
    _check(args)
    import uvicorn

    from ..loading import load_for_cli
    from . import create_server
    from .background import bind_socket

    max_kv = args.max_kv_memory
    if max_kv is None:
        total = machine_memory()
        if total is None:
            raise MlxqError("cannot read this machine's memory size; give --max-kv-memory")
        max_kv = int(total * DEFAULT_KV_MEMORY_FRACTION)
    try:
        sock = bind_socket(args.host, args.port)  # a taken port fails before loading
    except OSError as e:
        raise MlxqError(f"cannot listen on {args.host}:{args.port}: "
                        f"{e.strerror or e}") from None
    model, tokenizer = load_for_cli(args.model)
    model_id = args.model or "SmolLM2-135M-Instruct"
    server = create_server(
        model, tokenizer, model_id, kv_options=kv_options_from_args(args),
        max_kv_bytes=max_kv, prompt_cache_bytes=args.prompt_cache_bytes,
        prompt_cache_size=args.prompt_cache_size, decode_concurrency=args.decode_concurrency,
        max_tokens=args.max_tokens, max_waiting=args.max_waiting,
        prefill_step_size=args.prefill_step_size, aliases=("default",),
    )
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"mlxq.server: warning: listening on {args.host}: reachable from other "
              "machines, with no authentication", file=sys.stderr)
    port = sock.getsockname()[1]
    print(f"mlxq.server: serving {model_id} (KV {args.kv_bits}-bit, at most "
          f"{max_kv / 1e9:.2f} GB) on http://{args.host}:{port}/v1", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(server.app, log_level=args.log_level, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _exit_without_teardown(code: int) -> None:
    """Leave the process once ``main`` is done: the scheduler thread has been joined and
    the requests answered by then. The interpreter's own teardown is skipped because,
    after a server has generated, it intermittently aborts in a native library's static
    destructors ("terminate called without an active exception", exit -6, with any KV
    cache; seen in ~1 of 4 Ctrl-C exits on Linux, root cause not found)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_without_teardown(main())
