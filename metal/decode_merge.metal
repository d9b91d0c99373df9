// decode_merge.metal: pass 2 of flash-decoding. Merges the per-block partial results of
// segmented_decode_attention.metal, adds the learned attention sinks (gpt_oss) and undoes
// the value rotation.
//
// Template: T (output dtype), D (head dim), ROTATE (values were stored rotated by
//   R = diag(signs) H / sqrt(D): out = (o H / sqrt(D)) * signs, H symmetric), SINKS (add
//   one learned sink logit per query head to the softmax denominator; false: no sink read).
// Inputs:  o_part (rows, n_blocks, D) T, normalized block outputs;
//          ml_part (rows, n_blocks, 2) float, block max (log2 units) and block sum;
//          signs (D) float; sinks (Hq) float, natural-log units of the scaled scores (as
//          mlx-lm's), read only if SINKS; params int32[3] = {n_blocks, LQ, Hq}.
// Output:  out (rows, D) T, rows = B * Hq * LQ (row = (b * Hq + h) * LQ + t).
// Grid: one simdgroup (32 threads) per query row; lane owns elements [lane*D/32, +D/32):
//   out = sum_b o_b * l_b * 2^(m_b - M) / (sum_b l_b * 2^(m_b - M) + 2^(s - M)),
//   s = sink_h * log2(e) (the blocks' maxima are in log2 units, scale included),
//   M = max(max_b m_b, s): the sink is a key with no value, added once per row (not per
//   block); without SINKS the 2^(s - M) term and s are absent. Then the inverse rotation by
//   Hadamard butterflies (in-lane, then simd_shuffle_xor).
// Launch: B * Hq * LQ simdgroups (9 on the default model, 32 on Llama-3-8B at batch 1).
// Bytes read per row: n_blocks * (D * sizeof(T) + 8) + D * 4 (signs) + 4 (the sink, SINKS
//   only); written: D * sizeof(T).

constexpr int EPL = D / 32;

const int n_blocks = params[0];
const size_t row = threadgroup_position_in_grid.y;
const int lane = int(thread_index_in_simdgroup);
const device float* ml = ml_part + row * n_blocks * 2;
const device T* op = o_part + row * n_blocks * D + lane * EPL;

float M = ml[0];
for (int b = 1; b < n_blocks; b++) {
  M = max(M, ml[2 * b]);
}
float L = 0.0f;
if (SINKS) {
  const int head = int(row / size_t(params[1])) % params[2];
  const float s = sinks[head] * 1.44269504088896341f;
  M = max(M, s);
  L = fast::exp2(s - M);
}
float v[EPL];
for (int x = 0; x < EPL; x++) {
  v[x] = 0.0f;
}
for (int b = 0; b < n_blocks; b++) {
  const float w = ml[2 * b + 1] * fast::exp2(ml[2 * b] - M);
  L += w;
  for (int x = 0; x < EPL; x++) {
    v[x] += float(op[b * D + x]) * w;
  }
}
const float inv = 1.0f / L;
for (int x = 0; x < EPL; x++) {
  v[x] *= inv;
}
if (ROTATE) {
  hadamard_in_simdgroup<EPL, D>(v, lane);
  for (int x = 0; x < EPL; x++) {
    v[x] *= signs[lane * EPL + x];
  }
}
for (int x = 0; x < EPL; x++) {
  out[row * D + lane * EPL + x] = static_cast<T>(v[x]);
}
