// csrc/pooling.cu compiled for the CPU emulator (cuda_emulator.h), behind a C interface for ctypes.
// Built and driven by tests/test_cuda_kernels.py; never part of the extension (setup.py and
// llm2vec_fast.tools.cuda_build only compile csrc/*.cu and csrc/*.cpp, not this folder).
//
// The entry points mirror csrc/bindings.cpp after its validation: plan, workspace, launches. Every
// buffer is registered with its size so that the kernels' loads and vector stores are bounds-checked.
#include "cuda_emulator.h"

#include "../pooling.cu"

namespace {

l2vf::PoolProblem make_problem(const void* hidden, int dtype, int64_t stride_seq, int64_t stride_tok,
                               const int32_t* cu_seqlens, int64_t batch, int64_t padded_len, int64_t total_tokens,
                               int64_t dim, const uint8_t* attention_mask, const uint8_t* embed_mask, int mode,
                               int normalize) {
  l2vf::PoolProblem p;
  p.hidden = hidden;
  p.dtype = static_cast<l2vf::DType>(dtype);
  p.stride_seq = stride_seq;
  p.stride_tok = stride_tok;
  p.cu_seqlens = cu_seqlens;
  p.batch = batch;
  p.padded_len = padded_len;
  p.total_tokens = total_tokens;
  p.dim = dim;
  p.attention_mask = attention_mask;
  p.embed_mask = embed_mask;
  p.mode = mode;
  p.normalize = normalize != 0;
  return p;
}

void register_inputs(const l2vf::PoolProblem& p, int64_t hidden_bytes) {
  emu::clear_ranges();
  emu::add_range(p.hidden, static_cast<size_t>(hidden_bytes));
  if (p.cu_seqlens != nullptr) emu::add_range(p.cu_seqlens, static_cast<size_t>(p.batch + 1) * 4);
  if (p.attention_mask != nullptr) emu::add_range(p.attention_mask, static_cast<size_t>(p.total_tokens));
  if (p.embed_mask != nullptr) emu::add_range(p.embed_mask, static_cast<size_t>(p.total_tokens));
}

void write_plan(const l2vf::PoolPlan& plan, int64_t* plan_out) {
  if (plan_out == nullptr) return;
  plan_out[0] = plan.vec;
  plan_out[1] = plan.slices;
  plan_out[2] = plan.nsplit;
  plan_out[3] = plan.counter_ints;
  plan_out[4] = plan.partial_floats;
  plan_out[5] = plan.grad_floats;
}

int run_forward(const l2vf::PoolProblem& p, int num_sms, float* out, int64_t* plan_out) {
  const l2vf::PoolPlan plan = l2vf::pool_plan(p, num_sms, false);
  write_plan(plan, plan_out);
  std::vector<int32_t> counters(static_cast<size_t>(plan.counter_ints), 0);
  std::vector<float> partials(static_cast<size_t>(plan.partial_floats), 0.f);
  emu::add_range(out, static_cast<size_t>(p.batch * p.dim) * 4);
  emu::add_range(counters.data(), counters.size() * 4);
  emu::add_range(partials.data(), partials.size() * 4);
  return static_cast<int>(l2vf::pool_forward(p, plan, out, counters.empty() ? nullptr : counters.data(),
                                             partials.empty() ? nullptr : partials.data(), nullptr));
}

}  // namespace

extern "C" {

int l2vf_emu_pool_forward(const void* hidden, int64_t hidden_bytes, int dtype, int64_t stride_seq, int64_t stride_tok,
                          const int32_t* cu_seqlens, int64_t batch, int64_t padded_len, int64_t total_tokens,
                          int64_t dim, const uint8_t* attention_mask, const uint8_t* embed_mask, int mode,
                          int normalize, int num_sms, float* out, int64_t* plan_out) {
  const l2vf::PoolProblem p = make_problem(hidden, dtype, stride_seq, stride_tok, cu_seqlens, batch, padded_len,
                                           total_tokens, dim, attention_mask, embed_mask, mode, normalize);
  register_inputs(p, hidden_bytes);
  const int err = run_forward(p, num_sms, out, plan_out);
  emu::clear_ranges();
  return err;
}

// grad_out: (B, D) float32; grad_hidden: contiguous, total_tokens * dim elements of the hidden dtype.
int l2vf_emu_pool_backward(const float* grad_out, const void* hidden, int64_t hidden_bytes, int dtype,
                           int64_t stride_seq, int64_t stride_tok, const int32_t* cu_seqlens, int64_t batch,
                           int64_t padded_len, int64_t total_tokens, int64_t dim, const uint8_t* attention_mask,
                           const uint8_t* embed_mask, int mode, int normalize, int num_sms, void* grad_hidden,
                           int64_t* plan_out) {
  l2vf::PoolProblem p = make_problem(hidden, dtype, stride_seq, stride_tok, cu_seqlens, batch, padded_len,
                                     total_tokens, dim, attention_mask, embed_mask, mode, normalize);
  register_inputs(p, hidden_bytes);
  emu::add_range(grad_out, static_cast<size_t>(p.batch * p.dim) * 4);
  emu::add_range(grad_hidden, static_cast<size_t>(p.total_tokens * p.dim * l2vf::element_bytes(p.dtype)));
  std::vector<float> pooled, scratch;
  if (p.normalize) {
    pooled.assign(static_cast<size_t>(p.batch * p.dim), 0.f);
    p.normalize = false;
    const int err = run_forward(p, num_sms, pooled.data(), nullptr);
    p.normalize = true;
    if (err != 0) return err;
  }
  const l2vf::PoolPlan plan = l2vf::pool_plan(p, num_sms, true);
  write_plan(plan, plan_out);
  scratch.assign(static_cast<size_t>(plan.grad_floats), 0.f);
  emu::add_range(scratch.data(), scratch.size() * 4);
  const int err = static_cast<int>(l2vf::pool_backward(p, plan, grad_out, pooled.empty() ? nullptr : pooled.data(),
                                                       scratch.empty() ? nullptr : scratch.data(), grad_hidden,
                                                       nullptr));
  emu::clear_ranges();
  return err;
}

}  // extern "C"
