// Bounds-checked device pointers for the emulator's checking mode (MLXQ_EMULATOR_CHECK=1).
// Buffer parameters, and `device` pointers declared in the kernel text, become checked_ptr<T>,
// which knows the buffer it points into and reports any access outside it instead of
// touching memory there.
#pragma once

namespace mlxq {

struct buffer_extent {
  const char* base;
  uint64_t bytes;
  const char* name;
};

// The launch's buffers, registered by the generated entry point.
inline buffer_extent g_buffers[128];
inline int g_buffer_count = 0;

inline const buffer_extent* find_buffer(const void* p) {
  const char* c = static_cast<const char*>(p);
  for (int i = 0; i < g_buffer_count; ++i)
    if (c >= g_buffers[i].base && c < g_buffers[i].base + g_buffers[i].bytes) return &g_buffers[i];
  return nullptr;
}

template <class T> struct checked_ptr {
  T* p = nullptr;
  const buffer_extent* buf = nullptr;  // null: not a kernel buffer, accesses are not checked

  checked_ptr() = default;
  checked_ptr(T* raw) : p(raw), buf(find_buffer(raw)) {}
  checked_ptr(T* raw, const buffer_extent* b) : p(raw), buf(b) {}
  template <class U, class = std::enable_if_t<std::is_convertible<U*, T*>::value>>
  checked_ptr(const checked_ptr<U>& o) : p(o.p), buf(o.buf) {}
  // A cast to another pointee type, e.g. (const device uint32_t*)bytes, keeps the bounds.
  template <class U, class = std::enable_if_t<!std::is_convertible<U*, T*>::value>, class = void>
  explicit checked_ptr(const checked_ptr<U>& o) : p((T*)(o.p)), buf(o.buf) {}

  T& at(T* q) const {
    if (buf) {
      const char* c = reinterpret_cast<const char*>(q);
      if (c < buf->base || c + sizeof(T) > buf->base + buf->bytes) {
        mlxq_rt::report_out_of_bounds(buf->name, static_cast<int64_t>(c - buf->base), sizeof(T), buf->bytes);
        alignas(64) static thread_local unsigned char scratch[256];
        memset(scratch, 0xFF, sizeof(scratch));
        return *reinterpret_cast<T*>(scratch);
      }
    }
    return *q;
  }
  template <class I, class = std::enable_if_t<std::is_integral<I>::value || std::is_enum<I>::value>>
  T& operator[](I i) const { return at(p + static_cast<ptrdiff_t>(i)); }
  T& operator*() const { return at(p); }
  T* operator->() const { return &at(p); }
  operator T*() const { return p; }  // escapes checking (passing to a function taking a raw pointer)

  template <class I> checked_ptr operator+(I i) const { return checked_ptr(p + static_cast<ptrdiff_t>(i), buf); }
  template <class I> checked_ptr operator-(I i) const { return checked_ptr(p - static_cast<ptrdiff_t>(i), buf); }
  template <class U> ptrdiff_t operator-(const checked_ptr<U>& o) const { return p - o.p; }
  ptrdiff_t operator-(T* o) const { return p - o; }
  template <class I> checked_ptr& operator+=(I i) { p += static_cast<ptrdiff_t>(i); return *this; }
  template <class I> checked_ptr& operator-=(I i) { p -= static_cast<ptrdiff_t>(i); return *this; }
  checked_ptr& operator++() { ++p; return *this; }
  checked_ptr& operator--() { --p; return *this; }
  checked_ptr operator++(int) { checked_ptr t = *this; ++p; return t; }
  checked_ptr operator--(int) { checked_ptr t = *this; --p; return t; }
};

template <class I, class T, class = std::enable_if_t<std::is_integral<I>::value>>
inline checked_ptr<T> operator+(I i, const checked_ptr<T>& q) { return q + i; }

// reinterpret_cast<const device U*>(x) in checking mode.
template <class To, class From> inline To ptr_cast(const From& from) {
  if constexpr (std::is_pointer<From>::value) return To(reinterpret_cast<decltype(To().p)>(from));
  else return To(from);
}

}  // namespace mlxq
