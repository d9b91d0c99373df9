// The parts of MLX's kernels/utils.h that metal_kernel bodies can use (MLX prepends that file to
// every custom kernel): element-to-location indexing, Limits, ceildiv, WorkPerThread.
// Written from its documented behaviour; see mlx/backend/metal/kernels/utils.h.
#pragma once

template <typename U> struct WorkPerThread {
  static_assert(sizeof(U) <= 8, "Type too large");
  static constexpr int n = 8 / sizeof(U);
};

template <typename U> struct Limits {
  static constexpr U max = std::numeric_limits<U>::max();
  static constexpr U min = std::numeric_limits<U>::min();
  static constexpr U finite_max = std::numeric_limits<U>::max();
  static constexpr U finite_min = std::numeric_limits<U>::min();
};
template <> struct Limits<float> {
  static constexpr float max = __builtin_inff();
  static constexpr float min = -__builtin_inff();
  static constexpr float finite_max = 3.402823466e+38F;
  static constexpr float finite_min = -3.402823466e+38F;
};
template <> struct Limits<half> {
  static constexpr half max = static_cast<half>(__builtin_inff());
  static constexpr half min = static_cast<half>(-__builtin_inff());
  static constexpr half finite_max = static_cast<half>(65504.0f);
  static constexpr half finite_min = static_cast<half>(-65504.0f);
};
template <> struct Limits<bfloat> {
  static inline const bfloat max = bfloat(__builtin_inff());
  static inline const bfloat min = bfloat(-__builtin_inff());
  static inline const bfloat finite_max = metal::numeric_limits<bfloat>::max();
  static inline const bfloat finite_min = metal::numeric_limits<bfloat>::lowest();
};
template <> struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};

// Location of element `elem` (row-major index) of an array with the given shape and strides.
template <typename IdxT = int64_t, typename Shape, typename Strides>
inline IdxT elem_to_loc(IdxT elem, const Shape& shape, const Strides& strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename IdxT = int64_t, typename Shape, typename Strides>
inline IdxT elem_to_loc(uint3 elem, const Shape& shape, const Strides& strides, int ndim) {
  IdxT loc = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}
template <typename IdxT = int64_t> inline IdxT elem_to_loc_1(uint elem, const int64_t& stride) {
  return elem * IdxT(stride);
}
template <typename IdxT = int64_t, typename Strides> inline IdxT elem_to_loc_2(uint2 elem, const Strides& strides) {
  return elem.x * IdxT(strides[1]) + elem.y * IdxT(strides[0]);
}
template <typename IdxT = int64_t, typename Strides> inline IdxT elem_to_loc_3(uint3 elem, const Strides& strides) {
  return elem.x * IdxT(strides[2]) + elem.y * IdxT(strides[1]) + elem.z * IdxT(strides[0]);
}

template <typename T, typename U> inline T ceildiv(T N, U M) { return (N + M - 1) / M; }

template <bool condition, typename T, typename U> struct ConditionalType { using type = U; };
template <typename T, typename U> struct ConditionalType<true, T, U> { using type = T; };
