"""Output files of the command-line tools (evaluate's JSON, the benchmarks' JSON and PNG).

Checked before any work starts, so a long run does not fail at its end, and written whole:
to a temporary file next to the target, renamed onto it only once complete. An existing
file is replaced only with ``--force``.
"""

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import MlxqError


def check_output_file(path, force: bool) -> Path:
    """``path`` as a Path, or one clear MlxqError if it cannot or may not be written."""
    path = Path(path)
    if path.is_dir():
        raise MlxqError(f"{path} is a folder; give a file path")
    if path.exists() and not force:
        raise MlxqError(f"{path} already exists; use --force to overwrite it")
    check_creatable(path)
    return path


def check_creatable(path: Path) -> None:
    """The nearest existing folder above ``path`` must be a writable folder (missing ones
    are created on write); else one clear MlxqError."""
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise MlxqError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK):
        raise MlxqError(f"cannot write {path}: {folder} is not writable")


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary path next to ``path`` (same suffix) to write; it replaces
    ``path`` only when the block completes, and is removed if the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_file(path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)
