// 16-byte vector access to rows of float32 / float16 / bfloat16, shared by the elementwise and reduction
// kernels of csrc/ (pooling.cu, rms_norm.cu, gated.cu). No torch headers.
//
// VEC elements of type T move as one 16-byte access (LDG.E.128 / STG.E.128) when VEC * sizeof(T) == 16,
// else element by element; a row's tail (`valid` < VEC elements left) is always read and written element
// by element. Loads go through __ldg, stores through __stwb, so the CPU emulator (csrc/emulator/) checks
// their alignment and bounds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "device_common.cuh"

namespace l2vf {
namespace detail {

// Host side, for the launch plans: whether rows starting at ptr, stride_elements apart, allow 16-byte vectors
// (base pointer and row stride both 16-byte aligned).
inline bool rows_aligned16(const void* ptr, int64_t stride_elements, int element_bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride_elements * element_bytes) % 16 == 0;
}

__device__ __forceinline__ uint4 pack(const float (&x)[4]) {
  return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]), __float_as_uint(x[3]));
}
__device__ __forceinline__ unsigned pack2(float a, float b, __half) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const unsigned*>(&h);
}
__device__ __forceinline__ unsigned pack2(float a, float b, __nv_bfloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const unsigned*>(&h);
}
template <typename T>
__device__ __forceinline__ uint4 pack(const float (&x)[8]) {
  return make_uint4(pack2(x[0], x[1], T()), pack2(x[2], x[3], T()), pack2(x[4], x[5], T()), pack2(x[6], x[7], T()));
}

// VEC elements of type T as loaded: a uint4 for a 16-byte vector, else the elements themselves. The
// main loops keep loads in this form until they are used, so that a chunk's loads are all in flight
// before the first conversion waits on one (and it takes half the registers of floats for 16-bit types).
template <typename T, int VEC>
struct Pack {
  T x[VEC];
};
template <typename T, int VEC, bool kWhole16 = (VEC * sizeof(T) == 16)>
struct RawOf {
  using type = Pack<T, VEC>;
};
template <typename T, int VEC>
struct RawOf<T, VEC, true> {
  using type = uint4;
};
template <typename T, int VEC>
using Raw = typename RawOf<T, VEC>::type;

template <typename T, int VEC>
__device__ __forceinline__ Raw<T, VEC> zero_raw() {
  if constexpr (VEC * sizeof(T) == 16) {
    return make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are +0 in every float format
  } else {
    Raw<T, VEC> r;
#pragma unroll
    for (int v = 0; v < VEC; ++v) r.x[v] = from_float<T>(0.f);
    return r;
  }
}

// VEC elements at p; `valid` (<= VEC) of them lie inside the row, the rest read as 0. A whole 16-byte
// vector is one LDG.E.128; the row's tail (valid < VEC) is read element by element.
template <typename T, int VEC>
__device__ __forceinline__ Raw<T, VEC> load_raw(const T* p, int valid) {
  if constexpr (VEC * sizeof(T) == 16) {
    if (valid >= VEC) return __ldg(reinterpret_cast<const uint4*>(p));
    union {
      uint4 u;
      unsigned short h[8];
      unsigned f[4];
    } r;
    r.u = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (v < valid) {
        if constexpr (sizeof(T) == 2) r.h[v] = __ldg(reinterpret_cast<const unsigned short*>(p) + v);
        else r.f[v] = __ldg(reinterpret_cast<const unsigned*>(p) + v);
      }
    }
    return r.u;
  } else {
    Raw<T, VEC> r;
#pragma unroll
    for (int v = 0; v < VEC; ++v) r.x[v] = v < valid ? __ldg(p + v) : from_float<T>(0.f);
    return r;
  }
}

__device__ __forceinline__ float2 word_to_float2(unsigned u, __half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&u));
}
__device__ __forceinline__ float2 word_to_float2(unsigned u, __nv_bfloat16) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}

template <typename T, int VEC>
__device__ __forceinline__ void raw_to_float(const Raw<T, VEC>& r, float (&h)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) h[i] = __uint_as_float(w[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = word_to_float2(w[i], T());
        h[2 * i] = f.x;
        h[2 * i + 1] = f.y;
      }
    }
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) h[v] = to_float(r.x[v]);
  }
}

// VEC elements at p as float (see load_raw).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, int valid, float (&h)[VEC]) {
  raw_to_float<T, VEC>(load_raw<T, VEC>(p, valid), h);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, int valid, const float (&x)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    if (valid >= VEC) {
      if constexpr (VEC == 4) __stwb(reinterpret_cast<uint4*>(p), pack(x));
      else __stwb(reinterpret_cast<uint4*>(p), pack<T>(x));
      return;
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v)
    if (v < valid) p[v] = from_float<T>(x[v]);
}

}  // namespace detail
}  // namespace l2vf
