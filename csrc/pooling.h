// Plain-C++ interface of the CUDA pooling kernels (csrc/pooling.cu). No torch headers here or in the
// .cu: csrc/bindings.cpp validates torch tensors, allocates outputs and workspace and calls these
// launchers with raw pointers, element strides and torch's current stream.
//
// Layouts (see llm2vec_fast.pool): packed hidden (T, D) with cu_seqlens (B+1, int32), or padded
// (B, S, D) with an optional attention_mask (B, S). embed_mask follows the token layout. Masks are
// bytes read as "nonzero = set" (bool/uint8), contiguous in token order. hidden's last dim is contiguous.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"

namespace l2vf {

enum PoolMode : int { kPoolMean = 0, kPoolWeightedMean = 1, kPoolLastToken = 2, kPoolBosToken = 3 };

struct PoolProblem {
  const void* hidden = nullptr;         // (T, D) packed or (B, S, D) padded, element type `dtype`
  DType dtype = DType::kFloat32;
  int64_t stride_seq = 0;               // padded: elements between sequences (hidden.stride(0)); packed: unused
  int64_t stride_tok = 0;               // elements between consecutive tokens
  const int32_t* cu_seqlens = nullptr;  // packed layout; nullptr selects the padded layout
  int64_t batch = 0;                    // B
  int64_t padded_len = 0;               // S (padded layout)
  int64_t total_tokens = 0;             // T (packed) or B * S (padded)
  int64_t dim = 0;                      // D
  const uint8_t* attention_mask = nullptr;  // padded only, B * S bytes, optional
  const uint8_t* embed_mask = nullptr;      // T or B * S bytes, optional
  int mode = kPoolMean;
  bool normalize = false;
};

// How a call is split over thread blocks, and the workspace it needs (chosen by pool_plan).
struct PoolPlan {
  int vec = 1;                 // elements per access: 16 bytes when the rows allow it, else 1
  int64_t slices = 1;          // blocks across D per sequence (32 vectors each); 1 for the token modes' forward
  int nsplit = 1;              // blocks along the tokens of one sequence (for a small batch)
  int64_t counter_ints = 0;    // zero-initialised int32 workspace (last-block-done counters), forward only
  int64_t partial_floats = 0;  // float32 workspace: per-split partial sums, forward only
  int64_t grad_floats = 0;     // float32 workspace: the gradient through the normalisation, backward only
};

// Host-only planning (no CUDA calls). num_sms: the device's multiprocessor count. `backward` plans the
// gradient kernel, whose 16-byte path needs D to be a multiple of the vector width (the gradient is
// allocated contiguous); the forward's needs 16-byte aligned rows (base pointer and token stride).
PoolPlan pool_plan(const PoolProblem& p, int num_sms, bool backward);

// out: (B, D) float32, contiguous. counters (zeroed) / partials: plan.counter_ints / plan.partial_floats
// elements, may be null when those are 0. Returns the first launch error (cudaSuccess when B or D is 0).
cudaError_t pool_forward(const PoolProblem& p, const PoolPlan& plan, float* out, int32_t* counters,
                         float* partials, cudaStream_t stream);

// grad_out: (B, D) float32 contiguous, the gradient of the (normalised if p.normalize) output.
// pooled: the un-normalised forward output (B, D) float32, and grad_scratch: plan.grad_floats floats,
// both needed only when p.normalize. grad_hidden: contiguous, hidden's shape, element type p.dtype;
// every element is written (zeros where a token has no weight).
cudaError_t pool_backward(const PoolProblem& p, const PoolPlan& plan, const float* grad_out, const float* pooled,
                          float* grad_scratch, void* grad_hidden, cudaStream_t stream);

}  // namespace l2vf
