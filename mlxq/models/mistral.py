"""Mistral: the Llama architecture (sliding-window configs run with full attention)."""

from dataclasses import dataclass

from .transformer import Model, TransformerArgs

__all__ = ["Model", "ModelArgs"]


@dataclass
class ModelArgs(TransformerArgs):
    pass
