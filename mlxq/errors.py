"""User-facing errors and the command-line wrapper that turns them into one line."""

import functools
import sys


class MlxqError(Exception):
    """An error caused by the user's input or environment.

    Command-line entry points print its message as a single line on stderr and exit
    non-zero, without a traceback. Raise it with a message that says what is wrong and,
    where possible, how to fix it.
    """


def _program_name(module: str) -> str:
    """``mlxq.generate`` also when run as ``python -m mlxq.generate`` (module ``__main__``)."""
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else "mlxq"
    # A package run with -m (python -m mlxq.server) is named by the package.
    return module.removesuffix(".__main__")


def cli_main(func):
    """Decorate a `main(argv=None)` so bad input ends in one stderr line and exit code 2."""

    @functools.wraps(func)
    def wrapper(argv=None):
        prog = _program_name(func.__module__)
        try:
            return func(argv)
        except MlxqError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            return 1

    return wrapper
