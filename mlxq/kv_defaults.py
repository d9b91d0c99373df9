"""Per-model defaults of the quantized KV cache, each chosen by measurement.

Gemma 3 keeps int4 values but 8-bit keys under ``--kv-bits 4``: its global layers' keys
are what int4 loses (Gemma-3-270M, Moby-Dick 4K, decode mode: int4 keys give top-1 95.7%
against the 98% target; the attention-error sweep puts 8-bit keys with 4-bit values at a
quarter of int4's error, with values as good as int4 costs; docs/quality.md). A user who
passes ``--kv-key-bits`` (``kv_key_bits``) gets exactly that.
"""

# model_type -> the keys' bits when the values are 4-bit
KEY_BITS_WITH_INT4_VALUES = {"gemma3": 8, "gemma3_text": 8}


def default_key_bits(model, bits: int) -> int | None:
    """The keys' bits ``model`` gets with ``bits``-bit values unless told otherwise (None:
    the values' bits)."""
    if bits != 4:
        return None
    return KEY_BITS_WITH_INT4_VALUES.get(getattr(model, "model_type", None))


def with_model_defaults(model, kv_options: dict) -> dict:
    """``kv_options`` (make_cache's keywords) with ``model``'s defaults filled in where the
    caller left them unset."""
    if kv_options.get("kv_key_bits") is not None:
        return kv_options
    key_bits = default_key_bits(model, kv_options.get("kv_bits"))
    return kv_options if key_bits is None else {**kv_options, "kv_key_bits": key_bits}
