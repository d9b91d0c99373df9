"""mlxq: fast, memory-lean LLM inference with MLX and an int4 KV cache."""

import importlib

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `python -m mlxq.convert --help` and the emulator import quickly.
    if name == "load":
        from .loading import load

        return load
    if name == "generate":
        # The module is callable (mlxq.generate(model, tokenizer, prompt, ...)), so the
        # name means the same thing whether or not the submodule was imported first.
        return importlib.import_module(".generate", __name__)
    if name == "stream_generate":
        return importlib.import_module(".generate", __name__).stream_generate
    if name == "make_cache":
        from .cache import make_cache

        return make_cache
    if name == "KVCacheConfig":
        from .kv_config import KVCacheConfig

        return KVCacheConfig
    raise AttributeError(f"module 'mlxq' has no attribute {name!r}")
