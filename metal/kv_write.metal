// kv_write.metal: quantize-on-append for the int4/int8 KV cache (keys and values, one launch).
//
// Template: T (input dtype, float or half), D (head dim), BITS (4|8), GS (group size).
// Inputs:  keys, values   (N, D) rows of T, N = batch * kv_heads * new_tokens, contiguous
//          params         int32[1]: N * D / GS (number of groups per tensor)
// Outputs: k_codes, v_codes   (N, D*BITS/32) uint32, MLX packing (element 0 in the low bits)
//          k_scales, k_biases, v_scales, v_biases   (N, D/GS) half
//
// Grid: x = one thread per quantization group (row, group), y = 0 keys | 1 values.
// Each thread reads its GS inputs twice (min/max, then codes; the second pass hits cache),
// writes GS*BITS/32 words and one scale and one bias. Bytes read: 2 * N * D * sizeof(T);
// written: 2 * N * (D*BITS/8 + 4*D/GS). At decode N = kv_heads, so this is one small launch.
//
// Rounding follows mx.quantize (mlx/ops.cpp fallback and the CPU backend) exactly, with the
// input first rounded to half (scales and biases are stored as half):
//   scale = max((max - min) / (2^BITS - 1), 1e-7), negated unless |min| > |max|
//   edge  = |min| > |max| ? min : max;  q0 = rint(edge / scale)
//   if q0 != 0: scale = edge / q0, bias = edge (zero is then exactly representable) else bias = 0
//   code  = clamp(rint((w - bias) / scale), 0, 2^BITS - 1)   (rint: ties to even)
// The float scale/bias are used for the codes; only the stored copies are rounded to half.
// precise::divide keeps the three divisions IEEE-exact whatever the math mode.

constexpr int EPW = 32 / BITS;      // codes per uint32
constexpr int WPG = GS / EPW;       // words per group
const float n_bins = float((1 << BITS) - 1);

const uint gid = thread_position_in_grid.x;
if (gid >= uint(params[0])) {
  return;
}
const bool is_v = thread_position_in_grid.y == 1;
// Groups are contiguous along D, so group gid starts at element gid * GS of the flat input.
const device T* src = (is_v ? values : keys) + size_t(gid) * GS;

float w_min = float(half(src[0]));
float w_max = w_min;
for (int i = 1; i < GS; i++) {
  const float w = float(half(src[i]));
  w_min = min(w_min, w);
  w_max = max(w_max, w);
}

const bool neg_edge = abs(w_min) > abs(w_max);
float scale = max(precise::divide(w_max - w_min, n_bins), 1e-7f);
scale = neg_edge ? scale : -scale;
const float edge = neg_edge ? w_min : w_max;
const float q0 = rint(precise::divide(edge, scale));
float bias = 0.0f;
if (q0 != 0.0f) {
  scale = precise::divide(edge, q0);
  bias = edge;
}

device uint* codes = (is_v ? v_codes : k_codes) + size_t(gid) * WPG;
for (int wi = 0; wi < WPG; wi++) {
  uint word = 0;
  for (int x = 0; x < EPW; x++) {
    const float w = float(half(src[wi * EPW + x]));
    const float c = clamp(rint(precise::divide(w - bias, scale)), 0.0f, n_bins);
    word |= uint(c) << (x * BITS);
  }
  codes[wi] = word;
}
if (is_v) {
  v_scales[gid] = half(scale);
  v_biases[gid] = half(bias);
} else {
  k_scales[gid] = half(scale);
  k_biases[gid] = half(bias);
}
