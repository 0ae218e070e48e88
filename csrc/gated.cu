// CUDA gated activation for llm2vec_fast.gated_activation: act(gate) * up (SwiGLU, GeGLU), forward and
// backward, in one pass each.
//
// Grid (col_blocks, row_blocks), 256 threads: thread t of block (bx, by) owns vector bx * 256 + t of every
// row it visits (VEC elements, one 16-byte access per tensor when all rows are 16-byte aligned), and the
// block walks rows by * kRowsPerStep, + gridDim.y * kRowsPerStep, ... loading kRowsPerStep rows of every
// input before computing any (2 x kRowsPerStep 16-byte loads in flight per thread in the forward).
// grid.y stays under the 65535 limit whatever N is.
//
// Rounding as llm2vec_fast.reference.gated (and kernels/gated.py): act(gate) is rounded to the input dtype
// before the product, which is rounded once. The backward recomputes act(gate) and act'(gate) from gate
// in float32 and rounds each gradient once. In place (out == gate): every element is read before it is
// written, by the same thread.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "gated.h"
#include "vector_io.cuh"

namespace l2vf {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerStep = 4;
constexpr int64_t kMaxRowBlocks = 65535;  // grid.y limit
constexpr float kGeluTanhScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluTanhCubic = 0.044715f;

using detail::from_float;
using detail::load_raw;
using detail::Raw;
using detail::raw_to_float;
using detail::rows_aligned16;
using detail::store_vec;
using detail::to_float;

struct Args {
  const void* gate;
  int64_t stride_gate;
  const void* up;
  int64_t stride_up;
  const void* grad;
  int64_t stride_grad;
  int64_t rows, cols;
  bool gelu;
};

// act(g) and act'(g) in float32. GELU's tanh form as g * sigmoid(2 z), z = c (g + k g^3), since
// (1 + tanh(z)) / 2 = sigmoid(2 z); its derivative s + 2 g s (1 - s) z'(g) uses 1 - tanh(z)^2 = 4 s (1 - s).
__device__ __forceinline__ void activation(float g, bool gelu, float& act, float& derivative) {
  if (gelu) {
    const float inner = kGeluTanhScale * (g + kGeluTanhCubic * g * g * g);
    const float s = 1.f / (1.f + expf(-2.f * inner));
    act = g * s;
    derivative = s + 2.f * g * s * (1.f - s) * kGeluTanhScale * (1.f + 3.f * kGeluTanhCubic * g * g);
  } else {
    const float s = 1.f / (1.f + expf(-g));
    act = g * s;
    derivative = s * (1.f + g * (1.f - s));
  }
}

// This thread's vector: its first column and how many of its VEC elements lie in the row (0 past the end).
template <int VEC>
__device__ __forceinline__ int vector_of(int64_t cols, int64_t& col) {
  col = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  const int64_t left = cols - col;
  return left >= VEC ? VEC : left > 0 ? static_cast<int>(left) : 0;
}

// Forward (BACKWARD false): out = act(gate) * up, rows of stride stride_out (out may be gate). Backward:
// out = d gate and grad_up = d up, from grad (a.grad), both rows of stride stride_out (contiguous: I).
template <typename T, int VEC, bool BACKWARD>
__global__ void __launch_bounds__(kThreads) gated_kernel(Args a, T* out, int64_t stride_out, T* grad_up) {
  int64_t col;
  const int valid = vector_of<VEC>(a.cols, col);
  if (valid == 0) return;
  const T* gate = static_cast<const T*>(a.gate) + col;
  const T* up = static_cast<const T*>(a.up) + col;
  const T* grad = BACKWARD ? static_cast<const T*>(a.grad) + col : nullptr;
  for (int64_t first = static_cast<int64_t>(blockIdx.y) * kRowsPerStep; first < a.rows;
       first += static_cast<int64_t>(gridDim.y) * kRowsPerStep) {
    Raw<T, VEC> gates[kRowsPerStep], ups[kRowsPerStep], grads[BACKWARD ? kRowsPerStep : 1];
#pragma unroll
    for (int r = 0; r < kRowsPerStep; ++r) {  // every load of the step before the first store (out may be gate)
      const int64_t row = first + r;
      const int n = row < a.rows ? valid : 0;
      gates[r] = load_raw<T, VEC>(gate + row * a.stride_gate, n);
      ups[r] = load_raw<T, VEC>(up + row * a.stride_up, n);
      if constexpr (BACKWARD) grads[r] = load_raw<T, VEC>(grad + row * a.stride_grad, n);
    }
#pragma unroll
    for (int r = 0; r < kRowsPerStep; ++r) {
      const int64_t row = first + r;
      if (row >= a.rows) break;
      float g[VEC], u[VEC];
      raw_to_float<T, VEC>(gates[r], g);
      raw_to_float<T, VEC>(ups[r], u);
      if constexpr (BACKWARD) {
        float dy[VEC];
        raw_to_float<T, VEC>(grads[r], dy);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          float act, derivative;
          activation(g[e], a.gelu, act, derivative);
          g[e] = dy[e] * u[e] * derivative;  // d gate
          u[e] = dy[e] * act;                // d up
        }
        store_vec<T, VEC>(grad_up + row * stride_out + col, valid, u);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          float act, unused;
          activation(g[e], a.gelu, act, unused);
          g[e] = to_float(from_float<T>(act)) * u[e];  // act(gate) rounded to T first, as transformers does
        }
      }
      store_vec<T, VEC>(out + row * stride_out + col, valid, g);
    }
  }
}

template <typename T>
cudaError_t launch_typed(const Args& a, const GatedPlan& plan, bool backward, void* out, int64_t stride_out,
                         void* grad_up, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const dim3 grid(plan.col_blocks, plan.row_blocks);
  T* const outputs[2] = {static_cast<T*>(out), static_cast<T*>(grad_up)};
  if (backward && plan.vec == kVec) {
    L2VF_LAUNCH((gated_kernel<T, kVec, true>), grid, kThreads, stream, a, outputs[0], stride_out, outputs[1]);
  } else if (backward) {
    L2VF_LAUNCH((gated_kernel<T, 1, true>), grid, kThreads, stream, a, outputs[0], stride_out, outputs[1]);
  } else if (plan.vec == kVec) {
    L2VF_LAUNCH((gated_kernel<T, kVec, false>), grid, kThreads, stream, a, outputs[0], stride_out, outputs[1]);
  } else {
    L2VF_LAUNCH((gated_kernel<T, 1, false>), grid, kThreads, stream, a, outputs[0], stride_out, outputs[1]);
  }
  return cudaGetLastError();
}

cudaError_t dispatch(const GatedProblem& p, const GatedPlan& plan, bool backward, void* out, int64_t stride_out,
                     void* grad_up, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  const Args a{p.gate, p.stride_gate, p.up, p.stride_up, p.grad, p.stride_grad, p.rows, p.cols, p.gelu};
  switch (p.dtype) {
    case DType::kFloat16: return launch_typed<__half>(a, plan, backward, out, stride_out, grad_up, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(a, plan, backward, out, stride_out, grad_up, stream);
    default: return launch_typed<float>(a, plan, backward, out, stride_out, grad_up, stream);
  }
}

}  // namespace

GatedPlan gated_plan(const GatedProblem& p, const void* out, int64_t stride_out, bool backward) {
  GatedPlan plan;
  const int bytes = element_bytes(p.dtype);
  const bool aligned = rows_aligned16(p.gate, p.stride_gate, bytes) && rows_aligned16(p.up, p.stride_up, bytes) &&
                       rows_aligned16(out, stride_out, bytes) && (!backward || rows_aligned16(p.grad, p.stride_grad, bytes));
  plan.vec = aligned ? 16 / bytes : 1;
  const int64_t vectors = (p.cols + plan.vec - 1) / plan.vec;
  plan.col_blocks = static_cast<unsigned>((vectors + kThreads - 1) / kThreads);
  plan.row_blocks = static_cast<unsigned>(std::min(kMaxRowBlocks, (p.rows + kRowsPerStep - 1) / kRowsPerStep));
  return plan;
}

cudaError_t gated_forward(const GatedProblem& p, const GatedPlan& plan, void* out, int64_t stride_out,
                          cudaStream_t stream) {
  return dispatch(p, plan, false, out, stride_out, nullptr, stream);
}

cudaError_t gated_backward(const GatedProblem& p, const GatedPlan& plan, void* grad_gate, void* grad_up,
                           cudaStream_t stream) {
  return dispatch(p, plan, true, grad_gate, p.cols, grad_up, stream);
}

}  // namespace l2vf
