"""Python wrappers of mlxq's Metal kernels, each beside its plain-MLX reference.

- ``kv_write``: quantize-on-append of new keys/values (bit-exact with ``kv_layout.quantize_groups``).
- ``decode_attention``: fused attention of 1-8 query tokens over the int4/int8 cache.
- ``blockwise_attention``: attention over the quantized cache in key blocks with bounded
  temporaries (plain MLX): chunked prefill on every backend, long decode on ``reference``.
"""
