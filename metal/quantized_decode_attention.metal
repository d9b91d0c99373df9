// quantized_decode_attention.metal: fused attention of 1-8 query tokens over the int4/int8
// KV cache (pass 1 of flash-decoding; decode_merge.metal is pass 2).
//
// Template: T (query/output dtype), D (head dim), BITS (4|8), GS (group size), G (query heads
//   per KV head), LQ (query tokens), RT (query rows per threadgroup), NSG (simdgroups per
//   threadgroup), SINGLE (one block covers the sequence: write the final output directly).
// Inputs:  queries (B, Hq, LQ, D) T; k_codes/v_codes (B, Hkv, cap, D*BITS/32) uint32;
//          k_scales/k_biases/v_scales/v_biases (B, Hkv, cap, D/GS) half (whole buffers);
//          params int32[6] = {length, block, cap, Hkv, row_chunks, n_blocks}; scale float[1].
// Outputs: SINGLE: out (B, Hq, LQ, D) T.  Otherwise: o_part (B, Hq, LQ, n_blocks, D) float
//          (unnormalized), ml_part (..., n_blocks, 2) float (running max in log2 units, sum).
//
// Grid: threadgroup (blk, hkv, b * row_chunks + chunk). A threadgroup owns keys
//   [blk*block, min((blk+1)*block, length)) of one (batch, KV head) and up to RT of the
//   R = G*LQ query rows that share that KV head (all of them unless R > RT).
//   It walks its block in tiles of 32 keys:
//   - all NSG*32 threads copy the tile's packed K and V rows, scales and biases from device
//     memory into threadgroup memory with contiguous (coalesced) reads: every packed K/V row
//     is read from device memory once per step and used by all RT query rows;
//   - simdgroup s owns query rows [s*RPS, (s+1)*RPS). Score phase: lane = key; per group
//     score += scale_k * (q . codes) + bias_k * sum(q) with q pre-multiplied by
//     softmax_scale*log2(e) (so softmax uses exp2); online softmax over the tile with
//     simd_max/simd_sum; fp32 throughout. Value phase: lane = D/32 output elements; for each
//     key of the tile every lane dequantizes its slice of the V row and accumulates p * v.
// Bytes read from device memory per threadgroup: block * 2 * (D*BITS/8 + 4*D/GS) for K and V
//   + RT*D*sizeof(T) queries; written: RT*D*4 (+8) partials (or RT*D*sizeof(T) when SINGLE).
// Threadgroup memory: RT*D*4 (queries) + RT*(D/GS + 32)*4 + 32*(2*D*BITS/32 + 1 + 4*D/GS)*4.
// Causality among the LQ query tokens: token i sees keys < length - LQ + i + 1.

constexpr int TK = 32;                     // keys per tile: one per lane in the score phase
constexpr int EPW = 32 / BITS;             // codes per uint32 word
constexpr int W = D / EPW;                 // words per packed row
constexpr int KSTRIDE = W + 1;             // padding: lanes read different rows, no bank clash
constexpr int NG = D / GS;                 // quantization groups per row
constexpr int WPG = GS / EPW;              // words per group
constexpr int R = G * LQ;                  // query rows sharing one KV head
constexpr int RPS = (RT + NSG - 1) / NSG;  // query rows per simdgroup
constexpr int EPL = D / 32;                // output elements per lane
constexpr int NT = NSG * 32;
constexpr uint CODE_MASK = (1u << BITS) - 1u;
// Finite "minus infinity": keeps exp2 arguments finite (no inf - inf) in any math mode.
constexpr float NEG = -1.0e30f;

threadgroup float4 q_tg[RT * D / 4];
threadgroup float qsum_tg[RT * NG];
threadgroup float p_tg[RT * TK];
threadgroup uint k_tg[TK * KSTRIDE];
threadgroup uint v_tg[TK * W];
threadgroup float ks_tg[TK * NG];
threadgroup float kb_tg[TK * NG];
threadgroup float vs_tg[TK * NG];
threadgroup float vb_tg[TK * NG];

const int length = params[0];
const int block = params[1];
const int cap = params[2];
const int n_kv = params[3];
const int n_chunks = params[4];
const int n_blocks = params[5];

const int blk = int(threadgroup_position_in_grid.x);
const int hkv = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z) / n_chunks;
const int chunk = int(threadgroup_position_in_grid.z) % n_chunks;
const int sg = int(simdgroup_index_in_threadgroup);
const int lane = int(thread_index_in_simdgroup);
const int tid = sg * 32 + lane;

const int r0 = chunk * RT;
const int nrows = min(RT, R - r0);
const size_t kv = size_t(b) * n_kv + hkv;  // (batch, KV head) slab of the cache
const size_t row0 = kv * R + r0;           // flat (b, h, i) index of this threadgroup's row 0

// Queries -> threadgroup memory, pre-scaled so that scores are in log2 units.
const float qscale = scale[0] * 1.44269504088896341f;
for (int idx = tid; idx < nrows * D / 4; idx += NT) {
  const device T* qp = queries + row0 * D + idx * 4;
  q_tg[idx] = float4(float(qp[0]), float(qp[1]), float(qp[2]), float(qp[3])) * qscale;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int idx = tid; idx < nrows * NG; idx += NT) {
  const int base = (idx / NG) * (D / 4) + (idx % NG) * (GS / 4);
  float s = 0.0f;
  for (int x = 0; x < GS / 4; x++) {
    const float4 v = q_tg[base + x];
    s += (v.x + v.y) + (v.z + v.w);
  }
  qsum_tg[idx] = s;
}

// Per-row state of this simdgroup's rows (uniform across its lanes).
float m[RPS];
float l[RPS];
float o[RPS][EPL];
int lim[RPS];
bool active[RPS];
for (int j = 0; j < RPS; j++) {
  const int lr = sg * RPS + j;
  active[j] = lr < nrows;
  lim[j] = length - LQ + (r0 + lr) % LQ + 1;
  m[j] = NEG;
  l[j] = 0.0f;
  for (int x = 0; x < EPL; x++) {
    o[j][x] = 0.0f;
  }
}

const int kb0 = blk * block;
const int kb1 = min(kb0 + block, length);
const size_t code_base = kv * size_t(cap) * W;
const size_t sb_base = kv * size_t(cap) * NG;

for (int t0 = kb0; t0 < kb1; t0 += TK) {
  const int nk = min(TK, kb1 - t0);
  // The previous tile is fully consumed (and, on the first tile, qsum_tg is written).
  threadgroup_barrier(mem_flags::mem_threadgroup);
  {
    const device uint* kc = k_codes + code_base + size_t(t0) * W;
    const device uint* vc = v_codes + code_base + size_t(t0) * W;
    for (int idx = tid; idx < nk * W; idx += NT) {
      const int key = idx / W;
      k_tg[key * KSTRIDE + (idx - key * W)] = kc[idx];
      v_tg[idx] = vc[idx];
    }
    const size_t sb = sb_base + size_t(t0) * NG;
    for (int idx = tid; idx < nk * NG; idx += NT) {
      ks_tg[idx] = float(k_scales[sb + idx]);
      kb_tg[idx] = float(k_biases[sb + idx]);
      vs_tg[idx] = float(v_scales[sb + idx]);
      vb_tg[idx] = float(v_biases[sb + idx]);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Scores: lane = key of the tile; q . (s*c + b) = s * (q . c) + b * sum(q) per group.
  float score[RPS];
  for (int j = 0; j < RPS; j++) {
    score[j] = 0.0f;
  }
  if (lane < nk) {
    const threadgroup uint* krow = k_tg + lane * KSTRIDE;
    for (int grp = 0; grp < NG; grp++) {
      float acc[RPS];
      for (int j = 0; j < RPS; j++) {
        acc[j] = 0.0f;
      }
      for (int wi = 0; wi < WPG; wi++) {
        const uint word = krow[grp * WPG + wi];
        const int q4 = (grp * GS + wi * EPW) / 4;  // float4 index of the word's first element
        if (BITS == 4) {
          const float4 c0 = float4(float(word & 0xfu), float((word >> 4) & 0xfu),
                                   float((word >> 8) & 0xfu), float((word >> 12) & 0xfu));
          const float4 c1 = float4(float((word >> 16) & 0xfu), float((word >> 20) & 0xfu),
                                   float((word >> 24) & 0xfu), float(word >> 28));
          for (int j = 0; j < RPS; j++) {
            if (active[j]) {
              const int qb = (sg * RPS + j) * (D / 4) + q4;
              acc[j] += dot(q_tg[qb], c0) + dot(q_tg[qb + 1], c1);
            }
          }
        } else {
          const float4 c0 = float4(float(word & 0xffu), float((word >> 8) & 0xffu),
                                   float((word >> 16) & 0xffu), float(word >> 24));
          for (int j = 0; j < RPS; j++) {
            if (active[j]) {
              acc[j] += dot(q_tg[(sg * RPS + j) * (D / 4) + q4], c0);
            }
          }
        }
      }
      const float s = ks_tg[lane * NG + grp];
      const float bias = kb_tg[lane * NG + grp];
      for (int j = 0; j < RPS; j++) {
        if (active[j]) {
          score[j] += s * acc[j] + bias * qsum_tg[(sg * RPS + j) * NG + grp];
        }
      }
    }
  }

  // Online softmax over the tile (log2 domain), one row at a time.
  for (int j = 0; j < RPS; j++) {
    if (active[j]) {
      const bool visible = lane < nk && t0 + lane < lim[j];
      const float s = visible ? score[j] : NEG;
      const float m_new = max(m[j], simd_max(s));
      const float factor = fast::exp2(m[j] - m_new);
      const float p = visible ? fast::exp2(s - m_new) : 0.0f;
      l[j] = l[j] * factor + simd_sum(p);
      m[j] = m_new;
      for (int x = 0; x < EPL; x++) {
        o[j][x] *= factor;
      }
      p_tg[(sg * RPS + j) * TK + lane] = p;
    }
  }
  // p_tg rows are written and read by the same simdgroup only.
  simdgroup_barrier(mem_flags::mem_threadgroup);

  // Values: each lane dequantizes its D/32 elements of the V row once for all its rows.
  for (int k = 0; k < nk; k++) {
    float val[EPL];
    for (int x = 0; x < EPL; x++) {
      const int e = lane * EPL + x;
      const uint word = v_tg[k * W + e / EPW];
      const float c = float((word >> ((e % EPW) * BITS)) & CODE_MASK);
      val[x] = c * vs_tg[k * NG + e / GS] + vb_tg[k * NG + e / GS];
    }
    for (int j = 0; j < RPS; j++) {
      if (active[j]) {
        const float p = p_tg[(sg * RPS + j) * TK + k];
        for (int x = 0; x < EPL; x++) {
          o[j][x] += p * val[x];
        }
      }
    }
  }
}

for (int j = 0; j < RPS; j++) {
  if (active[j]) {
    const size_t row = row0 + sg * RPS + j;
    if (SINGLE) {
      const float inv = 1.0f / l[j];
      for (int x = 0; x < EPL; x++) {
        out[row * D + lane * EPL + x] = static_cast<T>(o[j][x] * inv);
      }
    } else {
      const size_t part = row * n_blocks + blk;
      for (int x = 0; x < EPL; x++) {
        o_part[part * D + lane * EPL + x] = o[j][x];
      }
      if (lane == 0) {
        ml_part[part * 2] = m[j];
        ml_part[part * 2 + 1] = l[j];
      }
    }
  }
}
