"""Llama 2 / 3 (incl. Llama-3 and linear RoPE scaling) and SmolLM / SmolLM2."""

from dataclasses import dataclass

from .transformer import Model, TransformerArgs

__all__ = ["Model", "ModelArgs"]


@dataclass
class ModelArgs(TransformerArgs):
    pass
