"""Read Metal kernel sources from metal/ (in a checkout) or mlxq/metal (in the wheel)."""

import functools
from importlib import resources
from pathlib import Path

_CHECKOUT_DIR = Path(__file__).resolve().parent.parent / "metal"


@functools.lru_cache(maxsize=None)
def read_kernel_source(filename: str) -> str:
    """The text of ``metal/<filename>``."""
    try:
        return resources.files("mlxq.metal").joinpath(filename).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return (_CHECKOUT_DIR / filename).read_text()
