// hadamard.h: the randomized Hadamard rotation shared by the KV kernels, on values spread
// over a simdgroup: lane owns elements [lane * EPL, lane * EPL + EPL) of a D-vector
// (EPL = D / 32, D a power of two). Sylvester ordering, the same matrix as MLX's
// hadamard_transform: butterflies (a, b) -> (a + b, a - b) on pairs (e, e + h), in-lane
// for h < EPL and by simd_shuffle_xor across lanes above. Every lane of the simdgroup must
// call it (uniform control flow). Cost: D/32 * log2(D) adds per lane, log2(32) shuffles
// per element.

template <int EPL, int D>
inline void hadamard_in_simdgroup(thread float* v, int lane) {
  for (int h = 1; h < EPL; h *= 2) {
    for (int x = 0; x < EPL; x++) {
      if ((x & h) == 0) {
        const float a = v[x];
        const float c = v[x + h];
        v[x] = a + c;
        v[x + h] = a - c;
      }
    }
  }
  for (int h = EPL; h < D; h *= 2) {
    const ushort mask = ushort(h / EPL);
    const bool upper = (lane & int(mask)) != 0;
    for (int x = 0; x < EPL; x++) {
      const float other = simd_shuffle_xor(v[x], mask);
      v[x] = upper ? other - v[x] : v[x] + other;
    }
  }
  const float norm = rsqrt(float(D));
  for (int x = 0; x < EPL; x++) {
    v[x] *= norm;
  }
}
