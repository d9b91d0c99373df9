// Metal Shading Language as C++17: the types, functions and MLX kernel utilities that
// mx.fast.metal_kernel bodies use, so MLX's generated kernel text compiles with g++.
//
// Deliberately no <cmath>: its global ::exp/::max overloads would make calls ambiguous under
// `using namespace metal`. Math goes through __builtin_* (libm).
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <limits>
#include <type_traits>

#include "mlxq_runtime.h"

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;

// bfloat: storage type with round-to-nearest-even conversion; arithmetic happens in float.
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  static uint16_t from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
  template <class T, class = std::enable_if_t<std::is_arithmetic<T>::value || std::is_same<T, half>::value>>
  bfloat(T v) : bits(from_float(static_cast<float>(v))) {}
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  template <class T> bfloat& operator+=(T v) { return *this = bfloat(float(*this) + float(v)); }
  template <class T> bfloat& operator-=(T v) { return *this = bfloat(float(*this) - float(v)); }
  template <class T> bfloat& operator*=(T v) { return *this = bfloat(float(*this) * float(v)); }
  template <class T> bfloat& operator/=(T v) { return *this = bfloat(float(*this) / float(v)); }
  bfloat operator-() const { return bfloat(-float(*this)); }
};
typedef bfloat bfloat16_t;
typedef half float16_t;

// The `h` literal suffix (1.0h) of Metal.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wliteral-suffix"
constexpr half operator"" h(long double v) { return static_cast<half>(v); }
#pragma GCC diagnostic pop

namespace metal {

template <class T> struct is_scalar_num : std::integral_constant<bool, std::is_arithmetic<T>::value ||
                                               std::is_same<T, half>::value || std::is_same<T, bfloat>::value> {};
template <class T> struct is_float_num : std::integral_constant<bool, std::is_floating_point<T>::value ||
                                               std::is_same<T, half>::value || std::is_same<T, bfloat>::value> {};

// ---------------------------------------------------------------- vectors
template <class T, int N> struct vec;

// A swizzle (.xy, .zyx, ...) aliases the vector's storage; reading converts to vec<T, sizeof...(I)>.
template <class T, int N, int... I> struct swizzle {
  static constexpr int K = sizeof...(I);
  T d[N == 3 ? 4 : N];
  operator vec<T, K>() const { return vec<T, K>(d[I]...); }
  swizzle& operator=(const vec<T, K>& v) {
    const int idx[K] = {I...};
    T tmp[K];
    for (int k = 0; k < K; ++k) tmp[k] = v[k];
    for (int k = 0; k < K; ++k) d[idx[k]] = tmp[k];
    return *this;
  }
  swizzle& operator=(const swizzle& o) { return *this = vec<T, K>(o); }
  template <class U, class = std::enable_if_t<is_scalar_num<U>::value>>
  swizzle& operator=(U s) { return *this = vec<T, K>(static_cast<T>(s)); }
};

}  // namespace metal
#include "metal_swizzles.h"
namespace metal {

template <class T, int N> struct vec_storage;
template <class T> struct alignas(2 * sizeof(T)) vec_storage<T, 2> {
  union {
    T d[2];
    struct { T x, y; };
    struct { T r, g; };
    MLXQ_SWIZZLES_2
  };
};
template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 3> {  // Metal: a 3-vector is as big as a 4-vector
  union {
    T d[4];
    struct { T x, y, z; };
    struct { T r, g, b; };
    MLXQ_SWIZZLES_3
  };
};
template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 4> {
  union {
    T d[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    MLXQ_SWIZZLES_4
  };
};

template <class X> struct vtraits { static constexpr bool is = false; static constexpr int n = 1; using E = X; };
template <class T, int N> struct vtraits<vec<T, N>> { static constexpr bool is = true; static constexpr int n = N; using E = T; };
template <class T, int N, int... I> struct vtraits<swizzle<T, N, I...>> {
  static constexpr bool is = true; static constexpr int n = sizeof...(I); using E = T;
};
template <class X> using vtraits_of = vtraits<std::remove_cv_t<std::remove_reference_t<X>>>;

template <class T, int N> struct vec : vec_storage<T, N> {
  using value_type = T;
  vec() = default;
  vec(const vec&) = default;
  vec& operator=(const vec& o) {
    memcpy(this->d, o.d, sizeof(T) * N);
    return *this;
  }
  // Broadcast a scalar.
  template <class U, class = std::enable_if_t<is_scalar_num<U>::value>>
  vec(U s) { for (int i = 0; i < N; ++i) this->d[i] = static_cast<T>(s); }
  // Convert from a vector (or swizzle) of another element type.
  template <class V, class = std::enable_if_t<vtraits_of<V>::is && vtraits_of<V>::n == N>, class = void>
  explicit vec(const V& v) {
    vec<typename vtraits_of<V>::E, N> t = v;
    for (int i = 0; i < N; ++i) this->d[i] = static_cast<T>(t.d[i]);
  }
  template <class U, int M, int... I, class = std::enable_if_t<sizeof...(I) == N>>
  vec(const swizzle<U, M, I...>& s) : vec(vec<U, N>(s.d[I]...)) {}
  // Concatenate scalars and vectors: float4(a.xy, 1, 2).
  template <class A, class B, class... R>
  vec(const A& a, const B& b, const R&... r) {
    int i = 0;
    put(i, a);
    put(i, b);
    (put(i, r), ...);
  }
  T& operator[](size_t i) { return this->d[i]; }
  const T& operator[](size_t i) const { return this->d[i]; }

 private:
  template <class A> void put(int& i, const A& a) {
    if constexpr (vtraits_of<A>::is) {
      vec<typename vtraits_of<A>::E, vtraits_of<A>::n> v = a;
      for (int k = 0; k < vtraits_of<A>::n; ++k) this->d[i++] = static_cast<T>(v.d[k]);
    } else {
      this->d[i++] = static_cast<T>(a);
    }
  }
};

// Turns a vector, swizzle or scalar into vec<E, N>.
template <class E, int N, class X> inline vec<E, N> as_vec(const X& x) {
  if constexpr (vtraits_of<X>::is) {
    vec<typename vtraits_of<X>::E, N> v = x;
    return vec<E, N>(v);
  } else {
    return vec<E, N>(static_cast<E>(x));
  }
}

template <class A, class B> struct binop {
  static constexpr bool any_vec = vtraits_of<A>::is || vtraits_of<B>::is;
  static constexpr int n = vtraits_of<A>::is ? vtraits_of<A>::n : vtraits_of<B>::n;
  using E = std::conditional_t<vtraits_of<A>::is, typename vtraits_of<A>::E, typename vtraits_of<B>::E>;
};

#define MLXQ_VEC_BINOP(OP)                                                                      \
  template <class A, class B, class P = binop<A, B>, class = std::enable_if_t<P::any_vec>>     \
  inline vec<typename P::E, P::n> operator OP(const A& a, const B& b) {                         \
    vec<typename P::E, P::n> x = as_vec<typename P::E, P::n>(a), y = as_vec<typename P::E, P::n>(b), r; \
    for (int i = 0; i < P::n; ++i) r.d[i] = static_cast<typename P::E>(x.d[i] OP y.d[i]);     \
    return r;                                                                                   \
  }                                                                                             \
  template <class T, int N, class B> inline vec<T, N>& operator OP##=(vec<T, N>& a, const B& b) { \
    return a = a OP b;                                                                          \
  }
MLXQ_VEC_BINOP(+)
MLXQ_VEC_BINOP(-)
MLXQ_VEC_BINOP(*)
MLXQ_VEC_BINOP(/)
MLXQ_VEC_BINOP(%)
MLXQ_VEC_BINOP(&)
MLXQ_VEC_BINOP(|)
MLXQ_VEC_BINOP(^)
MLXQ_VEC_BINOP(<<)
MLXQ_VEC_BINOP(>>)
#undef MLXQ_VEC_BINOP

#define MLXQ_VEC_CMP(OP)                                                                        \
  template <class A, class B, class P = binop<A, B>, class = std::enable_if_t<P::any_vec>>     \
  inline vec<bool, P::n> operator OP(const A& a, const B& b) {                                  \
    vec<typename P::E, P::n> x = as_vec<typename P::E, P::n>(a), y = as_vec<typename P::E, P::n>(b); \
    vec<bool, P::n> r;                                                                          \
    for (int i = 0; i < P::n; ++i) r.d[i] = x.d[i] OP y.d[i];                                   \
    return r;                                                                                   \
  }
MLXQ_VEC_CMP(==)
MLXQ_VEC_CMP(!=)
MLXQ_VEC_CMP(<)
MLXQ_VEC_CMP(<=)
MLXQ_VEC_CMP(>)
MLXQ_VEC_CMP(>=)
MLXQ_VEC_CMP(&&)
MLXQ_VEC_CMP(||)
#undef MLXQ_VEC_CMP

template <class T, int N> inline vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.d[i] = static_cast<T>(-a.d[i]);
  return r;
}
template <class T, int N> inline vec<T, N> operator+(const vec<T, N>& a) { return a; }
template <class T, int N> inline vec<T, N> operator~(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.d[i] = static_cast<T>(~a.d[i]);
  return r;
}
template <class T, int N> inline vec<bool, N> operator!(const vec<T, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r.d[i] = !a.d[i];
  return r;
}

template <class X, class = std::enable_if_t<vtraits_of<X>::is>> inline bool all(const X& x) {
  vec<typename vtraits_of<X>::E, vtraits_of<X>::n> v = x;
  for (int i = 0; i < vtraits_of<X>::n; ++i) if (!v.d[i]) return false;
  return true;
}
template <class X, class = std::enable_if_t<vtraits_of<X>::is>> inline bool any(const X& x) {
  vec<typename vtraits_of<X>::E, vtraits_of<X>::n> v = x;
  for (int i = 0; i < vtraits_of<X>::n; ++i) if (v.d[i]) return true;
  return false;
}
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }

// ---------------------------------------------------------------- scalar and elementwise math
// Float math on half/bfloat computes in float and rounds back, which is what Metal's half
// functions return to within their ulp bounds.
#define MLXQ_UNARY_FLOAT(NAME, EXPR)                                                     \
  template <class T, class = std::enable_if_t<is_float_num<T>::value>>                 \
  inline T NAME(T x_) { float x = static_cast<float>(x_); return static_cast<T>(EXPR); } \
  template <class X, class = std::enable_if_t<vtraits_of<X>::is>, class = void>         \
  inline vec<typename vtraits_of<X>::E, vtraits_of<X>::n> NAME(const X& v_) {           \
    vec<typename vtraits_of<X>::E, vtraits_of<X>::n> v = v_;                            \
    for (int i = 0; i < vtraits_of<X>::n; ++i) v.d[i] = NAME(v.d[i]);                   \
    return v;                                                                           \
  }

MLXQ_UNARY_FLOAT(exp, __builtin_expf(x))
MLXQ_UNARY_FLOAT(exp2, __builtin_exp2f(x))
MLXQ_UNARY_FLOAT(exp10, __builtin_powf(10.0f, x))
MLXQ_UNARY_FLOAT(expm1, __builtin_expm1f(x))
MLXQ_UNARY_FLOAT(log, __builtin_logf(x))
MLXQ_UNARY_FLOAT(log2, __builtin_log2f(x))
MLXQ_UNARY_FLOAT(log10, __builtin_log10f(x))
MLXQ_UNARY_FLOAT(log1p, __builtin_log1pf(x))
MLXQ_UNARY_FLOAT(sqrt, __builtin_sqrtf(x))
MLXQ_UNARY_FLOAT(rsqrt, 1.0f / __builtin_sqrtf(x))
MLXQ_UNARY_FLOAT(cbrt, __builtin_cbrtf(x))
MLXQ_UNARY_FLOAT(sin, __builtin_sinf(x))
MLXQ_UNARY_FLOAT(cos, __builtin_cosf(x))
MLXQ_UNARY_FLOAT(tan, __builtin_tanf(x))
MLXQ_UNARY_FLOAT(asin, __builtin_asinf(x))
MLXQ_UNARY_FLOAT(acos, __builtin_acosf(x))
MLXQ_UNARY_FLOAT(atan, __builtin_atanf(x))
MLXQ_UNARY_FLOAT(sinh, __builtin_sinhf(x))
MLXQ_UNARY_FLOAT(cosh, __builtin_coshf(x))
MLXQ_UNARY_FLOAT(tanh, __builtin_tanhf(x))
MLXQ_UNARY_FLOAT(asinh, __builtin_asinhf(x))
MLXQ_UNARY_FLOAT(acosh, __builtin_acoshf(x))
MLXQ_UNARY_FLOAT(atanh, __builtin_atanhf(x))
MLXQ_UNARY_FLOAT(erf, __builtin_erff(x))
MLXQ_UNARY_FLOAT(erfc, __builtin_erfcf(x))
MLXQ_UNARY_FLOAT(floor, __builtin_floorf(x))
MLXQ_UNARY_FLOAT(ceil, __builtin_ceilf(x))
MLXQ_UNARY_FLOAT(round, __builtin_roundf(x))
MLXQ_UNARY_FLOAT(rint, __builtin_rintf(x))
MLXQ_UNARY_FLOAT(trunc, __builtin_truncf(x))
MLXQ_UNARY_FLOAT(fabs, __builtin_fabsf(x))
MLXQ_UNARY_FLOAT(fract, x - __builtin_floorf(x))
MLXQ_UNARY_FLOAT(saturate, x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x))
MLXQ_UNARY_FLOAT(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f))
#undef MLXQ_UNARY_FLOAT

#define MLXQ_BINARY_FLOAT(NAME, EXPR)                                                          \
  template <class A, class B, class = std::enable_if_t<is_float_num<A>::value || is_float_num<B>::value>, \
            class = std::enable_if_t<!vtraits_of<A>::is && !vtraits_of<B>::is>>              \
  inline auto NAME(A a_, B b_) {                                                              \
    using T = std::conditional_t<is_float_num<A>::value, A, B>;                               \
    float x = static_cast<float>(a_), y = static_cast<float>(b_);                             \
    return static_cast<T>(EXPR);                                                              \
  }                                                                                           \
  template <class A, class B, class P = binop<A, B>, class = std::enable_if_t<P::any_vec>, class = void> \
  inline vec<typename P::E, P::n> NAME(const A& a_, const B& b_) {                            \
    vec<typename P::E, P::n> a = as_vec<typename P::E, P::n>(a_), b = as_vec<typename P::E, P::n>(b_); \
    for (int i = 0; i < P::n; ++i) a.d[i] = NAME(a.d[i], b.d[i]);                             \
    return a;                                                                                 \
  }
MLXQ_BINARY_FLOAT(pow, __builtin_powf(x, y))
MLXQ_BINARY_FLOAT(powr, __builtin_powf(x, y))
MLXQ_BINARY_FLOAT(atan2, __builtin_atan2f(x, y))
MLXQ_BINARY_FLOAT(fmod, __builtin_fmodf(x, y))
MLXQ_BINARY_FLOAT(copysign, __builtin_copysignf(x, y))
MLXQ_BINARY_FLOAT(fmax, __builtin_fmaxf(x, y))
MLXQ_BINARY_FLOAT(fmin, __builtin_fminf(x, y))
MLXQ_BINARY_FLOAT(step, y < x ? 0.0f : 1.0f)
MLXQ_BINARY_FLOAT(fdim, __builtin_fdimf(x, y))
#undef MLXQ_BINARY_FLOAT

// max/min/abs/clamp work on integers too; mixed scalar types use the C++ common type.
template <class A, class B, class = std::enable_if_t<is_scalar_num<A>::value && is_scalar_num<B>::value>>
inline auto max(A a, B b) {
  using T = std::conditional_t<std::is_same<A, B>::value, A, std::common_type_t<A, B>>;
  T x = static_cast<T>(a), y = static_cast<T>(b);
  if constexpr (is_float_num<T>::value) return static_cast<T>(__builtin_fmaxf(float(x), float(y)));
  else return x < y ? y : x;
}
template <class A, class B, class = std::enable_if_t<is_scalar_num<A>::value && is_scalar_num<B>::value>>
inline auto min(A a, B b) {
  using T = std::conditional_t<std::is_same<A, B>::value, A, std::common_type_t<A, B>>;
  T x = static_cast<T>(a), y = static_cast<T>(b);
  if constexpr (is_float_num<T>::value) return static_cast<T>(__builtin_fminf(float(x), float(y)));
  else return y < x ? y : x;
}
template <class A, class B, class P = binop<A, B>, class = std::enable_if_t<P::any_vec>, class = void>
inline vec<typename P::E, P::n> max(const A& a_, const B& b_) {
  vec<typename P::E, P::n> a = as_vec<typename P::E, P::n>(a_), b = as_vec<typename P::E, P::n>(b_);
  for (int i = 0; i < P::n; ++i) a.d[i] = max(a.d[i], b.d[i]);
  return a;
}
template <class A, class B, class P = binop<A, B>, class = std::enable_if_t<P::any_vec>, class = void>
inline vec<typename P::E, P::n> min(const A& a_, const B& b_) {
  vec<typename P::E, P::n> a = as_vec<typename P::E, P::n>(a_), b = as_vec<typename P::E, P::n>(b_);
  for (int i = 0; i < P::n; ++i) a.d[i] = min(a.d[i], b.d[i]);
  return a;
}
template <class T, class = std::enable_if_t<is_scalar_num<T>::value>> inline T abs(T x) {
  if constexpr (std::is_unsigned<T>::value) return x;
  else if constexpr (is_float_num<T>::value) return static_cast<T>(__builtin_fabsf(float(x)));
  else return x < 0 ? static_cast<T>(-x) : x;
}
template <class X, class = std::enable_if_t<vtraits_of<X>::is>, class = void>
inline vec<typename vtraits_of<X>::E, vtraits_of<X>::n> abs(const X& v_) {
  vec<typename vtraits_of<X>::E, vtraits_of<X>::n> v = v_;
  for (int i = 0; i < vtraits_of<X>::n; ++i) v.d[i] = abs(v.d[i]);
  return v;
}
template <class X, class L, class H> inline auto clamp(const X& x, const L& lo, const H& hi) {
  return min(max(x, lo), hi);
}
template <class A, class B, class C> inline auto fma(const A& a, const B& b, const C& c) {
  if constexpr (vtraits_of<A>::is || vtraits_of<B>::is || vtraits_of<C>::is) {
    return a * b + c;
  } else {
    using T = std::conditional_t<is_float_num<A>::value, A, std::conditional_t<is_float_num<B>::value, B, C>>;
    return static_cast<T>(__builtin_fmaf(float(a), float(b), float(c)));
  }
}
template <class A, class B, class C> inline auto mix(const A& a, const B& b, const C& t) { return a + (b - a) * t; }
template <class A, class B, class C> inline auto smoothstep(const A& e0, const B& e1, const C& x) {
  auto t = clamp((x - e0) / (e1 - e0), 0.0f, 1.0f);
  return t * t * (3.0f - 2.0f * t);
}

// select(a, b, c): c ? b : a, per component for vectors.
template <class A, class B, class C> inline auto select(const A& a, const B& b, const C& c) {
  if constexpr (vtraits_of<C>::is || vtraits_of<A>::is || vtraits_of<B>::is) {
    using P = binop<A, B>;
    constexpr int n = P::any_vec ? P::n : vtraits_of<C>::n;
    using E = std::conditional_t<P::any_vec, typename P::E, A>;
    vec<E, n> x = as_vec<E, n>(a), y = as_vec<E, n>(b);
    vec<bool, n> m = as_vec<bool, n>(c);
    for (int i = 0; i < n; ++i) x.d[i] = m.d[i] ? y.d[i] : x.d[i];
    return x;
  } else {
    using T = std::conditional_t<std::is_same<A, B>::value, A, std::common_type_t<A, B>>;
    return c ? static_cast<T>(b) : static_cast<T>(a);
  }
}

template <class T, class = std::enable_if_t<is_float_num<T>::value>> inline bool isnan(T x) { return __builtin_isnan(float(x)); }
template <class T, class = std::enable_if_t<is_float_num<T>::value>> inline bool isinf(T x) { return __builtin_isinf(float(x)); }
template <class T, class = std::enable_if_t<is_float_num<T>::value>> inline bool isfinite(T x) { return __builtin_isfinite(float(x)); }
template <class T, class = std::enable_if_t<is_float_num<T>::value>> inline bool signbit(T x) { return __builtin_signbit(float(x)); }

template <class A, class B> inline auto dot(const A& a_, const B& b_) {
  using P = binop<A, B>;
  vec<typename P::E, P::n> a = as_vec<typename P::E, P::n>(a_), b = as_vec<typename P::E, P::n>(b_);
  typename P::E s = a.d[0] * b.d[0];
  for (int i = 1; i < P::n; ++i) s = static_cast<typename P::E>(s + a.d[i] * b.d[i]);
  return s;
}
template <class X> inline auto length(const X& x) { return sqrt(dot(x, x)); }
template <class X> inline auto length_squared(const X& x) { return dot(x, x); }
template <class X> inline auto normalize(const X& x) { return x * rsqrt(dot(x, x)); }
template <class A, class B> inline auto distance(const A& a, const B& b) { return length(a - b); }

// Integer bit functions.
template <class T, class = std::enable_if_t<std::is_integral<T>::value>> inline T popcount(T x) {
  return static_cast<T>(__builtin_popcountll(static_cast<unsigned long long>(static_cast<std::make_unsigned_t<T>>(x))));
}
template <class T, class = std::enable_if_t<std::is_integral<T>::value>> inline T clz(T x) {
  using U = std::make_unsigned_t<T>;
  U u = static_cast<U>(x);
  return u == 0 ? static_cast<T>(sizeof(T) * 8)
                : static_cast<T>(__builtin_clzll(u) - (64 - sizeof(T) * 8));
}
template <class T, class = std::enable_if_t<std::is_integral<T>::value>> inline T ctz(T x) {
  return x == 0 ? static_cast<T>(sizeof(T) * 8) : static_cast<T>(__builtin_ctzll(static_cast<unsigned long long>(x)));
}
template <class T, class = std::enable_if_t<std::is_integral<T>::value>> inline T mulhi(T a, T b) {
  using W = std::conditional_t<std::is_signed<T>::value, __int128, unsigned __int128>;
  return static_cast<T>((static_cast<W>(a) * static_cast<W>(b)) >> (sizeof(T) * 8));
}

// metal::fast:: and metal::precise:: name the same functions (Metal's fast-math approximations are not
// reproduced). Qualified lookup follows these using-directives.
namespace fast { using namespace ::metal; }
namespace precise { using namespace ::metal; }

template <class A, class B> inline auto divide(A a, B b) { return a / b; }

// as_type<T>(x): reinterpret the bits; sizes must match as in Metal.
template <class To, class From> inline To as_type(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "as_type: source and destination sizes differ");
  To to;
  memcpy(static_cast<void*>(&to), static_cast<const void*>(&from), sizeof(To));
  return to;
}

template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static half max() { return as_type<half>(uint16_t(0x7BFF)); }
  static half min() { return as_type<half>(uint16_t(0x0400)); }
  static half lowest() { return as_type<half>(uint16_t(0xFBFF)); }
  static half epsilon() { return as_type<half>(uint16_t(0x1400)); }
  static half infinity() { return as_type<half>(uint16_t(0x7C00)); }
  static half quiet_NaN() { return as_type<half>(uint16_t(0x7E00)); }
};
template <> struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static bfloat max() { return as_type<bfloat>(uint16_t(0x7F7F)); }
  static bfloat min() { return as_type<bfloat>(uint16_t(0x0080)); }
  static bfloat lowest() { return as_type<bfloat>(uint16_t(0xFF7F)); }
  static bfloat epsilon() { return as_type<bfloat>(uint16_t(0x3C00)); }
  static bfloat infinity() { return as_type<bfloat>(uint16_t(0x7F80)); }
  static bfloat quiet_NaN() { return as_type<bfloat>(uint16_t(0x7FC0)); }
};

// ---------------------------------------------------------------- synchronisation and SIMD ops
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

// A call site: the line of the call in MLX's text (through #line).
#define MLXQ_SITE (__builtin_LINE() * 1024u)  // g++ 12 has no __builtin_COLUMN

inline void threadgroup_barrier(mem_flags = mem_flags::mem_none, uint32_t site = MLXQ_SITE) {
  mlxq_rt::threadgroup_barrier(site);
}
inline void simdgroup_barrier(mem_flags = mem_flags::mem_none, uint32_t site = MLXQ_SITE) {
  unsigned char none = 0;
  mlxq_rt::simd_exchange(&none, 0, site);
}

template <class T> inline T simd_slot(const mlxq_rt::SimdView& v, uint32_t lane) {
  T t;
  memcpy(static_cast<void*>(&t), v.slot(lane), sizeof(T));
  return t;
}
template <class T> inline mlxq_rt::SimdView simd_send(const T& x, uint32_t site) {
  static_assert(sizeof(T) <= mlxq_rt::kSlotBytes, "SIMD op on a value larger than 64 bytes");
  return mlxq_rt::simd_exchange(&x, sizeof(T), site);
}

// Reductions fold the active lanes in lane order.
#define MLXQ_SIMD_REDUCE(NAME, INIT_FIRST, COMBINE)                                   \
  template <class T> inline T NAME(T x, uint32_t site = MLXQ_SITE) {                 \
    mlxq_rt::SimdView v = simd_send(x, site);                                         \
    T acc = x;                                                                        \
    bool first = true;                                                                \
    for (uint32_t l = 0; l < mlxq_rt::kSimdWidth; ++l) {                              \
      if (!(v.active >> l & 1u)) continue;                                            \
      T y = simd_slot<T>(v, l);                                                       \
      if (first) { acc = y; first = false; } else { acc = COMBINE; }                  \
    }                                                                                 \
    return acc;                                                                       \
  }
MLXQ_SIMD_REDUCE(simd_sum, 0, static_cast<T>(acc + y))
MLXQ_SIMD_REDUCE(simd_product, 0, static_cast<T>(acc * y))
MLXQ_SIMD_REDUCE(simd_max, 0, max(acc, y))
MLXQ_SIMD_REDUCE(simd_min, 0, min(acc, y))
MLXQ_SIMD_REDUCE(simd_and, 0, static_cast<T>(acc & y))
MLXQ_SIMD_REDUCE(simd_or, 0, static_cast<T>(acc | y))
MLXQ_SIMD_REDUCE(simd_xor, 0, static_cast<T>(acc ^ y))
#undef MLXQ_SIMD_REDUCE

#define MLXQ_SIMD_PREFIX(NAME, INCLUSIVE, IDENTITY, COMBINE)                          \
  template <class T> inline T NAME(T x, uint32_t site = MLXQ_SITE) {                 \
    mlxq_rt::SimdView v = simd_send(x, site);                                         \
    T acc = static_cast<T>(IDENTITY);                                                 \
    uint32_t end = (INCLUSIVE) ? v.lane + 1 : v.lane;                                 \
    for (uint32_t l = 0; l < end; ++l) {                                              \
      if (!(v.active >> l & 1u)) continue;                                            \
      T y = simd_slot<T>(v, l);                                                       \
      acc = COMBINE;                                                                  \
    }                                                                                 \
    return acc;                                                                       \
  }
MLXQ_SIMD_PREFIX(simd_prefix_inclusive_sum, true, 0, static_cast<T>(acc + y))
MLXQ_SIMD_PREFIX(simd_prefix_exclusive_sum, false, 0, static_cast<T>(acc + y))
MLXQ_SIMD_PREFIX(simd_prefix_inclusive_product, true, 1, static_cast<T>(acc * y))
MLXQ_SIMD_PREFIX(simd_prefix_exclusive_product, false, 1, static_cast<T>(acc * y))
#undef MLXQ_SIMD_PREFIX

// Reading a lane that did not take part gives that lane's garbage slot (0xFF bytes).
template <class T> inline T simd_shuffle(T x, ushort lane, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(x, site);
  return simd_slot<T>(v, lane % mlxq_rt::kSimdWidth);
}
template <class T> inline T simd_broadcast(T x, ushort lane, uint32_t site = MLXQ_SITE) {
  return simd_shuffle(x, lane, site);
}
template <class T> inline T simd_shuffle_xor(T x, ushort mask, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(x, site);
  return simd_slot<T>(v, (v.lane ^ mask) % mlxq_rt::kSimdWidth);
}
template <class T> inline T simd_shuffle_up(T x, ushort delta, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(x, site);
  return v.lane < delta ? x : simd_slot<T>(v, v.lane - delta);  // the lowest `delta` lanes keep theirs
}
template <class T> inline T simd_shuffle_down(T x, ushort delta, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(x, site);
  uint32_t src = v.lane + delta;
  return src >= mlxq_rt::kSimdWidth ? x : simd_slot<T>(v, src);  // the highest `delta` lanes keep theirs
}
template <class T> inline T simd_shuffle_rotate_up(T x, ushort delta, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(x, site);
  return simd_slot<T>(v, (v.lane + mlxq_rt::kSimdWidth - delta % mlxq_rt::kSimdWidth) % mlxq_rt::kSimdWidth);
}
template <class T> inline T simd_shuffle_rotate_down(T x, ushort delta, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(x, site);
  return simd_slot<T>(v, (v.lane + delta) % mlxq_rt::kSimdWidth);
}
template <class T> struct simd_pair { T data, fill; };
template <class T> inline T simd_shuffle_and_fill_up(T data, T filling, ushort delta, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(simd_pair<T>{data, filling}, site);
  if (v.lane >= delta) return simd_slot<simd_pair<T>>(v, v.lane - delta).data;
  return simd_slot<simd_pair<T>>(v, mlxq_rt::kSimdWidth - delta + v.lane).fill;
}
template <class T> inline T simd_shuffle_and_fill_down(T data, T filling, ushort delta, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(simd_pair<T>{data, filling}, site);
  uint32_t src = v.lane + delta;
  if (src < mlxq_rt::kSimdWidth) return simd_slot<simd_pair<T>>(v, src).data;
  return simd_slot<simd_pair<T>>(v, src - mlxq_rt::kSimdWidth).fill;
}
template <class T> inline T simd_broadcast_first(T x, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(x, site);
  return simd_slot<T>(v, static_cast<uint32_t>(__builtin_ctz(v.active)));
}
inline bool simd_is_first(uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(uint8_t(0), site);
  return static_cast<uint32_t>(__builtin_ctz(v.active)) == v.lane;
}
inline bool simd_all(bool b, uint32_t site = MLXQ_SITE) { return simd_and(uint32_t(b), site) != 0; }
inline bool simd_any(bool b, uint32_t site = MLXQ_SITE) { return simd_or(uint32_t(b), site) != 0; }
struct simd_vote {
  using vote_t = uint64_t;
  vote_t v;
  explicit operator vote_t() const { return v; }
  bool all() const { return v == 0xFFFFFFFFull; }
  bool any() const { return v != 0; }
};
inline simd_vote simd_ballot(bool b, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(uint8_t(b), site);
  uint64_t m = 0;
  for (uint32_t l = 0; l < mlxq_rt::kSimdWidth; ++l)
    if ((v.active >> l & 1u) && simd_slot<uint8_t>(v, l)) m |= 1ull << l;
  return simd_vote{m};
}
inline simd_vote simd_active_threads_mask(uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(uint8_t(0), site);
  return simd_vote{v.active};
}

// Quad-group ops: SIMD ops restricted to the 4 lanes of a quad.
#define MLXQ_QUAD_REDUCE(NAME, COMBINE)                                               \
  template <class T> inline T NAME(T x, uint32_t site = MLXQ_SITE) {                 \
    mlxq_rt::SimdView v = simd_send(x, site);                                         \
    uint32_t base = v.lane & ~3u;                                                     \
    bool first = true;                                                                \
    T acc = x;                                                                        \
    for (uint32_t l = base; l < base + 4; ++l) {                                      \
      if (!(v.active >> l & 1u)) continue;                                            \
      T y = simd_slot<T>(v, l);                                                       \
      if (first) { acc = y; first = false; } else { acc = COMBINE; }                  \
    }                                                                                 \
    return acc;                                                                       \
  }
MLXQ_QUAD_REDUCE(quad_sum, static_cast<T>(acc + y))
MLXQ_QUAD_REDUCE(quad_product, static_cast<T>(acc * y))
MLXQ_QUAD_REDUCE(quad_max, max(acc, y))
MLXQ_QUAD_REDUCE(quad_min, min(acc, y))
#undef MLXQ_QUAD_REDUCE
template <class T> inline T quad_shuffle(T x, ushort lane, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(x, site);
  return simd_slot<T>(v, (v.lane & ~3u) | (lane & 3u));
}
template <class T> inline T quad_broadcast(T x, ushort lane, uint32_t site = MLXQ_SITE) { return quad_shuffle(x, lane, site); }
template <class T> inline T quad_shuffle_xor(T x, ushort mask, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(x, site);
  return simd_slot<T>(v, (v.lane & ~3u) | ((v.lane ^ mask) & 3u));
}
template <class T> inline T quad_shuffle_up(T x, ushort delta, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(x, site);
  return (v.lane & 3u) < delta ? x : simd_slot<T>(v, v.lane - delta);
}
template <class T> inline T quad_shuffle_down(T x, ushort delta, uint32_t site = MLXQ_SITE) {
  mlxq_rt::SimdView v = simd_send(x, site);
  return (v.lane & 3u) + delta >= 4 ? x : simd_slot<T>(v, v.lane + delta);
}

}  // namespace metal

// ---------------------------------------------------------------- vector type names
#define MLXQ_VEC_NAMES(T, NAME) \
  typedef metal::vec<T, 2> NAME##2; typedef metal::vec<T, 3> NAME##3; typedef metal::vec<T, 4> NAME##4;
MLXQ_VEC_NAMES(float, float)
MLXQ_VEC_NAMES(half, half)
MLXQ_VEC_NAMES(bfloat, bfloat)
MLXQ_VEC_NAMES(int, int)
MLXQ_VEC_NAMES(uint, uint)
MLXQ_VEC_NAMES(short, short)
MLXQ_VEC_NAMES(ushort, ushort)
MLXQ_VEC_NAMES(char, char)
MLXQ_VEC_NAMES(uchar, uchar)
MLXQ_VEC_NAMES(long, long)
MLXQ_VEC_NAMES(ulong, ulong)
MLXQ_VEC_NAMES(bool, bool)
#undef MLXQ_VEC_NAMES
// Metal's packed 3-vectors are 3 elements wide.
template <class T> struct packed3 {
  T x, y, z;
  packed3() = default;
  packed3(T a, T b, T c) : x(a), y(b), z(c) {}
  template <class V> packed3(const V& v) : x(v.x), y(v.y), z(v.z) {}
  operator metal::vec<T, 3>() const { return metal::vec<T, 3>(x, y, z); }
  T& operator[](size_t i) { return (&x)[i]; }
  const T& operator[](size_t i) const { return (&x)[i]; }
};
typedef packed3<float> packed_float3;
typedef packed3<half> packed_half3;
typedef metal::vec<float, 2> packed_float2;
typedef metal::vec<float, 4> packed_float4;
typedef metal::vec<half, 2> packed_half2;
typedef metal::vec<half, 4> packed_half4;

using namespace metal;

#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))
#define FLT_MAX 3.402823466e+38F
#define FLT_MIN 1.175494351e-38F
#define FLT_EPSILON 1.192092896e-07F
#define HALF_MAX (metal::numeric_limits<half>::max())
#define HALF_MIN (metal::numeric_limits<half>::min())
#define M_PI_F 3.14159265358979323846264338327950288f
#define M_PI_2_F 1.57079632679489661923132169163975144f
#define M_E_F 2.71828182845904523536028747135266250f
#define M_LN2_F 0.693147180559945309417232121458176568f
#define M_LN10_F 2.30258509299404568401799145468436421f
#define M_LOG2E_F 1.44269504088896340735992468100189214f
#define M_LOG10E_F 0.434294481903251827651128918916605082f
#define M_SQRT2_F 1.41421356237309504880168872420969808f
#define M_SQRT1_2_F 0.707106781186547524400844362104849039f

#include "mlx_utils_shim.h"
#include "checked_ptr.h"

// Address-space and function qualifiers are meaningless on a CPU: defined last so they cannot
// clash with names in the system headers above.
#define device
#define constant
#define thread
#define threadgroup
#define METAL_FUNC inline
