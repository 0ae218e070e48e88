// Plain-C++ interface of the CUDA RMSNorm kernels (csrc/rms_norm.cu), the "cuda" backend of
// llm2vec_fast.rms_norm. No torch headers: csrc/bindings.cpp validates and allocates, then calls these.
//
// Rows: x (N, D) with a contiguous last dim and a row stride; weight (D,) contiguous, x's dtype. Outputs
// (y, dx) are contiguous (row stride D). Semantics: llm2vec_fast.reference.rms_norm.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"

namespace l2vf {

struct RmsNormProblem {
  DType dtype = DType::kFloat32;  // of x, weight, y / dy / dx
  int64_t rows = 0;               // N
  int64_t dim = 0;                // D
  const void* x = nullptr;
  int64_t stride_x = 0;           // elements between rows of x
  const void* weight = nullptr;
  float eps = 1e-6f;
  float offset = 0.f;             // the weight is (offset + weight): 1 for Gemma's stored w - 1
  bool gemma = false;             // casting mode: false "llama" (n rounded to x's dtype first), true "gemma"
  // backward only
  const void* grad_y = nullptr;
  int64_t stride_grad_y = 0;
};

// How a call is split (chosen by rms_norm_plan). supported == false: the kernels do not take this call
// (misaligned rows, D not a multiple of the 16-byte vector, D wider than kMaxDim); the caller runs another
// backend.
struct RmsNormPlan {
  bool supported = false;
  int vec = 1;                  // elements per 16-byte vector
  int warps_per_row = 1;        // 1, 2, 4 or 8 warps share a row; a block of 8 warps holds 8 / warps_per_row rows
  int vecs_per_thread = 1;      // 1, 2 or 4 vectors of the row per thread, kept in registers
  int64_t blocks = 0;           // grid size
  int64_t partial_rows = 0;     // backward: rows of float32 partial dw (summed by the caller), one per row group
};

constexpr int64_t kRmsNormMaxDim = 8192;  // as the Triton kernels' MAX_D

// Host-only planning (no CUDA calls); num_sms sizes the backward's grid. The forward needs x, weight
// and a contiguous y; the backward also grad_y and a contiguous dx.
RmsNormPlan rms_norm_plan(const RmsNormProblem& p, int num_sms, bool backward);

// y: (N, D) contiguous, x's dtype; rstd: (N,) float32 (1 / sqrt(mean(x^2) + eps), for the backward).
cudaError_t rms_norm_forward(const RmsNormProblem& p, const RmsNormPlan& plan, void* y, float* rstd,
                             cudaStream_t stream);

// grad_x: (N, D) contiguous, x's dtype; partial_dw: plan.partial_rows x D float32, every element written
// (dw is their sum over rows, in the weight's dtype).
cudaError_t rms_norm_backward(const RmsNormProblem& p, const RmsNormPlan& plan, const float* rstd, void* grad_x,
                              float* partial_dw, cudaStream_t stream);

}  // namespace l2vf
