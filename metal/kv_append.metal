// kv_append.metal: one launch per layer writes new tokens into both forms the int4/int8
// KV cache keeps: a float16 row (the full-precision sink/window buffer) and a packed
// quantized row (the int4/int8 store), keys and values together, rotated first.
//
// Template: T (input dtype, float or half), D (head dim), BITS (4|8: the values' bits),
//   KBITS (4|8: the keys' bits, BITS unless the config sets key_bits), GS (group size),
//   ROTATE (apply R = diag(signs) H / sqrt(D), H the Sylvester-Hadamard matrix; D a power
//   of two), CENTER (quantize keys minus a center, kv_layout.py's key centering).
// Inputs:  keys, values  (N, D) rows of T, N = batch * kv_heads * new_tokens (contiguous);
//          signs         (D) float, the layer's random signs (read only when ROTATE);
//          center        (N / tokens, D) half: one key center per (sequence, KV head),
//                        shared by its new tokens (read only when CENTER);
//          tokens        int32[1]: new tokens per (sequence, KV head).
// Outputs: fp_rows  (N, 2D) half: [rotated key | rotated value];
//          q_rows   (N, ROW) uint32, ROW = WK + WV + 2*NG (WK = D*KBITS/32, WV = D*BITS/32,
//                   NG = D/GS): [key codes WK | value codes WV | key (scale, bias) NG |
//                   value (scale, bias) NG],
//                   codes in MLX's packing (element 0 in the low bits), each (scale, bias)
//                   one word read as half2 (x = scale, y = bias). One row is one token of one
//                   KV head: the attention kernel reads it with one contiguous load sequence.
//
// Threadgroup: one token row, 64 threads = 2 simdgroups (0: key, 1: value). Each lane holds
//   EPL = D/32 consecutive elements (e = lane*EPL + x), applies the signs and the Hadamard
//   butterflies (in-lane for strides < EPL, simd_shuffle_xor across lanes above), rounds to
//   half and writes its slice of the fp16 row (keys as they are), subtracts the center from
//   its key elements (CENTER, in float), and after one barrier thread t < 2*NG quantizes
//   group t (keys, then values) from threadgroup memory.
// Launch at decode (1 token): batch * kv_heads threadgroups (3 on the default model, 8 on
//   Llama-3-8B). Bytes read: 2 * N * D * sizeof(T) (+ D*4 signs, + 2D per
//   row for the center); written: N * (4D + 4*ROW).
//
// Rounding follows mx.quantize (MLX's CPU backend) on the half-rounded rotated value:
//   scale = max((max - min) / (2^BITS - 1), 1e-7), negated unless |min| > |max|
//   edge  = |min| > |max| ? min : max;  q0 = rint(edge / scale)
//   if q0 != 0: scale = edge / q0, bias = edge (zero is then exactly representable) else bias = 0
//   code  = clamp(rint((w - bias) / scale), 0, 2^BITS - 1)   (rint: ties to even)
// The float scale/bias are used for the codes; only the stored copies are rounded to half.

constexpr int EPL = D / 32;          // elements per lane
constexpr int WK = D * KBITS / 32;   // code words of the keys
constexpr int WV = D * BITS / 32;    // code words of the values
constexpr int NG = D / GS;           // groups per row
constexpr int ROW = WK + WV + 2 * NG;  // words per stored token

threadgroup float rotated[2 * D];

const size_t row = threadgroup_position_in_grid.x;
const int which = int(simdgroup_index_in_threadgroup);  // 0 keys, 1 values
const int lane = int(thread_index_in_simdgroup);
const device T* src = (which == 0 ? keys : values) + row * D;

float v[EPL];
for (int x = 0; x < EPL; x++) {
  v[x] = float(src[lane * EPL + x]);
}
if (ROTATE) {
  for (int x = 0; x < EPL; x++) {
    v[x] *= signs[lane * EPL + x];
  }
  hadamard_in_simdgroup<EPL, D>(v, lane);
}
for (int x = 0; x < EPL; x++) {
  const half h = half(v[x]);
  fp_rows[row * (2 * D) + which * D + lane * EPL + x] = h;
  float w = float(h);
  if (CENTER && which == 0) {
    w -= float(center[(row / size_t(tokens[0])) * D + lane * EPL + x]);
  }
  rotated[which * D + lane * EPL + x] = w;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

const int t = which * 32 + lane;
if (t < 2 * NG) {
  const int is_v = t / NG;
  const int g = t % NG;
  const int bits = is_v ? BITS : KBITS;
  const int epw = 32 / bits;          // codes per uint32
  const int wpg = GS / epw;           // words per group
  const float n_bins = float((1 << bits) - 1);
  const threadgroup float* w_in = rotated + is_v * D + g * GS;
  float w_min = w_in[0];
  float w_max = w_min;
  for (int i = 1; i < GS; i++) {
    w_min = min(w_min, w_in[i]);
    w_max = max(w_max, w_in[i]);
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
  device uint* out = q_rows + row * ROW;
  for (int wi = 0; wi < wpg; wi++) {
    uint word = 0;
    for (int x = 0; x < epw; x++) {
      const float c = clamp(rint(precise::divide(w_in[wi * epw + x] - bias, scale)), 0.0f, n_bins);
      word |= uint(c) << (x * bits);
    }
    out[is_v * WK + g * wpg + wi] = word;
  }
  out[WK + WV + is_v * NG + g] = as_type<uint>(half2(half(scale), half(bias)));
}
