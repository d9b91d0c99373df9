"""Everything mlxq writes goes through here, checked first and written atomically.

Files (evaluate's JSON, the benchmarks' JSON and PNG) and folders (convert's output, the
default model's first-use conversion) are checked before any work starts, so a long run
does not fail at its end, then written to a temporary sibling that is renamed into place
only once complete. On any failure, Ctrl-C or SIGTERM the temporary sibling and any parent
folders created for it are removed. An existing output is replaced only with ``--force``,
and a folder only if mlxq wrote it (it holds ``MARKER``) or it is empty.
"""

import contextlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from .errors import MlxqError, sigterm_raises

MARKER = ".mlxq-output"  # in every folder mlxq writes: what --force may replace


def check_output_file(path, force: bool) -> Path:
    """``path`` as a Path, or one clear MlxqError if it cannot or may not be written."""
    path = Path(path)
    if not str(path).strip():
        raise MlxqError("the output path is empty")
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


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_folder(path, force: bool, source=None, flag: str = "--mlx-path") -> Path:
    """The output folder, or one clear MlxqError before any work: an empty path, a folder
    that exists (without ``force``), something ``force`` must not replace (a file, a folder
    mlxq did not write), a ``source`` inside it, or an uncreatable location."""
    if not str(path).strip():
        raise MlxqError(f"{flag} is empty; give the folder to write")
    out = Path(str(path)).expanduser()
    if out.is_symlink() and not out.exists():
        raise MlxqError(f"{flag} {out} is a broken symbolic link; remove it or choose another folder")
    if source is not None:
        src = Path(str(source)).expanduser()
        if src.exists() and _inside(src.resolve(), out.resolve()):
            raise MlxqError(f"the source {source} is inside {flag} {out}, which would be "
                            "replaced; choose another output folder")
    if out.exists():
        if not out.is_dir():
            raise MlxqError(f"{flag} {out} is a file; choose a folder path")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise MlxqError(f"{flag} {out} already exists and was not written by mlxq; "
                            "choose another folder (--force only replaces mlxq's own output)")
        if not force:
            raise MlxqError(f"{out} already exists; pass --force to replace it")
    check_creatable(out)
    return out


@contextlib.contextmanager
def _signals_deferred():
    """Ctrl-C / SIGTERM held back for a few renames, so they happen all or not at all."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return the created ones, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir(exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for f in folders:  # deepest first; a folder someone else filled meanwhile stays
        try:
            f.rmdir()
        except OSError:
            break


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def writing_folder(path, force: bool = False, written_by: str = "mlxq"):
    """Yields a temporary sibling folder of ``path`` to fill. When the block completes it
    is marked as mlxq's and renamed onto ``path`` (replacing an earlier mlxq output there
    only with ``force``; through a symbolic link, the folder it points to is replaced and
    the link kept). On any exception, Ctrl-C or SIGTERM it is removed, with any parent
    folders created for it. Call ``check_output_folder`` first."""
    out = Path(path).expanduser()
    if out.is_symlink():
        out = out.resolve()
    created = _make_parents(out.parent)
    tmp = None
    try:
        with sigterm_raises():
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs are not
            yield tmp
            (tmp / MARKER).write_text(json.dumps({"written_by": written_by}) + "\n")
            with _signals_deferred():
                _publish(tmp, out, force)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _publish(tmp: Path, out: Path, force: bool):
    """Rename the finished folder into place; with force, replace what is there."""
    if out.exists() and force:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError:
        # Someone else finished the same folder first (rename onto a non-empty folder fails).
        raise MlxqError(f"{out} was written by another process meanwhile; pass --force to "
                        "replace it") from None


@contextlib.contextmanager
def replacing(*paths):
    """Yields a temporary path next to each of ``paths`` (same suffix; one path: the path
    itself, several: a list) to write. They replace ``paths`` together, only when the
    block completes; if it fails or is interrupted they are removed, with any parent
    folders created for them, and every target is left as it was."""
    paths = [Path(p) for p in paths]
    created, tmps = [], []
    try:
        with sigterm_raises():
            for path in paths:
                created += _make_parents(path.parent)
                fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                            suffix=path.suffix)
                os.close(fd)
                tmps.append(Path(name))
            yield tmps[0] if len(tmps) == 1 else list(tmps)
            with _signals_deferred():
                for tmp, path in zip(tmps, paths):
                    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
                    os.replace(tmp, path)
                tmps = []
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        _remove_empty(sorted(set(created), key=lambda f: -len(f.parts)))
        raise


def write_text_file(path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
