// Plain-C++ interface of the CUDA gated-activation kernels (csrc/gated.cu), the "cuda" backend of
// llm2vec_fast.gated_activation: act(gate) * up and its gradient. No torch headers: csrc/bindings.cpp
// validates and allocates, then calls these. Semantics: llm2vec_fast.reference.gated.
//
// Rows: (N, I) with a contiguous last dim and a row stride each (the two halves of a fused gate_up
// projection are read where they lie). The forward's output may be gate itself (in place).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"

namespace l2vf {

struct GatedProblem {
  DType dtype = DType::kFloat32;  // of every tensor
  int64_t rows = 0;               // N
  int64_t cols = 0;               // I
  const void* gate = nullptr;
  int64_t stride_gate = 0;        // elements between rows
  const void* up = nullptr;
  int64_t stride_up = 0;
  bool gelu = false;              // false: silu (SwiGLU); true: GELU's tanh form (GeGLU)
  // backward only
  const void* grad = nullptr;
  int64_t stride_grad = 0;
};

struct GatedPlan {
  int vec = 1;              // elements per access: a 16-byte vector when every row allows it, else 1
  unsigned col_blocks = 0;  // grid.x: 256 vectors of a row per block
  unsigned row_blocks = 0;  // grid.y (<= 65535): a block walks rows kRowsPerStep at a time, strided
};

// Host-only planning. out / stride_out: the forward's output; the backward's two outputs are contiguous
// (row stride I), pass them as out with stride I.
GatedPlan gated_plan(const GatedProblem& p, const void* out, int64_t stride_out, bool backward);

// out: (N, I) rows of stride stride_out (may be p.gate). cudaSuccess without a launch when N or I is 0.
cudaError_t gated_forward(const GatedProblem& p, const GatedPlan& plan, void* out, int64_t stride_out,
                          cudaStream_t stream);

// grad_gate, grad_up: (N, I) contiguous, the inputs' dtype.
cudaError_t gated_backward(const GatedProblem& p, const GatedPlan& plan, void* grad_gate, void* grad_up,
                           cudaStream_t stream);

}  // namespace l2vf
