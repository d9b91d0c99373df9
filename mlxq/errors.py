"""User-facing errors and the command-line wrapper that turns them into one line."""

import argparse
import contextlib
import functools
import os
import signal
import sys
import threading


class MlxqError(Exception):
    """An error caused by the user's input or environment.

    Command-line entry points print its message as a single line on stderr and exit
    non-zero, without a traceback. Raise it with a message that says what is wrong and,
    where possible, how to fix it.
    """


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that cleanup (``finally``) blocks run and
    no half-written output is left behind."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises ``Terminated`` instead of killing the process at
    once. Only where SIGTERM still has its default action and only in the main thread
    (the one place Python delivers signals): a program's own handler is left alone."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors raised as MlxqError: one line through ``cli_main``
    instead of argparse's usage block (``--help`` still prints the full usage)."""

    def error(self, message):
        raise MlxqError(message)


def _program_name(module: str) -> str:
    """``mlxq.generate`` also when run as ``python -m mlxq.generate`` (module ``__main__``);
    a script's file name when run as ``python benchmarks/x.py``."""
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is None:
            return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mlxq"
        module = spec.name
    # A package run with -m (python -m mlxq.server) is named by the package.
    return module.removesuffix(".__main__")


def cli_main(func):
    """Decorate a `main(argv=None)` so bad input ends in one stderr line and exit code 2;
    Ctrl-C (130) and SIGTERM (143) end in one line after the command's cleanup ran."""

    @functools.wraps(func)
    def wrapper(argv=None):
        prog = _program_name(func.__module__)
        try:
            with sigterm_raises():
                return func(argv)
        except MlxqError as e:
            # One line, even when a message quotes a multi-line library error.
            print(f"{prog}: error: " + " ".join(str(e).split()), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Terminated:
            print(f"{prog}: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        except BrokenPipeError:
            return 1
        except OSError as e:  # the environment's (disk full, permissions): the user's to fix
            where = f"{e.filename}: " if e.filename else ""
            print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
            return 2

    return wrapper
