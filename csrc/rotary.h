// Plain-C++ interface of the CUDA rotary position embedding (csrc/rotary.cu), the "cuda" backend of
// llm2vec_fast.rotary_embedding: q and k rotated by (cos, sin) over their first R dims, and its gradient.
// No torch headers: csrc/bindings.cpp validates and allocates, then calls these. Semantics (and the
// rounding, bit for bit): llm2vec_fast.reference.rotary.
//
// Layout: q (T, Hq, D) and k (T, Hkv, D) with a unit-stride last dim and free token / head strides (the
// parts of a fused qkv projection are read where they lie); cos and sin (T, R), rows of unit stride, R even,
// 0 < R <= D. The forward's outputs may be q and k themselves (in place).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"

namespace l2vf {

// One (T, H, D) operand: base pointer and strides in elements.
struct RotaryHeads {
  const void* data = nullptr;
  int64_t stride_tok = 0;   // elements between tokens
  int64_t stride_head = 0;  // elements between heads of a token
};

struct RotaryProblem {
  DType dtype = DType::kFloat32;  // of every tensor
  int64_t tokens = 0;             // T
  int64_t heads_q = 0;            // Hq
  int64_t heads_k = 0;            // Hkv
  int64_t dim = 0;                // D
  int64_t rot = 0;                // R: the rotated dims [0, R); [R, D) pass through
  RotaryHeads q, k;               // forward: q and k; backward: grad_q and grad_k
  const void* cos = nullptr;
  int64_t stride_cos = 0;         // elements between tokens
  const void* sin = nullptr;
  int64_t stride_sin = 0;
};

// Where the results go: (T, Hq, D) and (T, Hkv, D) in the inputs' dtype, unit-stride last dim.
struct RotaryOutputs {
  void* q = nullptr;
  int64_t q_stride_tok = 0, q_stride_head = 0;
  void* k = nullptr;
  int64_t k_stride_tok = 0, k_stride_head = 0;
};

// A head row of D elements is cut into "slots" of vec elements: first the rotated pairs (slot s owns the
// columns [s vec, (s + 1) vec) and their partners R / 2 further), then the pass-through columns [R, D) when
// they must be copied. A block is slot_threads x head_lanes threads (the rest of its 256 idle); thread
// (slot lane, head lane) keeps its slots and walks the (token, group of 4 heads) items, head lane first.
struct RotaryPlan {
  int vec = 1;              // elements per access: a 16-byte vector when everything allows it, else 1
  int pair_slots = 0;       // (R / 2) / vec
  int slots = 0;            // pair_slots + the pass-through vectors (0 of them when copy_tail is false)
  int slot_threads = 0;     // threads along the slots (a thread walks slots slot_threads apart)
  int head_lanes = 0;       // threads along the items
  int64_t items = 0;        // T x ceil((Hq + Hkv) / 4)
  unsigned blocks = 0;      // grid.x (<= 65535): blocks walk the items grid-stride
  bool copy_tail = false;   // the pass-through columns are written (false only in place)
};

// Host-only planning: vector width, block shape, grid. The backward's outputs are contiguous (pass them as
// outputs with strides (H D, D)); in the backward the pass-through columns are always copied.
RotaryPlan rotary_plan(const RotaryProblem& p, const RotaryOutputs& out, bool backward);

// Forward: out = q and k rotated (out.q / out.k may be p.q / p.k). cudaSuccess without a launch when there
// is nothing to do.
cudaError_t rotary_forward(const RotaryProblem& p, const RotaryPlan& plan, const RotaryOutputs& out,
                           cudaStream_t stream);

// Backward: out = d q and d k from the gradients p.q = grad_q, p.k = grad_k.
cudaError_t rotary_backward(const RotaryProblem& p, const RotaryPlan& plan, const RotaryOutputs& out,
                            cudaStream_t stream);

}  // namespace l2vf
