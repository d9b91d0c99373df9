"""Qwen3 (dense): RMSNorm over each query/key head before RoPE."""

from dataclasses import dataclass

from .qwen2 import QwenArgs
from .transformer import Model

__all__ = ["Model", "ModelArgs"]


@dataclass
class ModelArgs(QwenArgs):
    @property
    def qk_norm(self) -> bool:
        return True
