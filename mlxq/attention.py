"""The one attention entry point every mlxq model calls.

``attend`` takes queries/keys/values of the *current* tokens (after RoPE), stores the
keys/values in the cache it is given and picks the attention path from the cache type:
a full-precision cache uses MLX's fused SDPA, an mlxq quantized cache its own fused
int4 kernel. Model code never changes when a new cache type arrives.
"""

import mlx.core as mx


def _causal_mask(q_len: int):
    # MLX aligns the "causal" mask to the end of the keys, which is what chunked
    # prefill over an existing cache needs. A single query token needs no mask.
    return "causal" if q_len > 1 else None


def attend(queries, keys, values, cache=None, scale: float = 1.0):
    """Causal attention of ``queries`` (B, Hq, L, D) over the cache plus the new keys/values.

    keys/values: (B, Hkv, L, D) for the L new tokens. Returns (B, Hq, L, D).
    """
    q_len = queries.shape[2]
    if cache is None:
        return mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=_causal_mask(q_len)
        )
    if hasattr(cache, "attend"):
        # mlxq caches know their own attention path (fp16 SDPA, fused int4 kernel, ...).
        return cache.attend(queries, keys, values, scale=scale)
    # A cache from another library (e.g. mlx-lm's), so mlx-lm tools can drive mlxq models.
    keys, values = cache.update_and_fetch(keys, values)
    if isinstance(keys, tuple):
        from mlx_lm.models.base import quantized_scaled_dot_product_attention

        return quantized_scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=_causal_mask(q_len),
            group_size=cache.group_size, bits=cache.bits,
        )
    return mx.fast.scaled_dot_product_attention(
        queries, keys, values, scale=scale, mask=_causal_mask(q_len)
    )
