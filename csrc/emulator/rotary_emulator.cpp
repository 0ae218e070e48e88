// csrc/rotary.cu compiled for the CPU emulator (cuda_emulator.h), behind a C interface for ctypes.
// Driven by tests/cuda_support.py (EmulatedExtension), which prepares the tensors as csrc/bindings.cpp does;
// never part of the extension.
#include "cuda_emulator.h"

#include "../rotary.cu"

namespace {

// Plan fields written to plan_out, in this order (cuda_support.ROTARY_PLAN_KEYS).
void write_plan(const l2vf::RotaryPlan& plan, int64_t* plan_out) {
  plan_out[0] = plan.vec;
  plan_out[1] = plan.pair_slots;
  plan_out[2] = plan.slots;
  plan_out[3] = plan.slot_threads;
  plan_out[4] = plan.head_lanes;
  plan_out[5] = plan.items;
  plan_out[6] = plan.blocks;
  plan_out[7] = plan.copy_tail ? 1 : 0;
}

// Bytes spanned by (tokens, heads, dim) elements with these strides (non-negative), for emu::add_range.
size_t heads_bytes(int64_t tokens, int64_t heads, int64_t dim, int64_t stride_tok, int64_t stride_head,
                   int element_bytes) {
  if (tokens <= 0 || heads <= 0 || dim <= 0) return 0;
  return static_cast<size_t>(((tokens - 1) * stride_tok + (heads - 1) * stride_head + dim) * element_bytes);
}

}  // namespace

extern "C" {

// q, k: the forward's inputs, or the backward's gradients (backward != 0); out_q, out_k: the outputs (the
// forward's may be q and k). plan_out: see write_plan. launch == 0: the plan only (rotary_plan).
int l2vf_emu_rotary(int dtype, int64_t tokens, int64_t heads_q, int64_t heads_k, int64_t dim, int64_t rot,
                    const void* q, int64_t q_stride_tok, int64_t q_stride_head, const void* k, int64_t k_stride_tok,
                    int64_t k_stride_head, const void* cos, int64_t stride_cos, const void* sin, int64_t stride_sin,
                    void* out_q, int64_t out_q_stride_tok, int64_t out_q_stride_head, void* out_k,
                    int64_t out_k_stride_tok, int64_t out_k_stride_head, int backward, int launch,
                    int64_t* plan_out) {
  l2vf::RotaryProblem p;
  p.dtype = static_cast<l2vf::DType>(dtype);
  p.tokens = tokens;
  p.heads_q = heads_q;
  p.heads_k = heads_k;
  p.dim = dim;
  p.rot = rot;
  p.q = {q, q_stride_tok, q_stride_head};
  p.k = {k, k_stride_tok, k_stride_head};
  p.cos = cos;
  p.stride_cos = stride_cos;
  p.sin = sin;
  p.stride_sin = stride_sin;
  l2vf::RotaryOutputs out;
  out.q = out_q;
  out.q_stride_tok = out_q_stride_tok;
  out.q_stride_head = out_q_stride_head;
  out.k = out_k;
  out.k_stride_tok = out_k_stride_tok;
  out.k_stride_head = out_k_stride_head;
  const l2vf::RotaryPlan plan = l2vf::rotary_plan(p, out, backward != 0);
  write_plan(plan, plan_out);
  if (launch == 0) return 0;
  const int bytes = l2vf::element_bytes(p.dtype);
  emu::clear_ranges();
  emu::add_range(q, heads_bytes(tokens, heads_q, dim, q_stride_tok, q_stride_head, bytes));
  emu::add_range(k, heads_bytes(tokens, heads_k, dim, k_stride_tok, k_stride_head, bytes));
  emu::add_range(out_q, heads_bytes(tokens, heads_q, dim, out_q_stride_tok, out_q_stride_head, bytes));
  emu::add_range(out_k, heads_bytes(tokens, heads_k, dim, out_k_stride_tok, out_k_stride_head, bytes));
  emu::add_range(cos, emu::rows_bytes(tokens, stride_cos, rot, bytes));
  emu::add_range(sin, emu::rows_bytes(tokens, stride_sin, rot, bytes));
  const cudaError_t err = backward != 0 ? l2vf::rotary_backward(p, plan, out, nullptr)
                                        : l2vf::rotary_forward(p, plan, out, nullptr);
  emu::clear_ranges();
  return static_cast<int>(err);
}

}  // extern "C"
