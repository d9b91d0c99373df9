"""Qwen3 (dense): RMSNorm over each query/key head before RoPE."""

from dataclasses import dataclass

from .transformer import Model, TransformerArgs

__all__ = ["Model", "ModelArgs"]


@dataclass
class ModelArgs(TransformerArgs):
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0

    @property
    def qk_norm(self) -> bool:
        return True
