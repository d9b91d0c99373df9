"""Model definitions and the registry that maps config.json's model_type to them.

mlxq defines the Llama family itself; every other model_type mlx-lm knows is built from
mlx-lm's definition, routed through mlxq's KV caches (mlxq/mlx_lm_bridge.py)."""

import importlib

from ..errors import MlxqError

# model_type -> module in this package. SmolLM / SmolLM2 checkpoints say "llama";
# "smollm" is accepted as an alias for hand-written configs.
_MODULES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "smollm": "llama",
}

SUPPORTED_MODEL_TYPES = tuple(_MODULES)


def get_model_module(model_type):
    if model_type not in _MODULES:
        raise MlxqError(
            f"unsupported model_type {model_type!r}; supported: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    return importlib.import_module(f".{_MODULES[model_type]}", __name__)


def get_model_class(model_type):
    """The ``Model`` class for a config.json ``model_type``; MlxqError if unsupported."""
    return get_model_module(model_type).Model


def get_classes(model_type):
    """``(Model, ModelArgs)`` for a ``model_type``, like mlx-lm's ``_get_classes``."""
    module = get_model_module(model_type)
    return module.Model, module.ModelArgs


def build_model(config: dict):
    """An (unquantized, randomly initialised) model for a config.json dict: mlxq's own
    definition if it has one, else mlx-lm's (MlxqError if neither knows the type)."""
    if config.get("model_type") not in _MODULES:
        from ..mlx_lm_bridge import build

        return build(config)
    model_cls, args_cls = get_classes(config.get("model_type"))
    try:
        args = args_cls.from_dict(config)
    except TypeError as e:
        raise MlxqError(f"config.json is missing model settings: {e}") from None
    return model_cls(args)
