"""Per-layer key/value caches: the full-precision ``KVCache``, ``make_cache`` and save/load.

A cache stores the keys/values of the tokens seen so far; ``mlxq.attention`` decides how
they are attended (``QuantizedKVCache`` lives in quantized_cache.py). Buffers are preallocated in blocks of ``step`` tokens: appending a
token writes into free space, and only crossing a block boundary allocates (amortized).
"""

import json

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .backend import compute_dtype
from .errors import MlxqError
from .kernels.kv_layout import fp16_bytes
from .kv_config import KVCacheConfig


class KVCache:
    """Full-precision cache (compute dtype) attended with MLX's fused SDPA."""

    # Class defaults let load_cache build an instance without __init__ (see from_state).
    keys = None
    values = None
    offset = 0
    step = 256

    def __init__(self, step: int = 256, dtype=None):
        if step < 1:
            raise MlxqError(f"cache step must be at least 1, got {step}")
        self.step = step
        self.dtype = dtype or compute_dtype()
        self.keys = None
        self.values = None
        self.offset = 0

    # --- storage ---------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _grow(self, keys, values, needed: int):
        # Round up to whole blocks and append zeros: one copy per block, not per token.
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        new_cap = -(-needed // self.step) * self.step
        extra = new_cap - self.capacity
        new_k = mx.zeros((B, H, extra, Dk), self.dtype)
        new_v = mx.zeros((B, H, extra, Dv), self.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys, new_k], axis=2)
            self.values = mx.concatenate([self.values, new_v], axis=2)

    def update_and_fetch(self, keys, values):
        """Append (B, Hkv, L, D) keys/values; return all stored ones (mlx-lm interface)."""
        start = self.offset
        end = start + keys.shape[2]
        if end > self.capacity:
            self._grow(keys, values, end)
        if keys.dtype != self.dtype:
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    # --- bookkeeping -----------------------------------------------------------------
    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens (the buffers stay allocated). Returns how many."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated buffers (capacity, not just the stored tokens)."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    @property
    def fp16_nbytes(self) -> int:
        """What an fp16 cache with the same capacity would allocate (for ratios)."""
        if self.keys is None:
            return 0
        return fp16_bytes(*self.keys.shape, self.values.shape[3])

    # --- save / load -----------------------------------------------------------------
    @property
    def state(self):
        # Only the stored prefix: a saved cache holds no padding.
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value):
        if not value:
            self.keys = self.values = None
            self.offset = 0
            return
        self.keys, self.values = value
        self.dtype = self.keys.dtype
        self.offset = self.keys.shape[2]

    @property
    def meta_state(self):
        return {"step": self.step, "dtype": str(self.dtype).rsplit(".", 1)[-1]}

    @meta_state.setter
    def meta_state(self, value):
        self.step = int(value.get("step", 256))
        self.dtype = getattr(mx, value.get("dtype", ""), None) or compute_dtype()


def make_cache(model, config: KVCacheConfig | None = None, *, backend: str | None = None,
               **options) -> list:
    """One cache per layer of ``model`` (mlx-lm's ``make_prompt_cache``): ``KVCache`` for 16
    bits, ``QuantizedKVCache`` for 8/4. Options as a ``KVCacheConfig`` or as keywords:
    ``kv_bits``, ``kv_group_size``, ``kv_rotation``, ``kv_recent``, ``kv_sink``,
    ``kv_key_center``, ``kv_key_bits``, ``rotation_seed`` (None = the default; the model's own
    defaults, ``kv_defaults.py``, apply to keywords only). The kernel backend is resolved here, once.

    A model with a ``place_kv_caches(kv_bits, layer_caches)`` method (mlx-lm architectures,
    see mlx_lm_bridge.py) then picks what each layer really gets (sliding-window layers a
    window-bounded cache) or refuses the quantized cache with a clear error."""
    if config is None:
        from .kv_defaults import with_model_defaults

        config = config_from_options(**with_model_defaults(model, options))
    elif options:
        raise TypeError("pass either a KVCacheConfig or keyword options, not both")
    place = getattr(model, "place_kv_caches", None)
    if place is not None:
        return place(config.bits, lambda: _layer_caches(model, config, backend))
    return _layer_caches(model, config, backend)


def _layer_caches(model, config: KVCacheConfig, backend) -> list:
    if not config.quantized:
        return [KVCache(step=config.step) for _ in model.layers]
    # Fail before any work when the model's heads do not fit the quantized layout.
    head_dim = _model_head_dim(model)
    if head_dim is not None:
        config.check_head_dim(head_dim)
    from .backend import kernel_backend
    from .quantized_cache import QuantizedKVCache

    backend = backend or kernel_backend()
    # One rotation per layer (its own signs), so layers' errors do not line up.
    return [QuantizedKVCache(config, layer_index=i, backend=backend)
            for i in range(len(model.layers))]


_OPTION_NAMES = {"kv_bits": "bits", "kv_group_size": "group_size", "kv_rotation": "rotation",
                 "kv_recent": "recent", "kv_sink": "sink", "kv_key_center": "key_center",
                 "kv_key_bits": "key_bits",
                 "rotation_seed": "seed",
                 "step": "step"}


def config_from_options(**options) -> KVCacheConfig:
    """A KVCacheConfig from make_cache's keyword names; None values take the defaults."""
    unknown = set(options) - set(_OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown cache options: {', '.join(sorted(unknown))}")
    fields = {_OPTION_NAMES[k]: v for k, v in options.items() if v is not None}
    return KVCacheConfig(**fields)


def _model_head_dim(model):
    head_dim = getattr(model, "head_dim", None)
    if not isinstance(head_dim, int) and getattr(model, "layers", None):
        # mlx-lm's models keep it on the attention module.
        head_dim = getattr(getattr(model.layers[0], "self_attn", None), "head_dim", None)
    return head_dim if isinstance(head_dim, int) else None


def cache_nbytes(caches) -> int:
    return sum(c.nbytes for c in caches)


def cache_device_nbytes(caches) -> int:
    """The caches' bytes with full-precision ones (``KVCache``, sliding windows) weighed as
    float16, what they hold on a GPU whatever the CPU backend computes in; quantized caches
    store float16 windows and scales already. The numerator of a KV bytes ratio."""
    from .quantized_cache import QuantizedKVCache

    return sum(c.nbytes if isinstance(c, QuantizedKVCache) else c.fp16_nbytes for c in caches)


def cache_format_name(caches) -> str:
    """The quantized caches' format (``KVCacheConfig.name``, e.g. ``int4-g64-rot-kc-w304-s4``)
    or ``fp16`` when no layer holds a quantized cache."""
    from .quantized_cache import QuantizedKVCache

    names = [c.config.name for c in caches if isinstance(c, QuantizedKVCache)]
    return names[0] if names else "fp16"


def cache_fp16_nbytes(caches):
    """Bytes an fp16 cache of the same capacity would take; None if a cache cannot say."""
    try:
        return sum(c.fp16_nbytes for c in caches)
    except AttributeError:
        return None


# --- save / load ---------------------------------------------------------------------
_META_KEY = "mlxq_cache"


def _class_by_name(name: str):
    if name == "KVCache":
        return KVCache
    if name == "QuantizedKVCache":
        from .quantized_cache import QuantizedKVCache

        return QuantizedKVCache
    if name == "WindowKVCache":
        from .window_cache import WindowKVCache

        return WindowKVCache
    raise MlxqError(f"unknown cache class {name!r} in the saved cache")


def save_cache(path, caches, metadata: dict | None = None) -> None:
    """Write the caches (any mlxq cache class) to a .safetensors file, with optional
    JSON-able ``metadata`` that ``load_cache(..., return_metadata=True)`` gives back."""
    arrays = {}
    for i, cache in enumerate(caches):
        for key, arr in tree_flatten(cache.state):
            arrays[f"{i}.{key}"] = arr
    meta = {
        "classes": [type(c).__name__ for c in caches],
        "meta_states": [c.meta_state for c in caches],
    }
    if metadata:
        meta["user"] = metadata
    mx.save_safetensors(str(path), arrays, {_META_KEY: json.dumps(meta)})


def restore_cache(class_name: str, meta_state, state):
    """A cache of ``class_name`` rebuilt from its ``meta_state`` and ``state`` (what
    ``load_cache`` and copies of a cache use)."""
    cls = _class_by_name(class_name)
    cache = cls.__new__(cls)
    cache.meta_state = meta_state  # non-array settings first: the state may need them
    cache.state = state
    return cache


def copy_caches(caches) -> list:
    """Independent copies of ``caches`` (the stored tokens only): appending to a copy
    leaves the original unchanged."""
    return [restore_cache(type(c).__name__, c.meta_state, c.state) for c in caches]


def load_cache(path, return_metadata: bool = False):
    """Read caches written by ``save_cache`` (and their metadata if asked)."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        meta = json.loads(metadata[_META_KEY])
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise MlxqError(f"{path} is not a saved mlxq cache: {e}") from None
    per_layer = [[] for _ in meta["classes"]]
    for key, arr in arrays.items():
        layer, rest = key.split(".", 1)
        per_layer[int(layer)].append((rest, arr))
    caches = [restore_cache(name, meta_state, tree_unflatten(items) if items else ())
              for name, meta_state, items in zip(meta["classes"], meta["meta_states"],
                                                 per_layer)]
    return (caches, meta.get("user", {})) if return_metadata else caches
