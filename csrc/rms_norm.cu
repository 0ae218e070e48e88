// CUDA RMSNorm for llm2vec_fast.rms_norm: forward and backward, "llama" and "gemma" casting modes.
//
// One read of x and one write of y (forward); one read of x and dy and one write of dx (backward), each as
// 16-byte vectors. Semantics and rounding: llm2vec_fast.reference.rms_norm (as kernels/rms_norm.py).
//
// Block shape: 256 threads = 8 warps, split into row groups of warps_per_row warps (1, 2, 4 or 8); a row
// group owns one row at a time. Thread `lane` of a row group (lane < 32 * warps_per_row = threads) holds
// vectors lane, lane + threads, lane + 2 * threads, ... of the row (vecs_per_thread of them, coalesced: a
// warp reads 512 contiguous bytes per vector step), kept as loaded (uint4) in registers between the
// reduction and the output. Narrow rows (a 128-wide q/k norm) take one warp and 8 rows per block; hidden
// sizes (4096) take all 8 warps, 2 vectors per thread.
//
// Reductions over a row: a warp's butterfly (__shfl_xor_sync), then, for a row shared by several warps,
// the warps' sums from shared memory in warp order. Deterministic.
//
// Backward: a fixed grid (kBackwardBlocksPerSM per SM) whose row groups walk the rows with a stride of the
// number of row groups; each accumulates dy * n over its rows in float32 registers and writes one partial
// dw row at the end (no atomics; the caller sums the partial rows, in a fixed order).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "rms_norm.h"
#include "vector_io.cuh"

namespace l2vf {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxVecsPerThread = 4;      // registers: the backward keeps x, dy (raw), weight and dw per vector
constexpr int kVecsPerThreadTarget = 2;   // below 8 warps a row, add warps before vectors per thread
constexpr int kBackwardBlocksPerSM = 4;

using detail::from_float;
using detail::load_raw;
using detail::load_vec;
using detail::Raw;
using detail::raw_to_float;
using detail::rows_aligned16;
using detail::store_vec;
using detail::to_float;

struct Args {
  const void* x;
  int64_t stride_x;
  const void* weight;
  const void* grad_y;
  int64_t stride_grad_y;
  int64_t rows, dim;
  float eps, offset;
  bool gemma;
  int warps_per_row;
};

// A thread's place: its row group in the block and its index among the row group's threads.
struct RowLane {
  int group;    // [0, kWarps / warps_per_row)
  int lane;     // [0, threads)
  int threads;  // 32 * warps_per_row

  // First column of the thread's i-th vector of the row: vectors lane, lane + threads, ... (coalesced).
  __device__ __forceinline__ int64_t col(int i, int vec) const {
    return static_cast<int64_t>(lane + i * threads) * vec;
  }
};

__device__ __forceinline__ RowLane row_lane(int warps_per_row) {
  const int threads = 32 * warps_per_row;
  return {static_cast<int>(threadIdx.x) / threads, static_cast<int>(threadIdx.x) % threads, threads};
}

// The sum of v over the threads of a row group, in every one of them (fixed order: deterministic). Every
// thread of the block calls it (it synchronises the block when a row spans several warps).
__device__ __forceinline__ float row_sum(float v, int warps_per_row, float (&scratch)[kWarps]) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  if (warps_per_row == 1) return v;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  const int first = warp / warps_per_row * warps_per_row;  // the row group's first warp
  float total = 0.f;
  for (int w = 0; w < warps_per_row; ++w) total += scratch[first + w];
  __syncthreads();  // scratch is rewritten by the next call
  return total;
}

// n as the weight sees it: rounded to x's dtype first in llama mode.
template <typename T>
__device__ __forceinline__ float weighted(float normed, bool gemma) {
  return gemma ? normed : to_float(from_float<T>(normed));
}

template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(kThreads) rms_norm_fwd_kernel(Args a, T* y, float* rstd_out) {
  __shared__ float scratch[kWarps];
  const RowLane at = row_lane(a.warps_per_row);
  const int rows_per_block = kWarps / a.warps_per_row;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + at.group;
  const bool active = row < a.rows;  // a row group past the last row still joins the block's row_sum
  const T* x = static_cast<const T*>(a.x) + (active ? row : 0) * a.stride_x;
  const T* weight = static_cast<const T*>(a.weight);

  Raw<T, VEC> xs[VPT];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t col = at.col(i, VEC);
    xs[i] = load_raw<T, VEC>(x + col, active && col < a.dim ? VEC : 0);  // D % VEC == 0: whole vectors or none
  }
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    float v[VEC];
    raw_to_float<T, VEC>(xs[i], v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) sum_sq += v[e] * v[e];
  }
  const float rstd = 1.f / sqrtf(row_sum(sum_sq, a.warps_per_row, scratch) / static_cast<float>(a.dim) + a.eps);
  if (!active) return;
  T* out = y + row * a.dim;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t col = at.col(i, VEC);
    if (col >= a.dim) break;
    float v[VEC], w[VEC];
    raw_to_float<T, VEC>(xs[i], v);
    load_vec<T, VEC>(weight + col, VEC, w);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = weighted<T>(v[e] * rstd, a.gemma) * (w[e] + a.offset);
    store_vec<T, VEC>(out + col, VEC, v);
  }
  if (at.lane == 0) rstd_out[row] = rstd;
}

template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(kThreads) rms_norm_bwd_kernel(Args a, const float* rstd_in, T* grad_x,
                                                                 float* partial_dw) {
  __shared__ float scratch[kWarps];
  const RowLane at = row_lane(a.warps_per_row);
  const int rows_per_block = kWarps / a.warps_per_row;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * rows_per_block;  // row groups in the grid
  const T* weight = static_cast<const T*>(a.weight);

  float w[VPT][VEC], dw[VPT][VEC];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t col = at.col(i, VEC);
    load_vec<T, VEC>(weight + col, col < a.dim ? VEC : 0, w[i]);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      w[i][e] += a.offset;
      dw[i][e] = 0.f;
    }
  }
  // Row group g of the grid takes rows g, g + groups, ...; the loop condition is the block's (its first row
  // group's), so that every thread of the block reaches each row_sum.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block; first < a.rows; first += groups) {
    const int64_t row = first + at.group;
    const bool active = row < a.rows;
    const T* x = static_cast<const T*>(a.x) + (active ? row : 0) * a.stride_x;
    const T* dy = static_cast<const T*>(a.grad_y) + (active ? row : 0) * a.stride_grad_y;
    const float rstd = active ? rstd_in[row] : 0.f;  // 0: an inactive row group adds nothing to dw
    Raw<T, VEC> xs[VPT], dys[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t col = at.col(i, VEC);
      const int valid = active && col < a.dim ? VEC : 0;
      xs[i] = load_raw<T, VEC>(x + col, valid);
      dys[i] = load_raw<T, VEC>(dy + col, valid);
    }
    float dot = 0.f;  // sum over the row of g * n, g = dy * (offset + w)
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      float xv[VEC], dyv[VEC];
      raw_to_float<T, VEC>(xs[i], xv);
      raw_to_float<T, VEC>(dys[i], dyv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float normed = xv[e] * rstd;
        dot += dyv[e] * w[i][e] * normed;
        dw[i][e] += dyv[e] * weighted<T>(normed, a.gemma);
      }
    }
    const float row_term = row_sum(dot, a.warps_per_row, scratch) / static_cast<float>(a.dim);
    if (!active) continue;
    T* dx = grad_x + row * a.dim;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t col = at.col(i, VEC);
      if (col >= a.dim) break;
      float xv[VEC], dyv[VEC];
      raw_to_float<T, VEC>(xs[i], xv);
      raw_to_float<T, VEC>(dys[i], dyv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float normed = xv[e] * rstd;
        xv[e] = rstd * (dyv[e] * w[i][e] - normed * row_term);
      }
      store_vec<T, VEC>(dx + col, VEC, xv);
    }
  }
  float* partial = partial_dw + (static_cast<int64_t>(blockIdx.x) * rows_per_block + at.group) * a.dim;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t col = at.col(i, VEC);
    if (col < a.dim) store_vec<float, VEC>(partial + col, VEC, dw[i]);
  }
}

Args args_of(const RmsNormProblem& p, const RmsNormPlan& plan) {
  return {p.x, p.stride_x, p.weight, p.grad_y, p.stride_grad_y, p.rows, p.dim, p.eps, p.offset, p.gemma,
          plan.warps_per_row};
}

template <typename T, int VEC, int VPT>
cudaError_t launch(const Args& a, const RmsNormPlan& plan, bool backward, const float* rstd_in, void* out,
                   float* rstd_out, float* partial_dw, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  if (backward) {
    L2VF_LAUNCH((rms_norm_bwd_kernel<T, VEC, VPT>), grid, kThreads, stream, a, rstd_in, static_cast<T*>(out),
                partial_dw);
  } else {
    L2VF_LAUNCH((rms_norm_fwd_kernel<T, VEC, VPT>), grid, kThreads, stream, a, static_cast<T*>(out), rstd_out);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const Args& a, const RmsNormPlan& plan, bool backward, const float* rstd_in, void* out,
                         float* rstd_out, float* partial_dw, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  switch (plan.vecs_per_thread) {
    case 1: return launch<T, kVec, 1>(a, plan, backward, rstd_in, out, rstd_out, partial_dw, stream);
    case 2: return launch<T, kVec, 2>(a, plan, backward, rstd_in, out, rstd_out, partial_dw, stream);
    default: return launch<T, kVec, kMaxVecsPerThread>(a, plan, backward, rstd_in, out, rstd_out, partial_dw, stream);
  }
}

cudaError_t dispatch(const RmsNormProblem& p, const RmsNormPlan& plan, bool backward, const float* rstd_in, void* out,
                     float* rstd_out, float* partial_dw, cudaStream_t stream) {
  if (!plan.supported) return cudaErrorInvalidValue;
  const Args a = args_of(p, plan);
  switch (p.dtype) {
    case DType::kFloat16: return launch_typed<__half>(a, plan, backward, rstd_in, out, rstd_out, partial_dw, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(a, plan, backward, rstd_in, out, rstd_out, partial_dw, stream);
    default: return launch_typed<float>(a, plan, backward, rstd_in, out, rstd_out, partial_dw, stream);
  }
}

}  // namespace

RmsNormPlan rms_norm_plan(const RmsNormProblem& p, int num_sms, bool backward) {
  RmsNormPlan plan;
  const int bytes = element_bytes(p.dtype);
  plan.vec = 16 / bytes;
  if (p.rows <= 0 || p.dim <= 0 || p.dim > kRmsNormMaxDim || p.dim % plan.vec != 0) return plan;
  if (!rows_aligned16(p.x, p.stride_x, bytes) || !rows_aligned16(p.weight, 0, bytes)) return plan;
  if (backward && !rows_aligned16(p.grad_y, p.stride_grad_y, bytes)) return plan;
  const int64_t vectors = p.dim / plan.vec;
  while (plan.warps_per_row < kWarps && vectors > int64_t{kVecsPerThreadTarget} * 32 * plan.warps_per_row) {
    plan.warps_per_row *= 2;
  }
  while (int64_t{plan.vecs_per_thread} * 32 * plan.warps_per_row < vectors) plan.vecs_per_thread *= 2;
  if (plan.vecs_per_thread > kMaxVecsPerThread) return plan;  // float32 rows wider than 4096
  const int rows_per_block = kWarps / plan.warps_per_row;
  plan.blocks = (p.rows + rows_per_block - 1) / rows_per_block;
  if (backward) {
    plan.blocks = std::min<int64_t>(plan.blocks, int64_t{num_sms > 0 ? num_sms : 1} * kBackwardBlocksPerSM);
    plan.partial_rows = plan.blocks * rows_per_block;
  }
  plan.supported = true;
  return plan;
}

cudaError_t rms_norm_forward(const RmsNormProblem& p, const RmsNormPlan& plan, void* y, float* rstd,
                             cudaStream_t stream) {
  return dispatch(p, plan, false, nullptr, y, rstd, nullptr, stream);
}

cudaError_t rms_norm_backward(const RmsNormProblem& p, const RmsNormPlan& plan, const float* rstd, void* grad_x,
                              float* partial_dw, cudaStream_t stream) {
  return dispatch(p, plan, true, rstd, grad_x, nullptr, partial_dw, stream);
}

}  // namespace l2vf
