// decode_merge.metal: pass 2 of flash-decoding. Merges the per-block partial results of
// quantized_decode_attention.metal into the attention output.
//
// Template: T (output dtype), D (head dim).
// Inputs:  o_part (rows, n_blocks, D) float, unnormalized block outputs;
//          ml_part (rows, n_blocks, 2) float, block max (log2 units) and block sum;
//          params int32[1] = {n_blocks}.
// Output:  out (rows, D) T, rows = B * Hq * LQ.
// Grid: one simdgroup (32 threads) per query row; each lane owns elements d = lane + 32k.
//   out = sum_b o_b * 2^(m_b - M) / sum_b l_b * 2^(m_b - M), M = max_b m_b.
// Bytes read per row: n_blocks * (D + 2) * 4; written: D * sizeof(T).

const int n_blocks = params[0];
const size_t row = threadgroup_position_in_grid.y;
const int lane = int(thread_index_in_simdgroup);
const device float* ml = ml_part + row * n_blocks * 2;
const device float* op = o_part + row * n_blocks * D;

float M = ml[0];
for (int b = 1; b < n_blocks; b++) {
  M = max(M, ml[2 * b]);
}
float L = 0.0f;
for (int b = 0; b < n_blocks; b++) {
  L += ml[2 * b + 1] * fast::exp2(ml[2 * b] - M);
}
const float inv = 1.0f / L;
for (int d = lane; d < D; d += 32) {
  float acc = 0.0f;
  for (int b = 0; b < n_blocks; b++) {
    acc += op[b * D + d] * fast::exp2(ml[2 * b] - M);
  }
  out[row * D + d] = static_cast<T>(acc * inv);
}
