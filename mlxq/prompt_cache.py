"""Prompt caches: a KV cache plus the token ids it holds, reused for the longest common
prefix of a later prompt, and saved to / loaded from disk.

One mechanism backs three users: ``python -m mlxq.cache_prompt`` writes a file,
``mlxq.generate --prompt-cache-file`` reads it, and the server's in-memory prefix cache
(mlxq/server/prefix_cache.py) keeps many of them. The file is ``mlxq.cache.save_cache``'s
safetensors with the token ids and the cache settings in its metadata; a file saved with
other KV options (bits, group size, window, sink, rotation), another model's shape or
another sliding window is refused with one line, never silently mixed. Models with
sliding-window layers (Gemma 3) save their window caches in the same file.
"""

from dataclasses import dataclass

from .cache import cache_nbytes, copy_caches, load_cache, make_cache, save_cache
from .errors import MlxqError

FORMAT = "mlxq-prompt-cache/1"


@dataclass
class PromptCache:
    """Per-layer caches holding exactly the keys/values of ``tokens``."""

    caches: list
    tokens: list[int]

    @property
    def nbytes(self) -> int:
        return cache_nbytes(self.caches)

    def copy(self) -> "PromptCache":
        return PromptCache(copy_caches(self.caches), list(self.tokens))


def common_prefix_length(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reuse_prefix(prompt_cache: PromptCache, prompt_ids) -> int:
    """Trim ``prompt_cache`` (in place) to its longest common prefix with ``prompt_ids``,
    leaving at least the prompt's last token to be fed; returns how many tokens it keeps.
    A sliding window that has already let go of tokens the trimmed prefix's next token
    needs (``can_trim``, window_cache.py) makes it keep nothing: recomputed, never wrong."""
    keep = min(common_prefix_length(prompt_cache.tokens, prompt_ids), len(prompt_ids) - 1)
    keep = max(keep, 0)
    drop = len(prompt_cache.tokens) - keep
    if drop and not all(getattr(c, "can_trim", lambda n: True)(drop)
                        for c in prompt_cache.caches):
        keep, drop = 0, len(prompt_cache.tokens)
    if drop:
        for c in prompt_cache.caches:
            c.trim(drop)
        del prompt_cache.tokens[keep:]
    return keep


# --- settings that must match ------------------------------------------------------------
def describe_cache(cache) -> str:
    """A layer cache's settings by the KV config's short name (``fp``, ``int4-g64-rot-...``,
    ``fp-window512`` for a sliding-window layer)."""
    config = getattr(cache, "config", None)
    if config is not None:
        return config.name
    window = getattr(cache, "max_size", None)
    return "fp" if window is None else f"fp-window{window}"


def _settings(cache):
    return (type(cache), getattr(cache, "config", None), getattr(cache, "layer_index", None),
            getattr(cache, "max_size", None), getattr(cache, "keep", None))


def check_compatible(caches, model, kv_options: dict, what: str) -> None:
    """MlxqError in one line unless ``caches`` were made for ``model``'s layers with the
    settings ``make_cache(model, **kv_options)`` would use now."""
    expected = make_cache(model, **kv_options)
    if len(caches) != len(expected):
        raise MlxqError(f"{what} holds {len(caches)} layers but the model has "
                        f"{len(expected)}; it was saved for another model")
    for got, want in zip(caches, expected):
        if _settings(got) != _settings(want):
            raise MlxqError(f"{what} was saved with the KV cache {describe_cache(got)} but this "
                            f"run uses {describe_cache(want)}; use the same --kv-* options")


# --- files ----------------------------------------------------------------------------------
def save_prompt_cache(path, prompt_cache: PromptCache, model_name: str = "") -> None:
    """Write ``prompt_cache`` whole to ``path`` (a temporary file renamed onto it)."""
    from .output_files import replacing

    meta = {"format": FORMAT, "tokens": list(prompt_cache.tokens), "model": model_name}
    with replacing(path) as tmp:
        save_cache(tmp, prompt_cache.caches, metadata=meta)


def load_prompt_cache(path, model, kv_options: dict) -> PromptCache:
    """The prompt cache at ``path``, checked against ``model`` and ``kv_options``."""
    caches, meta = load_cache(path, return_metadata=True)
    if meta.get("format") != FORMAT or not isinstance(meta.get("tokens"), list):
        raise MlxqError(f"{path} is a saved mlxq cache but not a prompt cache "
                        "(write one with python -m mlxq.cache_prompt)")
    check_compatible(caches, model, kv_options, str(path))
    tokens = [int(t) for t in meta["tokens"]]
    if any(c.offset != len(tokens) for c in caches):
        raise MlxqError(f"{path} is inconsistent: its caches do not hold its {len(tokens)} tokens")
    return PromptCache(caches, tokens)
