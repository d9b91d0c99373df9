// kv_row.h: the metadata of an int4/int8 store row (mlxq/kernels/kv_layout.py), shared by
// kv_append.metal (which writes it) and segmented_decode_attention.metal (which reads it).
//
// After a row's code words comes a run of uint16 halves, the keys' NG groups then the
// values' NG groups, padded to a whole word (half 2i is word i's low half):
//   8-bit group: 2 halves, float16 scale then float16 bias: w = scale * code + bias;
//   4-bit group: 1 half, (float16 scale with its 4 lowest mantissa bits cut) | zero point
//                z in [0, 15]: w = scale * (code - z), i.e. bias = -z * scale.
// Everything is read as whole uint32 words and split with shifts: no pointer casts.

// Halves of metadata per group.
constexpr int meta_halves_per_group(int bits) {
  return bits == 4 ? 1 : 2;
}

// Words of a row's metadata (keys' groups, values' groups, padded).
constexpr int meta_row_words(int ng, int kbits, int vbits) {
  return (ng * (meta_halves_per_group(kbits) + meta_halves_per_group(vbits)) + 1) / 2;
}

// Half h of the metadata that starts at `meta`.
inline uint meta_half(const device uint* meta, int h) {
  const uint word = meta[h / 2];
  return (h % 2) ? (word >> 16) : (word & 0xFFFFu);
}

// (scale, bias) of the group whose metadata starts at half h, for a group of NBITS codes.
template <int NBITS>
inline float2 group_scale_bias(const device uint* meta, int h) {
  if (NBITS == 4) {
    const uint u = meta_half(meta, h);
    const float s = float(as_type<half>(ushort(u & 0xFFF0u)));
    return float2(s, -float(u & 0xFu) * s);
  }
  return float2(float(as_type<half>(ushort(meta_half(meta, h)))),
                float(as_type<half>(ushort(meta_half(meta, h + 1)))));
}
