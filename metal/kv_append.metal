// kv_append.metal: one launch per layer writes new tokens into both forms the int4/int8
// KV cache keeps: a float16 row (the full-precision sink/window buffer) and a packed
// quantized row (the int4/int8 store), keys and values together, rotated first.
//
// Template: T (input dtype, float or half), D (head dim), BITS (4|8: the values' bits),
//   KBITS (4|8: the keys' bits, BITS unless the config sets key_bits), GS (group size),
//   ROTATE (apply R = diag(signs) H / sqrt(D), H the Sylvester-Hadamard matrix; D a power
//   of two), CENTER (quantize keys minus a center, kv_layout.py's key centering),
//   QUANT (write q_rows; off: new tokens whose rows are written later, as they leave the
//   window), GATHER (the rows are float16 [key | value] rows already in the cache's
//   window buffer, read in place at per-row offsets: the token leaving the window).
// Inputs:  keys, values  (N, D) rows of T, N = batch * kv_heads * new_tokens (contiguous);
//                        GATHER: keys is the window buffer (half), values unused;
//          signs         (D) float, the layer's random signs (read only when ROTATE);
//          center        (N / tokens, D) half: one key center per (sequence, KV head),
//                        shared by its new tokens (read only when CENTER); GATHER: the
//                        cache's key centers, row r's at element offset at[N + r];
//          tokens        int32[1]: new tokens per (sequence, KV head);
//          at            int32[2N] (GATHER only): element offsets of row r's [key | value]
//                        in keys (at[r]) and of its center (at[N + r]).
// Outputs: fp_rows  (N, 2D) half: [rotated key | rotated value] (GATHER: a copy);
//          q_rows   (N, ROW) uint32, ROW = WK + WV + MW (WK = D*KBITS/32, WV = D*BITS/32,
//                   NG = D/GS, MW = meta_row_words in kv_row.h): [key codes WK | value
//                   codes WV | metadata MW], codes in MLX's packing (element 0 in the low
//                   bits), the metadata as kv_row.h describes (4-bit groups: one half each,
//                   scale | zero point; 8-bit groups: a float16 (scale, bias) pair). One row
//                   is one token of one KV head: the attention kernel reads it with one
//                   contiguous load sequence.
//
// Threadgroup: one token row, 64 threads = 2 simdgroups (0: key, 1: value). Each lane holds
//   EPL = D/32 consecutive elements (e = lane*EPL + x), applies the signs and the Hadamard
//   butterflies (in-lane for strides < EPL, simd_shuffle_xor across lanes above), rounds to
//   half and writes its slice of the fp16 row (keys as they are), subtracts the center from
//   its key elements (CENTER, in float), and after one barrier thread t < 2*NG quantizes
//   group t (keys, then values) from threadgroup memory and puts its metadata halves in
//   threadgroup memory; after a second barrier thread t < MW writes metadata word t (two
//   groups' halves can share a word: one writer per word).
// Launch at decode (1 token): batch * kv_heads threadgroups (3 on the default model, 8 on
//   Llama-3-8B), twice with the default window: the new token (QUANT off: its float16 row)
//   and, after it is in the ring, the window's oldest token (GATHER: its row in place).
//   Bytes read: 2 * N * D * sizeof(T) (+ D*4 signs, + 2D per row for the center); written:
//   N * 4D (+ N * 4*ROW with QUANT).
//
// Rounding follows mx.quantize (MLX's CPU backend) on the half-rounded rotated value:
//   (4-bit groups: min = min(min, 0), max = max(max, 0), so that the zero point is a code)
//   scale = max((max - min) / (2^BITS - 1), 1e-7), negated unless |min| > |max|
//   edge  = |min| > |max| ? min : max;  q0 = rint(edge / scale)
//   if q0 != 0: scale = edge / q0, bias = edge (zero is then exactly representable) else bias = 0
//   4-bit groups: scale = its float16 rounded to 6 mantissa bits (never 0), bias = q0 * scale
//   (exact), stored as one half: those bits | -q0 (q0 in [-15, 0])
//   code  = clamp(rint((w - bias) / scale), 0, 2^BITS - 1)   (rint: ties to even)
// 8-bit groups use the float scale/bias for the codes; only the stored copies are rounded
// to half (mx.quantize). kv_layout.quantize_groups is the same rule in MLX ops.

constexpr int EPL = D / 32;          // elements per lane
constexpr int WK = D * KBITS / 32;   // code words of the keys
constexpr int WV = D * BITS / 32;    // code words of the values
constexpr int NG = D / GS;           // groups per row
constexpr int KMH = meta_halves_per_group(KBITS);  // metadata halves per key group
constexpr int VMH = meta_halves_per_group(BITS);   // ... per value group
constexpr int MW = meta_row_words(NG, KBITS, BITS);
constexpr int ROW = WK + WV + MW;    // words per stored token

threadgroup float rotated[2 * D];
threadgroup uint meta_tg[2 * MW];   // metadata halves (the padding half stays 0)

const size_t row = threadgroup_position_in_grid.x;
const int which = int(simdgroup_index_in_threadgroup);  // 0 keys, 1 values
const int lane = int(thread_index_in_simdgroup);
const size_t n_rows = threadgroups_per_grid.x;
const device T* src = GATHER ? keys + size_t(at[row]) + which * D
                             : (which == 0 ? keys : values) + row * D;
const size_t center0 = GATHER ? size_t(at[n_rows + row]) : (row / size_t(tokens[0])) * D;

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
    w -= float(center[center0 + lane * EPL + x]);
  }
  rotated[which * D + lane * EPL + x] = w;
}
if (!QUANT) {
  return;  // uniform: the whole threadgroup returns before any barrier
}
const int t = which * 32 + lane;
if (t < 2 * MW) {
  meta_tg[t] = 0u;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

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
  if (bits == 4) {
    w_min = min(w_min, 0.0f);
    w_max = max(w_max, 0.0f);
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
  const int h0 = is_v ? NG * KMH + g * VMH : g * KMH;  // the group's first metadata half
  if (bits == 4) {
    const uint h = uint(as_type<ushort>(half(scale)));
    uint h6 = (h + 8u) & 0xFFF0u;
    if ((h6 & 0x7FFFu) == 0u) {
      h6 = (h & 0x8000u) | 0x10u;
    }
    scale = float(as_type<half>(ushort(h6)));
    bias = q0 * scale;
    meta_tg[h0] = h6 | uint(-q0);
  } else {
    meta_tg[h0] = uint(as_type<ushort>(half(scale)));
    meta_tg[h0 + 1] = uint(as_type<ushort>(half(bias)));
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
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (t < MW) {
  q_rows[row * ROW + WK + WV + t] = meta_tg[2 * t] | (meta_tg[2 * t + 1] << 16);
}
