"""The KV-cache flags of ``mlxq.generate`` and ``mlxq.evaluate``, checked in the command
line's own terms: options that only a quantized cache takes are an error without one
(not silently ignored), and a group size that does not fit the model's heads names the
group sizes that do (not a Python keyword the command line does not have)."""

from .errors import MlxqError

QUANTIZED_ONLY = "applies to a quantized KV cache only; add --kv-bits 4 or 8, or drop it"


def check_quantized_only(kv_bits: list, **flags) -> None:
    """``flags``: flag name -> value given (None / False: not given)."""
    if any(b != 16 for b in kv_bits):
        return
    for flag, value in flags.items():
        if not (value is None or value is False or value == []):
            raise MlxqError(f"{flag} {QUANTIZED_ONLY}")


def check_model_heads(model, group_sizes: list, without: str) -> None:
    """The model's head_dim must take the quantized cache with each of ``group_sizes``.
    ``without``: what the user can do instead, in the command's terms."""
    from .quantized_cache import SUPPORTED_GROUP_SIZES, SUPPORTED_HEAD_DIMS

    head_dim = getattr(model, "head_dim", None)
    if not isinstance(head_dim, int):
        return
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise MlxqError(f"this model's head_dim {head_dim} cannot use the quantized KV cache "
                        f"(supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}); {without}")
    fits = [g for g in SUPPORTED_GROUP_SIZES if head_dim % g == 0]
    for g in group_sizes:
        if head_dim % g:
            raise MlxqError(f"--kv-group-size {g} does not divide this model's head_dim "
                            f"{head_dim}; use --kv-group-size {' or '.join(map(str, fits))}")
