// segmented_decode_attention.metal: pass 1 of flash-decoding over the int4/int8 KV cache's
// three segments, [fp16 sink | int4 store | fp16 window], for 1-8 query tokens.
// decode_merge.metal (pass 2) merges the blocks and undoes the value rotation.
//
// Template: T (query dtype), D (head dim), BITS (4|8, the values'), KBITS (4|8, the keys':
//   BITS unless the config sets key_bits), GS (group size), G (query heads per
//   KV head), LQ (query tokens), RT (query rows per threadgroup), NSG (simdgroups per
//   threadgroup), LPK (lanes per key: 1, 2, 4 or 8), ROTATE (rotate the queries by
//   R = diag(signs) H / sqrt(D) as they are loaded; D a power of two), CENTER (add the
//   store's key centers), CENTER_BLOCK (store rows per center, kv_layout.py's).
// Inputs:  queries (B, Hq, LQ, D) T;
//          store   (B, Hkv, cap, ROW) uint32: one packed row per token from position `sink`
//                  on (kv_append.metal's q_rows layout; row i = position sink + i);
//          fp      (B, Hkv, fcap, 2D) half: slots [0, sink) hold the first tokens, slots
//                  [sink, sink + recent) a ring of the newest ones (position p in slot
//                  sink + (p - sink) % recent), each slot [key | value];
//          centers (B, Hkv, ncb, D) half: the key center of each CENTER_BLOCK store rows
//                  (read only when CENTER);
//          signs   (D) float; lens (B, 2) int32 = {tokens n, window tokens n_w} per sequence;
//          params  int32[10] = {cap, fcap, sink, recent, block, nb_q, n_blocks, n_chunks,
//                  Hkv, ncb};
//          scale   float[1].
// Outputs: o_part (B*Hq*LQ, n_blocks, D) T, the block's normalized output; ml_part
//          (..., n_blocks, 2) float: block max (log2 units) and sum.
// Segments of sequence b: sink = positions [0, min(n, sink)) from fp slots; store rows
//   [0, n_q), n_q = n - sink - n_w (positions [sink, n - n_w)); window = positions
//   [n - n_w, n) from the ring. Query token t sees positions <= n - LQ + t.
//
// Grid: threadgroup (blk, hkv, b * n_chunks + chunk). Blocks [0, nb_q) cover `block` store
//   rows each, blocks [nb_q, n_blocks) `block` fp slots each (the sink and the ring, masked
//   by position). A threadgroup serves up to RT of the G*LQ query rows that share its KV
//   head, so each K/V row is read once per step for all of them.
// Simdgroup: the NSG simdgroups of a threadgroup take turns over steps of KPS = 32/LPK keys
//   (step s goes to simdgroup s % NSG) and merge once at the end through threadgroup memory:
//   no barrier in the key loop. In a step, LPK lanes share one key: each reads W/LPK code
//   words of the key row straight from device memory (contiguous), multiplies them with the
//   queries held in threadgroup memory (broadcast reads), and the LPK partial scores meet by
//   simd_shuffle_xor. 4-bit codes are never shifted: the queries are pre-scaled by
//   16^-(i%8) and each code is read as word & (0xf << 4x), so a code costs one AND, one
//   convert and one FMA per query row; per group the score gets scale * acc + bias * sum(q).
//   CENTER: a step's keys lie in one center block (KPS divides CENTER_BLOCK, steps are
//   aligned), so each row's score gets q . center once per step: D/32 FMAs per lane and a
//   simd_sum (the queries' pre-scale undone by exact powers of two).
//   Online softmax in log2 units (exp2), fp32 throughout. Values: lane = D/32 output
//   elements; for each key of the step the probability comes by simd_shuffle from the
//   key's lane, the lane dequantizes its slice of the value row (coalesced across lanes).
// Launch (plan_decode in mlxq/kernels/decode_attention.py, NSG = 4, ~1,000 simdgroups):
//   Llama-3-8B heads (32q/8kv, d128) at 4K keys: 33 blocks x 8 heads = 264 threadgroups,
//   1,056 simdgroups, LPK 1; at 32K: 33 x 8 = 264, 1,056 simdgroups; the default model
//   (9q/3kv, d64) at 1K: 65 x 3 = 195 threadgroups, 780 simdgroups, LPK 8.
// Bytes read per (sequence, KV head): n_q * ROW * 4 (int4 d128 g64: 136 per token, 0.27x
//   of fp16's 512; d64: 68 of 256; CENTER: + 2D per CENTER_BLOCK rows) + fp slots * 4D + per threadgroup RT*D*sizeof(T) of queries; written:
//   rows * n_blocks * (D * sizeof(T) + 8) partials.
// ALU per cached element (4-bit keys, per query row): AND + convert + FMA; per group +2 FMA.

constexpr int EPL = D / 32;          // output elements per lane
constexpr int EPW = 32 / KBITS;      // key codes per uint32
constexpr int W = D / EPW;           // code words per row of keys
constexpr int VEPW = 32 / BITS;      // value codes per uint32
constexpr int WV = D / VEPW;         // code words per row of values
constexpr int NG = D / GS;           // groups per row
constexpr int WPG = GS / EPW;        // key words per group
constexpr int KMH = meta_halves_per_group(KBITS);  // metadata halves per key group (kv_row.h)
constexpr int VMH = meta_halves_per_group(BITS);   // ... per value group
constexpr int ROW = W + WV + meta_row_words(NG, KBITS, BITS);  // words per stored token
constexpr int KPS = 32 / LPK;        // keys per simdgroup step
constexpr int WL = W / LPK;          // key code words per lane (store)
constexpr int DL = D / LPK;          // key elements per lane (fp slots)
constexpr int NR = G * LQ;           // query rows per KV head
constexpr uint CODE_MASK = (1u << KBITS) - 1u;
constexpr uint VALUE_MASK = (1u << BITS) - 1u;
// Finite "minus infinity": keeps exp2 arguments finite (no inf - inf) in any math mode.
constexpr float NEG = -1.0e30f;

threadgroup float q_tg[RT * D];
threadgroup float qsum_tg[RT * NG];
threadgroup float merge_tg[NSG * RT * (D + 2)];

const int cap = params[0];
const int fcap = params[1];
const int sink = params[2];
const int recent = params[3];
const int block = params[4];
const int nb_q = params[5];
const int n_blocks = params[6];
const int n_chunks = params[7];
const int n_kv = params[8];
const int ncb = params[9];

const int blk = int(threadgroup_position_in_grid.x);
const int hkv = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z) / n_chunks;
const int chunk = int(threadgroup_position_in_grid.z) % n_chunks;
const int sg = int(simdgroup_index_in_threadgroup);
const int lane = int(thread_index_in_simdgroup);
const int tid = sg * 32 + lane;

const int n = lens[2 * b];
const int n_w = lens[2 * b + 1];
const int n_s = min(n, sink);
const int n_q = max(0, n - sink - n_w);
const bool quant = blk < nb_q;
const int k0 = quant ? blk * block : (blk - nb_q) * block;
const int k1 = quant ? min(k0 + block, n_q) : min(k0 + block, min(fcap, sink + recent));

const int r0 = chunk * RT;
const int nrows = min(RT, NR - r0);
const size_t slab = size_t(b) * n_kv + hkv;  // (sequence, KV head)
const size_t row0 = slab * NR + r0;          // flat (b, h, t) index of local row 0

// Queries -> threadgroup memory: rotated, times softmax scale * log2(e) (scores in log2).
const float qscale = scale[0] * 1.44269504088896341f;
for (int j = sg; j < nrows; j += NSG) {
  float v[EPL];
  for (int x = 0; x < EPL; x++) {
    v[x] = float(queries[(row0 + j) * D + lane * EPL + x]) * qscale;
  }
  if (ROTATE) {
    for (int x = 0; x < EPL; x++) {
      v[x] *= signs[lane * EPL + x];
    }
    hadamard_in_simdgroup<EPL, D>(v, lane);
  }
  for (int x = 0; x < EPL; x++) {
    q_tg[j * D + lane * EPL + x] = v[x];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (quant) {
  // sum(q) per group for the bias term, then the keys' 16^-(i%8) (int8: 256^-(i%4)) pre-scale.
  for (int idx = tid; idx < nrows * NG; idx += NSG * 32) {
    const threadgroup float* qg = q_tg + (idx / NG) * D + (idx % NG) * GS;
    float s = 0.0f;
    for (int i = 0; i < GS; i++) {
      s += qg[i];
    }
    qsum_tg[idx] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int idx = tid; idx < nrows * D; idx += NSG * 32) {
    q_tg[idx] *= exp2(-float(KBITS * (idx % EPW)));
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// Per-row state of this simdgroup (uniform across lanes except o).
float m[RT];
float l[RT];
float o[RT][EPL];
int lim[RT];
for (int j = 0; j < RT; j++) {
  m[j] = NEG;
  l[j] = 0.0f;
  lim[j] = n - LQ + (r0 + j) % LQ;
  for (int x = 0; x < EPL; x++) {
    o[j][x] = 0.0f;
  }
}

// q . center reads the pre-scaled queries: these undo the 16^-(i%8) (256^-(i%4)) factors.
float unscale[EPL];
for (int x = 0; x < EPL; x++) {
  unscale[x] = exp2(float(KBITS * ((lane * EPL + x) % EPW)));
}

const int sub = lane % LPK;
const int top_rel = max(n - 1 - sink, 0) % max(recent, 1);  // ring slot of the newest token
for (int s0 = k0 + sg * KPS; s0 < k1; s0 += NSG * KPS) {
  const int key = s0 + lane / LPK;
  const bool in_range = key < k1;
  // The key's position; -1 when the slot holds nothing this sequence may see.
  int pos = -1;
  if (quant) {
    pos = sink + key;
  } else if (key < sink) {
    pos = key < n_s ? key : -1;
  } else if (recent > 0) {
    const int p = n - 1 - ((top_rel - (key - sink) + recent) % recent);
    pos = (p >= sink && p >= n - n_w) ? p : -1;
  }
  float score[RT];
  for (int j = 0; j < RT; j++) {
    score[j] = 0.0f;
  }
  if (in_range && pos >= 0) {
    if (quant) {
      const device uint* krow = store + (slab * cap + key) * ROW;
      for (int wi = sub * WL; wi < (sub + 1) * WL; wi++) {
        const uint word = krow[wi];
        const int g = wi / WPG;
        const float2 sb = group_scale_bias<KBITS>(krow + W + WV, g * KMH);
        const float ks = sb.x;
        const float kb = (wi % WPG == 0) ? sb.y : 0.0f;
        for (int j = 0; j < RT; j++) {
          if (j < nrows) {
            const threadgroup float* qp = q_tg + j * D + wi * EPW;
            float acc = 0.0f;
            for (int x = 0; x < EPW; x++) {
              acc += qp[x] * float(word & (CODE_MASK << (x * KBITS)));
            }
            score[j] += ks * acc + kb * qsum_tg[j * NG + g];
          }
        }
      }
    } else {
      const device half* krow = fp + (slab * fcap + key) * (2 * D) + sub * DL;
      for (int e = 0; e < DL; e++) {
        const float kv = float(krow[e]);
        for (int j = 0; j < RT; j++) {
          if (j < nrows) {
            score[j] += q_tg[j * D + sub * DL + e] * kv;
          }
        }
      }
    }
  }
  for (ushort off = 1; off < ushort(LPK); off *= 2) {
    for (int j = 0; j < RT; j++) {
      score[j] += simd_shuffle_xor(score[j], off);
    }
  }
  if (CENTER && quant) {
    // Uniform across the simdgroup: every lane takes part in the simd_sum.
    const device half* crow = centers + (slab * ncb + s0 / CENTER_BLOCK) * D + lane * EPL;
    float cv[EPL];
    for (int x = 0; x < EPL; x++) {
      cv[x] = float(crow[x]) * unscale[x];
    }
    for (int j = 0; j < RT; j++) {
      if (j < nrows) {
        float t = 0.0f;
        for (int x = 0; x < EPL; x++) {
          t += q_tg[j * D + lane * EPL + x] * cv[x];
        }
        score[j] += simd_sum(t);
      }
    }
  }

  // Online softmax over the step's keys, one row at a time.
  float p[RT];
  for (int j = 0; j < RT; j++) {
    const bool visible = j < nrows && in_range && pos >= 0 && pos <= lim[j];
    const float s = visible ? score[j] : NEG;
    const float m_new = max(m[j], simd_max(s));
    const float factor = fast::exp2(m[j] - m_new);
    p[j] = visible ? fast::exp2(s - m_new) : 0.0f;
    l[j] = l[j] * factor + simd_sum(sub == 0 ? p[j] : 0.0f);
    m[j] = m_new;
    for (int x = 0; x < EPL; x++) {
      o[j][x] *= factor;
    }
  }

  // Values: every lane accumulates its D/32 elements for each key of the step.
  for (int k = 0; k < KPS; k++) {
    const int key_k = s0 + k;
    if (key_k >= k1) {
      break;
    }
    float pk[RT];
    for (int j = 0; j < RT; j++) {
      pk[j] = simd_shuffle(p[j], ushort(k * LPK));
    }
    float val[EPL];
    if (quant) {
      const device uint* vrow = store + (slab * cap + key_k) * ROW;
      for (int x = 0; x < EPL; x++) {
        const int e = lane * EPL + x;
        const uint word = vrow[W + e / VEPW];
        const float2 sb = group_scale_bias<BITS>(vrow + W + WV, NG * KMH + (e / GS) * VMH);
        const float c = float((word >> ((e % VEPW) * BITS)) & VALUE_MASK);
        val[x] = c * sb.x + sb.y;
      }
    } else {
      const device half* vrow = fp + (slab * fcap + key_k) * (2 * D) + D;
      for (int x = 0; x < EPL; x++) {
        val[x] = float(vrow[lane * EPL + x]);
      }
    }
    for (int j = 0; j < RT; j++) {
      for (int x = 0; x < EPL; x++) {
        o[j][x] += pk[j] * val[x];
      }
    }
  }
}

// Merge the NSG simdgroups' partials once, through threadgroup memory.
for (int j = 0; j < nrows; j++) {
  threadgroup float* mt = merge_tg + (sg * RT + j) * (D + 2);
  for (int x = 0; x < EPL; x++) {
    mt[lane * EPL + x] = o[j][x];
  }
  if (lane == 0) {
    mt[D] = m[j];
    mt[D + 1] = l[j];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int j = sg; j < nrows; j += NSG) {
  float M = NEG;
  for (int s = 0; s < NSG; s++) {
    M = max(M, merge_tg[(s * RT + j) * (D + 2) + D]);
  }
  float L = 0.0f;
  float acc[EPL];
  for (int x = 0; x < EPL; x++) {
    acc[x] = 0.0f;
  }
  for (int s = 0; s < NSG; s++) {
    const threadgroup float* mt = merge_tg + (s * RT + j) * (D + 2);
    const float w = fast::exp2(mt[D] - M);
    L += mt[D + 1] * w;
    for (int x = 0; x < EPL; x++) {
      acc[x] += mt[lane * EPL + x] * w;
    }
  }
  // Normalized, so the partial has the values' range and fits the output dtype (half on
  // the GPU: half the partial traffic); an empty block writes zeros with l = 0.
  const float inv = L > 0.0f ? 1.0f / L : 0.0f;
  const size_t part = (row0 + j) * n_blocks + blk;
  for (int x = 0; x < EPL; x++) {
    o_part[part * D + lane * EPL + x] = static_cast<T>(acc[x] * inv);
  }
  if (lane == 0) {
    ml_part[part * 2] = M;
    ml_part[part * 2 + 1] = L;
  }
}
