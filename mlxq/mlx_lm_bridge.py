"""mlx-lm's model definitions running on mlxq's KV caches (every mlx-lm text architecture).

mlxq defines the Llama family itself (mlxq/models). For any other ``model_type`` it builds
mlx-lm's own model class, and this module routes that model's attention through mlxq's
caches:

- mlx-lm attention layers call ``keys, values = cache.update_and_fetch(k, v)`` and then
  ``scaled_dot_product_attention(q, keys, values, cache=cache, scale=..., mask=..., sinks=...)``,
  a name each model module imports from ``mlx_lm.models.base``. ``_route_attention`` points
  that name at ``_attention``, which hands every cache that is not one of ours to mlx-lm's
  own function unchanged (so mlx-lm's tools keep working on the same classes).
- The model's ``__call__`` wraps each mlxq cache in a ``LayerCache`` view that speaks
  mlx-lm's cache protocol. For a quantized cache, ``update_and_fetch`` only holds the new
  keys/values and the attention call ends in ``mlxq.attention.attend``, which stores them
  and runs mlxq's fused kernel (learned attention sinks, gpt_oss, included). A
  full-precision cache stores them at once and attends with MLX's SDPA under the model's
  own mask and sinks: exactly mlx-lm's KVCache semantics.
- ``place_kv_caches`` (``mlxq.cache.make_cache`` calls it) gives layers whose mlx-lm cache
  is a ``RotatingKVCache`` (sliding windows: Gemma 3 five layers of six, GPT-OSS every
  other) a ``WindowKVCache`` (window_cache.py) bounded by the window, and refuses the
  quantized cache, in one error that says why, for layers it cannot serve: recurrent state
  (SSM / linear attention), multi-head latent attention.

mlx-lm's internal layout is what this relies on, hence the pinned versions (pyproject.toml).
"""

import sys

import mlx.core as mx

from .errors import MlxqError

# The mlx-lm releases this module was tested with (pyproject.toml pins the same range).
SUPPORTED_MLX_LM = (">=0.32.2", "<0.33")


def _mlx_lm_version() -> str:
    from importlib.metadata import version

    return version("mlx-lm")


# --- building mlx-lm's model classes ----------------------------------------------------

_BRIDGED = {}  # mlx-lm Model class -> its bridged subclass


def model_classes(config: dict):
    """``(Model, ModelArgs)`` of mlx-lm for ``config``, the model routed through mlxq's
    caches; MlxqError if mlx-lm does not know the architecture."""
    from mlx_lm.utils import _get_classes

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or config.get("model_file"):
        raise MlxqError(f"config.json model_type {model_type!r} is not a known architecture")
    try:
        model_cls, args_cls = _get_classes(config)
    except (ValueError, ImportError):
        raise MlxqError(
            f"model_type {model_type!r} is not known to mlxq or to mlx-lm {_mlx_lm_version()}"
        ) from None
    _route_attention()
    return _bridged(model_cls), args_cls


def build(config: dict):
    """An mlx-lm model (random weights) for ``config``, routed through mlxq's caches."""
    model_cls, args_cls = model_classes(config)
    try:
        return model_cls(args_cls.from_dict(config))
    except (TypeError, KeyError, ValueError, AssertionError, AttributeError, IndexError,
            ZeroDivisionError) as e:
        raise MlxqError(
            f"config.json does not describe a valid {config['model_type']} model: "
            f"{type(e).__name__}: {e}"
        ) from None


def _bridged(model_cls):
    if model_cls not in _BRIDGED:
        def __call__(self, inputs, cache=None, **kwargs):
            if cache is None:
                return model_cls.__call__(self, inputs, cache=None, **kwargs)
            views = layer_views(cache)
            out = model_cls.__call__(self, inputs, cache=views, **kwargs)
            if any(isinstance(v, LayerCache) and v._new is not None for v in views):
                # Keys handed to a quantized cache were never attended through it.
                raise MlxqError(f"{_model_type(self)} cannot use the quantized KV cache: "
                                f"{OWN_ATTENTION_REASON}; use kv_bits=16")
            return out

        _BRIDGED[model_cls] = type(model_cls.__name__, (model_cls,), {
            "__call__": __call__,
            "place_kv_caches": place_kv_caches,
            "head_dim": property(_head_dim),
            "__doc__": f"mlx-lm's {model_cls.__module__}.Model on mlxq's KV caches.",
        })
    return _BRIDGED[model_cls]


def _head_dim(model):
    """Keys' head size, for the quantized cache's layout and rotation (None if unknown)."""
    args = getattr(model, "args", None)
    head_dim = getattr(args, "head_dim", None)
    if not isinstance(head_dim, int):
        hidden, heads = getattr(args, "hidden_size", None), getattr(args, "num_attention_heads", None)
        head_dim = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else None
    return head_dim


_ORIGINAL = None


def _route_attention():
    """Point every loaded mlx-lm model module's ``scaled_dot_product_attention`` at
    ``_attention`` (idempotent; caches that are not mlxq's take mlx-lm's path unchanged)."""
    global _ORIGINAL
    from mlx_lm.models import base

    if _ORIGINAL is None:
        _ORIGINAL = base.scaled_dot_product_attention
    for name, module in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and \
                getattr(module, "scaled_dot_product_attention", None) is _ORIGINAL:
            module.scaled_dot_product_attention = _attention


def _attention(queries, keys, values, cache, scale, mask, sinks=None):
    if isinstance(cache, LayerCache):
        return cache.attend(queries, keys, values, scale, mask, sinks)
    return _ORIGINAL(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


# --- the per-call view of an mlxq cache -------------------------------------------------

def _is_full_precision(cache) -> bool:
    from .cache import KVCache

    return isinstance(cache, KVCache)


def _is_mlxq_cache(cache) -> bool:
    from .cache import KVCache
    from .quantized_cache import QuantizedKVCache

    return isinstance(cache, (KVCache, QuantizedKVCache))


class LayerCache:
    """One layer's mlxq cache seen through mlx-lm's cache protocol, for one model call."""

    def __init__(self, cache, causal_masks: list):
        self.cache = cache
        self._causal_masks = causal_masks  # array masks make_mask built (plain causal)
        self._new = None

    @property
    def offset(self):
        return self.cache.offset

    def make_mask(self, N, return_array=False, window_size=None):
        from mlx_lm.models.cache import create_attention_mask

        mask = create_attention_mask(N, self.offset, return_array, window_size)
        if isinstance(mask, mx.array) and window_size is None:
            self._causal_masks.append(mask)
        return mask

    def update_and_fetch(self, keys, values):
        if _is_full_precision(self.cache):
            return self.cache.update_and_fetch(keys, values)
        # Quantized: attend() stores them (quantizing) when the attention call comes.
        self._new = (keys, values)
        return keys, values

    def _causal(self, mask) -> bool:
        return mask is None or isinstance(mask, str) or any(m is mask for m in self._causal_masks)

    def attend(self, queries, keys, values, scale, mask, sinks):
        if _is_full_precision(self.cache):
            # keys/values are everything stored: mlx-lm's own KVCache semantics.
            if queries.dtype != keys.dtype:
                queries = queries.astype(keys.dtype)
            return mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=scale, mask=mask, sinks=sinks
            )
        if self._new is None:
            raise MlxqError("this model attends without storing keys/values first; "
                            "it cannot use the quantized KV cache (use kv_bits=16)")
        if not self._causal(mask):
            raise MlxqError("this layer attends under its own (non-causal) mask, which the "
                            "quantized KV cache cannot apply; use kv_bits=16")
        keys, values = self._new
        self._new = None
        from .attention import attend

        return attend(queries, keys, values, self.cache, scale, sinks)


def layer_views(caches) -> list:
    """The caches as the mlx-lm model sees them: mlxq caches wrapped, others as they are."""
    masks = []
    return [LayerCache(c, masks) if _is_mlxq_cache(c) else c for c in caches]


# --- which cache each layer gets -------------------------------------------------------

OWN_ATTENTION_REASON = ("its layers compute attention themselves instead of calling mlx-lm's "
                        "shared scaled_dot_product_attention, where the quantized cache plugs in")
MLA_REASON = ("multi-head latent attention (MLA) caches a compressed latent shared by all "
              "heads, not per-head keys and values")
_STATE_REASONS = {
    "ArraysCache": "a recurrent state (SSM / linear-attention layer), not keys and values",
    "MambaCache": "a recurrent state (SSM layer), not keys and values",
    "ChunkedKVCache": "chunked local attention",
    "CacheList": "several caches in one layer",
}


def window_cache(max_size: int, keep: int = 0):
    from .window_cache import WindowKVCache

    return WindowKVCache(max_size=max_size, keep=keep)


def _model_type(model) -> str:
    return getattr(model, "model_type", None) or type(model).__mro__[1].__module__.rsplit(".", 1)[-1]


def _routes_attention(model) -> bool:
    """Whether some module class of ``model`` comes from an mlx-lm module whose attention
    call is routed here (models computing attention themselves, e.g. gemma2, are not)."""
    for _, module in model.named_modules():
        source = sys.modules.get(type(module).__module__)
        if getattr(source, "scaled_dot_product_attention", None) is _attention:
            return True
    return False


def place_kv_caches(model, kv_bits: int, layer_caches) -> list:
    """mlxq.cache.make_cache's per-model step: ``layer_caches()`` builds one mlxq cache per
    layer; return the caches the layers really get (see the module docstring), or refuse
    the quantized cache before building anything."""
    from mlx_lm.models.cache import KVCache as MlxLmKVCache, RotatingKVCache

    quantized = kv_bits != 16
    model_type = _model_type(model)

    def refuse(why):
        raise MlxqError(f"{model_type} cannot use the quantized KV cache (kv_bits={kv_bits}): "
                        f"{why}; use kv_bits=16")

    theirs = model.make_cache() if hasattr(model, "make_cache") else \
        [MlxLmKVCache() for _ in model.layers]
    kinds = [type(c) for c in theirs]
    if quantized:
        if getattr(getattr(model, "args", None), "kv_lora_rank", None):
            refuse(MLA_REASON)
        for i, kind in enumerate(kinds):
            if kind not in (MlxLmKVCache, RotatingKVCache):
                why = _STATE_REASONS.get(kind.__name__, f"a {kind.__name__}")
                refuse(f"layer {i} keeps {why}")
        if len(theirs) != len(model.layers):
            refuse("its layers do not each keep one key/value cache")
        if not _routes_attention(model):
            refuse(OWN_ATTENTION_REASON)
    if len(theirs) != len(model.layers):
        return theirs
    placed = []
    for mine, own in zip(layer_caches(), theirs):
        if type(own) is MlxLmKVCache:
            placed.append(mine)
        elif type(own) is RotatingKVCache:
            placed.append(window_cache(own.max_size, own.keep))
        else:
            placed.append(own)  # 16 bits only: mlx-lm's own cache for that layer
    return placed
