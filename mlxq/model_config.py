"""config.json settings checked by type and range in one place, naming the key, before a
model is built from them (else a wrong value ends in a TypeError or ZeroDivisionError
deep inside model building, or only at generate time after a successful convert).

Only keys that are present are checked (each model type needs its own subset; a missing
one is reported when the model is built), so configs of other architectures pass through.
"""

import math

from .errors import MlxqError

MAX_SIZE = 1 << 20  # far above any real hidden/intermediate size, vocabulary or head count
MAX_POSITIONS = 1 << 31


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _count(lo, hi, optional=False):
    def check(v):
        if v is None and optional:
            return None
        if not _is_int(v) or not lo <= v <= hi:
            return f"an integer in [{lo}, {hi}]"
        return None
    return check


def _positive_number(optional=False):
    def check(v):
        if v is None and optional:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            return "a positive number"
        return None
    return check


def _kind(types, what, optional=False):
    def check(v):
        if v is None and optional:
            return None
        return None if isinstance(v, types) else what
    return check


def _token_ids(v):
    ids = v if isinstance(v, list) else [v]
    if v is None or (ids and all(_is_int(i) for i in ids)):
        return None
    return "a token id (an integer) or a list of them"


CHECKS = {
    "model_type": _kind(str, "a string"),
    "hidden_size": _count(1, MAX_SIZE),
    "intermediate_size": _count(1, MAX_SIZE),
    "num_hidden_layers": _count(1, 4096),
    "num_attention_heads": _count(1, 4096),
    "num_key_value_heads": _count(1, 4096, optional=True),
    "head_dim": _count(2, 4096, optional=True),
    "vocab_size": _count(1, MAX_SIZE * 16),
    "max_position_embeddings": _count(1, MAX_POSITIONS, optional=True),
    "rms_norm_eps": _positive_number(),
    "rope_theta": _positive_number(),
    "rope_scaling": _kind(dict, "an object (or null)", optional=True),
    "rope_parameters": _kind(dict, "an object (or null)", optional=True),
    "tie_word_embeddings": _kind(bool, "true or false"),
    "attention_bias": _kind(bool, "true or false"),
    "mlp_bias": _kind(bool, "true or false"),
    "quantization": _kind(dict, "an object", optional=True),
    "eos_token_id": _token_ids,
    "bos_token_id": _token_ids,
    "pad_token_id": _token_ids,
}


def validate_config(config: dict, where) -> None:
    """One MlxqError naming ``where`` and the first bad key, or None if all is well."""
    if not isinstance(config, dict):
        raise MlxqError(f"{where} is not a JSON object")

    def bad(key, expected):
        raise MlxqError(f"{where}: {key!r} must be {expected}, got {config[key]!r}"[:300])

    for key, check in CHECKS.items():
        if key in config and (expected := check(config[key])):
            bad(key, expected)
    for key in ("rope_scaling", "rope_parameters"):
        section = config.get(key) or {}
        for sub in ("factor", "rope_theta"):
            if sub in section and _positive_number()(section[sub]):
                raise MlxqError(f"{where}: {key}.{sub} must be a positive number, "
                                f"got {section[sub]!r}")
    quant = config.get("quantization") or {}
    for sub in ("bits", "group_size"):
        if sub in quant and _count(1, 1024)(quant[sub]):
            raise MlxqError(f"{where}: quantization.{sub} must be a positive integer, "
                            f"got {quant[sub]!r}")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv_heads) and heads % kv_heads:
        raise MlxqError(f"{where}: 'num_attention_heads' ({heads}) must be a multiple of "
                        f"'num_key_value_heads' ({kv_heads})")
    hidden, head_dim = config.get("hidden_size"), config.get("head_dim")
    if head_dim is None and _is_int(hidden) and _is_int(heads) and hidden % heads:
        raise MlxqError(f"{where}: 'hidden_size' ({hidden}) must be a multiple of "
                        f"'num_attention_heads' ({heads}) when 'head_dim' is not given")
    dim = head_dim if head_dim is not None else (
        hidden // heads if _is_int(hidden) and _is_int(heads) else None)
    if _is_int(dim) and dim % 2:
        raise MlxqError(f"{where}: the head dimension ('head_dim' {dim}) must be even "
                        "(rotary embedding)")


def build_checked(config: dict, where):
    """``models.build_model`` on a validated config; anything it still rejects becomes one
    MlxqError naming ``where`` instead of a traceback."""
    from .models import build_model

    validate_config(config, where)
    try:
        return build_model(config)
    except MlxqError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, KeyError, AttributeError, IndexError,
            OverflowError) as e:
        message = (str(e).splitlines() or [""])[0]
        raise MlxqError(f"{where}: cannot build the model from these settings "
                        f"({type(e).__name__}: {message})") from None
