"""Qwen2 / Qwen2.5: biases on the q/k/v projections (not on o_proj)."""

from dataclasses import dataclass

from .transformer import Model, TransformerArgs

__all__ = ["Model", "ModelArgs"]


@dataclass
class QwenArgs(TransformerArgs):
    """Defaults shared by the Qwen families (Qwen3 builds on these too)."""

    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0


@dataclass
class ModelArgs(QwenArgs):
    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def o_bias(self) -> bool:
        return False
