// Device helpers shared by the kernel files of csrc/ (no torch headers): the launch macro, element conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Kernel launch; csrc/emulator/cuda_emulator.h defines it first, to run the same kernels on the CPU in its tests.
#ifndef L2VF_LAUNCH
#define L2VF_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

namespace l2vf {
namespace detail {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace detail
}  // namespace l2vf
