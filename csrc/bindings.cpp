// torch bindings of llm2vec_fast._C: the only translation unit that includes torch headers.
//
// Each function validates its tensors (clear TypeError / ValueError / RuntimeError messages, before any
// CUDA work), allocates outputs and workspace with torch (caching allocator, so CUDA graphs can
// capture it), and calls the plain-C++ launchers of the .cu files on torch's current stream, checking
// every CUDA error. The functions are plain pybind11 functions: llm2vec_fast.cuda_backend registers them
// as the "cuda" backend of the public custom ops (llm2vec_fast::pool_forward / pool_backward), which
// carry the schema, the fake (meta) implementations and the autograd formula.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "attention.h"
#include "contrastive.h"
#include "gated.h"
#include "pooling.h"
#include "rms_norm.h"
#include "rotary.h"

namespace {

using l2vf::DType;

DType dtype_of(const at::Tensor& t, const char* fn, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, fn, ": ", name, " must have dtype float32, float16 or bfloat16, got ", t.scalar_type());
  return DType::kFloat32;  // unreachable
}

int mode_of(const std::string& mode, const char* fn) {
  if (mode == "mean") return l2vf::kPoolMean;
  if (mode == "weighted_mean") return l2vf::kPoolWeightedMean;
  if (mode == "last_token" || mode == "eos_token") return l2vf::kPoolLastToken;
  if (mode == "bos_token") return l2vf::kPoolBosToken;
  TORCH_CHECK_VALUE(false, fn, ": mode must be one of ['mean', 'weighted_mean', 'last_token', 'eos_token', ",
                    "'bos_token'], got '", mode, "'");
  return 0;
}

void check_same_cuda_device(const char* fn, const at::Tensor& ref, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), fn, ": ", name, " must be on ", ref.device(),
                    " like hidden, got ", t.device());
}

// A 0/1 mask as contiguous bytes (bool/uint8 are used as they are; other dtypes become `mask != 0`).
at::Tensor mask_bytes(const std::optional<at::Tensor>& mask, const char* fn, const char* name,
                      at::IntArrayRef shape) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  const at::Tensor& m = *mask;
  TORCH_CHECK_VALUE(m.sizes() == shape, fn, ": ", name, " must have shape ", shape, ", got ", m.sizes());
  TORCH_CHECK_TYPE(!m.is_complex(), fn, ": ", name, " must be bool or integer (0/1), got ", m.scalar_type());
  if (m.scalar_type() == at::kBool || m.scalar_type() == at::kByte) return m.contiguous();
  return m.ne(0).contiguous();
}

// Validated inputs and the launcher's view of them. Holds the tensors the raw pointers point into.
struct Prepared {
  l2vf::PoolProblem problem;
  at::Tensor hidden, cu_seqlens, attention_mask, embed_mask;
};

Prepared prepare(const char* fn, const at::Tensor& hidden_in, const std::optional<at::Tensor>& cu_seqlens,
                 const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& embed_mask,
                 const std::string& mode, bool normalize) {
  Prepared r;
  l2vf::PoolProblem& p = r.problem;
  TORCH_CHECK_VALUE(hidden_in.defined(), fn, ": hidden is undefined");
  p.dtype = dtype_of(hidden_in, fn, "hidden");
  p.mode = mode_of(mode, fn);
  p.normalize = normalize;
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  if (packed) {
    TORCH_CHECK_VALUE(hidden_in.dim() == 2, fn, ": hidden must be packed (T, D) with cu_seqlens, got shape ",
                      hidden_in.sizes());
    TORCH_CHECK_VALUE(!(attention_mask.has_value() && attention_mask->defined()), fn,
                      ": attention_mask goes with the padded (B, S, D) layout; pass None with cu_seqlens");
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, fn, ": cu_seqlens must have dtype int32, got ", cu.scalar_type());
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 2, fn, ": cu_seqlens must be 1-D with B+1 >= 2 entries, got shape ",
                      cu.sizes());
    r.cu_seqlens = cu.contiguous();
  } else {
    TORCH_CHECK_VALUE(hidden_in.dim() == 3, fn, ": hidden must be padded (B, S, D) without cu_seqlens, got shape ",
                      hidden_in.sizes());
  }
  r.hidden = hidden_in.stride(-1) == 1 ? hidden_in : hidden_in.contiguous();
  const at::Tensor& h = r.hidden;
  const int64_t tokens = packed ? h.size(0) : h.size(0) * h.size(1);
  TORCH_CHECK_VALUE(tokens < (int64_t{1} << 31), fn, ": at most 2^31 - 1 tokens are supported, got ", tokens);
  if (!packed) r.attention_mask = mask_bytes(attention_mask, fn, "attention_mask", h.sizes().slice(0, 2));
  r.embed_mask = mask_bytes(embed_mask, fn, "embed_mask", h.sizes().slice(0, h.dim() - 1));


  p.hidden = h.data_ptr();
  p.dim = h.size(-1);
  p.stride_tok = packed ? h.stride(0) : h.stride(1);
  p.stride_seq = packed ? 0 : h.stride(0);
  p.cu_seqlens = packed ? r.cu_seqlens.data_ptr<int32_t>() : nullptr;
  p.batch = packed ? r.cu_seqlens.numel() - 1 : h.size(0);
  p.padded_len = packed ? 0 : h.size(1);
  p.total_tokens = tokens;
  p.attention_mask = r.attention_mask.defined() ? static_cast<const uint8_t*>(r.attention_mask.data_ptr()) : nullptr;
  p.embed_mask = r.embed_mask.defined() ? static_cast<const uint8_t*>(r.embed_mask.data_ptr()) : nullptr;
  return r;
}

// After the shape and dtype checks (so that those are testable on CPU tensors): everything on one GPU.
void check_devices(const char* fn, const Prepared& r, const at::Tensor* grad_out = nullptr) {
  const at::Tensor& h = r.hidden;
  TORCH_CHECK_VALUE(h.is_cuda(), fn, ": hidden must be a CUDA tensor, got device ", h.device(),
                    " (the cuda backend runs on CUDA devices only)");
  if (r.cu_seqlens.defined()) check_same_cuda_device(fn, h, "cu_seqlens", r.cu_seqlens);
  if (r.attention_mask.defined()) check_same_cuda_device(fn, h, "attention_mask", r.attention_mask);
  if (r.embed_mask.defined()) check_same_cuda_device(fn, h, "embed_mask", r.embed_mask);
  if (grad_out != nullptr) check_same_cuda_device(fn, h, "grad_out", *grad_out);
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The un-normalised or normalised (B, D) float32 output for a prepared problem.
at::Tensor run_forward(const l2vf::PoolProblem& p, const at::Tensor& like) {
  const auto f32 = like.options().dtype(at::kFloat);
  at::Tensor out = at::empty({p.batch, p.dim}, f32);
  if (p.batch == 0 || p.dim == 0) return out;
  const l2vf::PoolPlan plan = l2vf::pool_plan(p, num_sms(), /*backward=*/false);
  at::Tensor counters, partials;
  if (plan.counter_ints > 0) counters = at::zeros({plan.counter_ints}, like.options().dtype(at::kInt));
  if (plan.partial_floats > 0) partials = at::empty({plan.partial_floats}, f32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(l2vf::pool_forward(p, plan, out.data_ptr<float>(),
                                    counters.defined() ? counters.data_ptr<int32_t>() : nullptr,
                                    partials.defined() ? partials.data_ptr<float>() : nullptr, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

at::Tensor pool_forward(const at::Tensor& hidden, const std::optional<at::Tensor>& cu_seqlens,
                        const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& embed_mask,
                        const std::string& mode, bool normalize) {
  const char* fn = "llm2vec_fast._C.pool_forward";
  const Prepared r = prepare(fn, hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize);
  check_devices(fn, r);
  const c10::cuda::CUDAGuard guard(r.hidden.device());
  return run_forward(r.problem, r.hidden);
}

at::Tensor pool_backward(const at::Tensor& grad_out, const at::Tensor& hidden, const std::optional<at::Tensor>& cu_seqlens,
                         const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& embed_mask,
                         const std::string& mode, bool normalize) {
  const char* fn = "llm2vec_fast._C.pool_backward";
  Prepared r = prepare(fn, hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize);
  l2vf::PoolProblem& p = r.problem;
  TORCH_CHECK_VALUE(grad_out.defined(), fn, ": grad_out is undefined");
  dtype_of(grad_out, fn, "grad_out");
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == p.batch && grad_out.size(1) == p.dim, fn,
                    ": grad_out must have shape (", p.batch, ", ", p.dim, "), got ", grad_out.sizes());
  check_devices(fn, r, &grad_out);
  const c10::cuda::CUDAGuard guard(r.hidden.device());

  at::Tensor grad_hidden = at::empty(r.hidden.sizes(), r.hidden.options().memory_format(at::MemoryFormat::Contiguous));
  if (p.batch == 0 || p.dim == 0 || grad_hidden.numel() == 0) return grad_hidden.zero_();
  const at::Tensor grad = grad_out.to(at::kFloat).contiguous();
  at::Tensor pooled, scratch;
  if (normalize) {  // the gradient through the normalisation needs the un-normalised rows: recompute them
    p.normalize = false;
    pooled = run_forward(p, r.hidden);
    p.normalize = true;
  }
  const l2vf::PoolPlan plan = l2vf::pool_plan(p, num_sms(), /*backward=*/true);
  if (plan.grad_floats > 0) scratch = at::empty({plan.grad_floats}, grad.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(l2vf::pool_backward(p, plan, grad.data_ptr<float>(), pooled.defined() ? pooled.data_ptr<float>() : nullptr,
                                     scratch.defined() ? scratch.data_ptr<float>() : nullptr, grad_hidden.data_ptr(),
                                     stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_hidden;
}

// ---------------------------------------------------------------------------------------------------
// contrastive loss, one direction: contract of llm2vec_fast.reference.contrastive.infonce_forward/backward
// ---------------------------------------------------------------------------------------------------
namespace {

// E chunk of the backward, in elements (as kernels/contrastive.py: 64 Mi elements, 128 MiB in bf16).
constexpr int64_t kChunkElements = int64_t{1} << 26;

struct NceInputs {
  at::Tensor a, c;
  l2vf::InfoNCEProblem p;
};

// Validates anchors / candidates (shapes and dtypes first, then devices) and prepares the problem,
// without the inverse norms.
NceInputs prepare_nce(const char* fn, const at::Tensor& anchors, const at::Tensor& candidates, int64_t label_offset,
                      double scale) {
  TORCH_CHECK_VALUE(anchors.defined() && candidates.defined(), fn, ": anchors and candidates must be defined");
  const DType dt = dtype_of(anchors, fn, "anchors");
  dtype_of(candidates, fn, "candidates");
  TORCH_CHECK_TYPE(anchors.scalar_type() == candidates.scalar_type(), fn,
                   ": candidates must have the dtype of anchors (", anchors.scalar_type(), "), got ",
                   candidates.scalar_type());
  TORCH_CHECK_VALUE(anchors.dim() == 2 && candidates.dim() == 2, fn, ": anchors and candidates must be 2-D (rows, D), ",
                    "got shapes ", anchors.sizes(), " and ", candidates.sizes());
  TORCH_CHECK_VALUE(anchors.size(1) == candidates.size(1), fn, ": anchors and candidates must have the same D, got ",
                    anchors.size(1), " and ", candidates.size(1));
  TORCH_CHECK_VALUE(label_offset >= 0 && label_offset + anchors.size(0) <= candidates.size(0), fn,
                    ": the labels label_offset + i must index candidates: label_offset=", label_offset, ", ",
                    anchors.size(0), " anchors, ", candidates.size(0), " candidates");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, fn, ": scale must be a finite number > 0, got ", scale);
  TORCH_CHECK_VALUE(anchors.is_cuda(), fn, ": anchors must be a CUDA tensor, got device ", anchors.device(),
                    " (the cuda backend runs on CUDA devices only)");
  check_same_cuda_device(fn, anchors, "candidates", candidates);
  NceInputs r;
  r.a = anchors.stride(-1) == 1 ? anchors : anchors.contiguous();
  r.c = candidates.stride(-1) == 1 ? candidates : candidates.contiguous();
  l2vf::InfoNCEProblem& p = r.p;
  p.anchors = r.a.data_ptr();
  p.candidates = r.c.data_ptr();
  p.dtype = dt;
  p.n_anchors = r.a.size(0);
  p.n_candidates = r.c.size(0);
  p.dim = r.a.size(1);
  p.stride_a = r.a.stride(0);
  p.stride_c = r.c.stride(0);
  p.label_offset = label_offset;
  p.scale = static_cast<float>(scale);
  return r;
}

at::Tensor inverse_norms(const at::Tensor& x, DType dt, cudaStream_t stream) {
  at::Tensor inv = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(l2vf::row_inverse_norms(x.data_ptr(), dt, x.size(0), x.size(1), x.stride(0), inv.data_ptr<float>(),
                                         stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return inv;
}

at::Tensor through_norm(const at::Tensor& x, const at::Tensor& grad_unit, const at::Tensor& inv, DType dt,
                        cudaStream_t stream) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  C10_CUDA_CHECK(l2vf::normalize_backward_rows(x.data_ptr(), grad_unit.data_ptr(), inv.data_ptr<float>(),
                                               out.data_ptr(), dt, x.size(0), x.size(1), x.stride(0),
                                               grad_unit.stride(0), out.stride(0), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> infonce_forward(const at::Tensor& anchors, const at::Tensor& candidates,
                                                   int64_t label_offset, double scale) {
  const char* fn = "llm2vec_fast._C.infonce_forward";
  NceInputs r = prepare_nce(fn, anchors, candidates, label_offset, scale);
  const c10::cuda::CUDAGuard guard(r.a.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor loss = at::empty({r.p.n_anchors}, r.a.options().dtype(at::kFloat));
  at::Tensor lse = at::empty_like(loss);
  if (r.p.n_anchors == 0) return {loss, lse};
  const at::Tensor inv_a = inverse_norms(r.a, r.p.dtype, stream);
  const at::Tensor inv_c = inverse_norms(r.c, r.p.dtype, stream);
  r.p.inv_a = inv_a.data_ptr<float>();
  r.p.inv_c = inv_c.data_ptr<float>();
  r.p.num_sms = num_sms();
  const int64_t workspace_floats = l2vf::infonce_forward_workspace_floats(r.p);
  at::Tensor workspace;
  if (workspace_floats > 0) workspace = at::empty({workspace_floats}, loss.options());
  C10_CUDA_CHECK(l2vf::infonce_forward(r.p, loss.data_ptr<float>(), lse.data_ptr<float>(),
                                       workspace.defined() ? workspace.data_ptr<float>() : nullptr, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> infonce_backward(const at::Tensor& grad_rows, const at::Tensor& anchors,
                                                    const at::Tensor& candidates, const at::Tensor& lse,
                                                    int64_t label_offset, double scale) {
  const char* fn = "llm2vec_fast._C.infonce_backward";
  NceInputs r = prepare_nce(fn, anchors, candidates, label_offset, scale);
  const int64_t rows = r.p.n_anchors, cols = r.p.n_candidates;
  TORCH_CHECK_VALUE(grad_rows.defined() && grad_rows.dim() == 1 && grad_rows.size(0) == rows, fn,
                    ": grad_rows must have shape (", rows, ",), got ", grad_rows.defined() ? grad_rows.sizes() : at::IntArrayRef{});
  dtype_of(grad_rows, fn, "grad_rows");
  TORCH_CHECK_VALUE(lse.defined() && lse.dim() == 1 && lse.size(0) == rows, fn, ": lse must have shape (", rows,
                    ",), got ", lse.defined() ? lse.sizes() : at::IntArrayRef{});
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, fn, ": lse must be float32 (from infonce_forward), got ",
                   lse.scalar_type());
  check_same_cuda_device(fn, r.a, "grad_rows", grad_rows);
  check_same_cuda_device(fn, r.a, "lse", lse);
  const c10::cuda::CUDAGuard guard(r.a.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor g = grad_rows.to(at::kFloat).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor inv_a = inverse_norms(r.a, r.p.dtype, stream);
  const at::Tensor inv_c = inverse_norms(r.c, r.p.dtype, stream);
  r.p.inv_a = inv_a.data_ptr<float>();
  r.p.inv_c = inv_c.data_ptr<float>();
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor grad_unit_a = at::empty(r.a.sizes(), r.a.options().memory_format(contiguous));
  at::Tensor grad_unit_c = at::empty(r.c.sizes(), r.c.options().memory_format(contiguous));
  // The products take unit rows (in the input dtype, computed in float32 and rounded once), not E * inv_norm.
  at::Tensor unit_a = at::empty_like(r.a), unit_c = at::empty_like(r.c);
  at::mul_out(unit_a, r.a, inv_a.unsqueeze(1));
  at::mul_out(unit_c, r.c, inv_c.unsqueeze(1));
  // Pass 1, row-parallel: dU[rows] = E @ unit(C) for a chunk of anchor rows at a time.
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(cols, 1));
  for (int64_t r0 = 0; r0 < rows; r0 += rows_per_chunk) {
    const int64_t r1 = std::min(r0 + rows_per_chunk, rows);
    at::Tensor e = at::empty({r1 - r0, cols}, r.a.options().memory_format(contiguous));
    C10_CUDA_CHECK(l2vf::infonce_grad_scores(r.p, lse_c.data_ptr<float>(), g.data_ptr<float>(), r0, r1, 0, cols,
                                             false, e.data_ptr(), e.stride(0), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor out = grad_unit_a.narrow(0, r0, r1 - r0);
    at::mm_out(out, e, unit_c);
  }
  // Pass 2, column-parallel: dW[cols] = E^T @ unit(A) for a chunk of candidates at a time.
  const int64_t cols_per_chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(rows, 1));
  for (int64_t c0 = 0; c0 < cols; c0 += cols_per_chunk) {
    const int64_t c1 = std::min(c0 + cols_per_chunk, cols);
    at::Tensor e = at::empty({c1 - c0, rows}, r.a.options().memory_format(contiguous));
    C10_CUDA_CHECK(l2vf::infonce_grad_scores(r.p, lse_c.data_ptr<float>(), g.data_ptr<float>(), 0, rows, c0, c1,
                                             true, e.data_ptr(), e.stride(0), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor out = grad_unit_c.narrow(0, c0, c1 - c0);
    at::mm_out(out, e, unit_a);
  }
  return {through_norm(r.a, grad_unit_a, inv_a, r.p.dtype, stream),
          through_norm(r.c, grad_unit_c, inv_c, r.p.dtype, stream)};
}

// Flash-attention forward (non-causal, no dropout): (out (T, Hq, D) in q's dtype, lse (Hq, T) float32),
// the contract of llm2vec_fast.reference.attention.attention_forward. Shape / dtype / layout checks
// first (testable on CPU tensors), then the device ones.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                                     double softmax_scale, double softcap, int64_t v_desc_lbo,
                                                     int64_t v_desc_sbo, int64_t variant) {
  const char* fn = "llm2vec_fast._C.attention_forward";
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK_VALUE(t->defined(), fn, ": ", name, " is undefined");
    TORCH_CHECK_TYPE(t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kHalf, fn, ": ", name,
                     " must have dtype bfloat16 or float16, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 3, fn, ": ", name, " must be packed (T, H, D), got shape ", t->sizes());
    TORCH_CHECK_VALUE(t->size(-1) <= 1 || t->stride(-1) == 1, fn, ": ", name,
                      " must have a contiguous last dim, got strides ", t->strides());
  }
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), fn,
                   ": k and v must have q's dtype (", q.scalar_type(), "), got ", k.scalar_type(), " and ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), fn, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), fn, ": k must have q's token count ", q.size(0), ", got ", k.size(0));
  TORCH_CHECK_VALUE(k.size(2) == q.size(2), fn, ": k must have q's head dim ", q.size(2), ", got ", k.size(2));
  TORCH_CHECK_VALUE(q.size(2) == 64 || q.size(2) == 128, fn, ": head dim must be 64 or 128, got ", q.size(2));
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, fn, ": the query head count ", q.size(1),
                    " must be a multiple of the key/value head count ", k.size(1));
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt, fn, ": cu_seqlens must have dtype int32, got ",
                   cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2, fn,
                    ": cu_seqlens must be 1-D with B+1 >= 2 entries, got shape ", cu_seqlens.sizes());
  TORCH_CHECK_VALUE(max_seqlen >= 0, fn, ": max_seqlen must be >= 0, got ", max_seqlen);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0, fn,
                    ": softmax_scale must be a finite number > 0, got ", softmax_scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, fn, ": softcap must be a finite number >= 0, got ",
                    softcap);
  const at::Tensor cu = cu_seqlens.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  l2vf::AttentionProblem p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dtype = q.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
  p.total_tokens = q.size(0);
  p.batch = cu.numel() - 1;
  p.max_seqlen = max_seqlen;
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.head_dim = q.size(2);
  p.q_stride_tok = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.k_stride_tok = k.stride(0);
  p.k_stride_head = k.stride(1);
  p.v_stride_tok = v.stride(0);
  p.v_stride_head = v.stride(1);
  p.cu_seqlens = cu.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.out_stride_tok = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.lse = lse.data_ptr<float>();
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  TORCH_CHECK_VALUE(v_desc_lbo >= 0 && v_desc_lbo < (1 << 18) && v_desc_sbo >= 0 && v_desc_sbo < (1 << 18), fn,
                    ": v_desc_lbo and v_desc_sbo must be in [0, 2^18), got ", v_desc_lbo, " and ", v_desc_sbo);
  p.v_desc_lbo = static_cast<uint32_t>(v_desc_lbo);
  p.v_desc_sbo = static_cast<uint32_t>(v_desc_sbo);
  TORCH_CHECK_VALUE(variant >= 0 && variant <= 2, fn,
                    ": variant must be 0 (default), 1 (v1) or 2 (v2, warp-specialised), got ", variant);
  p.variant = static_cast<int>(variant);
  if (p.total_tokens > 0) {  // empty tensors may have any data pointer
    const char* why = l2vf::attention_unsupported(p);
    TORCH_CHECK_VALUE(why == nullptr, fn, ": ", why);
  }
  TORCH_CHECK_VALUE(q.is_cuda(), fn, ": q must be a CUDA tensor, got device ", q.device(),
                    " (the cuda backend runs on CUDA devices only)");
  check_same_cuda_device(fn, q, "k", k);
  check_same_cuda_device(fn, q, "v", v);
  check_same_cuda_device(fn, q, "cu_seqlens", cu);
  const c10::cuda::CUDAGuard guard(q.device());
  const char* device_why = l2vf::attention_device_unsupported();
  TORCH_CHECK(device_why == nullptr, fn, ": ", device_why);
  if (p.total_tokens == 0 || max_seqlen == 0) return {out, lse};
  C10_CUDA_CHECK(l2vf::attention_forward(p, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------
// rms_norm: contract of llm2vec_fast.reference.rms_norm.rms_norm_forward / rms_norm_backward, except that
// a call the kernels do not take (rms_norm_plan's `supported`) returns None: the caller runs another backend.
// ---------------------------------------------------------------------------------------------------
namespace {

// t itself where its last dim has unit stride (or at most one entry), else a contiguous copy.
at::Tensor unit_last_dim(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// Rows (N, D) with a contiguous last dim (a copy otherwise); checks shapes and dtypes, then devices.
at::Tensor rows_of(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined() && t.dim() == 2, fn, ": ", name, " must be 2-D rows (N, D), got ",
                    t.defined() ? t.sizes() : at::IntArrayRef{});
  dtype_of(t, fn, name);
  return unit_last_dim(t);
}

void check_dtype_like(const char* fn, const at::Tensor& ref, const char* ref_name, const char* name,
                      const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " must have ", ref_name, "'s dtype ",
                   ref.scalar_type(), ", got ", t.scalar_type());
}

void check_like(const char* fn, const at::Tensor& ref, const char* ref_name, const char* name, const at::Tensor& t) {
  check_dtype_like(fn, ref, ref_name, name, t);
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), fn, ": ", name, " must have ", ref_name, "'s shape ", ref.sizes(),
                    ", got ", t.sizes());
}

// A further input of ref's shape and dtype, as rows: kept alive in `keep`, its pointer and row stride set.
void attach_rows(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name,
                 at::Tensor& keep, const void*& ptr, int64_t& stride) {
  keep = rows_of(fn, name, t);
  check_like(fn, ref, ref_name, name, keep);
  ptr = keep.data_ptr();
  stride = keep.stride(0);
}

// ref on a CUDA device, and the other named tensors on the same one.
void check_cuda(const char* fn, const char* ref_name, const at::Tensor& ref,
                std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  TORCH_CHECK_VALUE(ref.is_cuda(), fn, ": ", ref_name, " must be a CUDA tensor, got device ", ref.device(),
                    " (the cuda backend runs on CUDA devices only)");
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(t->device() == ref.device(), fn, ": ", name, " must be on ", ref.device(), " like ", ref_name,
                      ", got ", t->device());
  }
}

struct NormInputs {
  at::Tensor x, weight, grad_y;
  l2vf::RmsNormProblem p;
};

NormInputs prepare_norm(const char* fn, const at::Tensor& x, const at::Tensor& weight, double eps, double offset,
                        bool gemma, const at::Tensor* grad_y) {
  NormInputs r;
  r.x = rows_of(fn, "x", x);
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 1 && weight.size(0) == r.x.size(1), fn,
                    ": weight must have shape (", r.x.size(1), ",), got ", weight.defined() ? weight.sizes() : at::IntArrayRef{});
  dtype_of(weight, fn, "weight");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, fn, ": eps must be a finite number > 0, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(offset), fn, ": offset must be finite, got ", offset);
  r.weight = weight.contiguous();
  l2vf::RmsNormProblem& p = r.p;
  p.dtype = dtype_of(r.x, fn, "x");
  p.rows = r.x.size(0);
  p.dim = r.x.size(1);
  p.x = r.x.data_ptr();
  p.stride_x = r.x.stride(0);
  p.weight = r.weight.data_ptr();
  p.eps = static_cast<float>(eps);
  p.offset = static_cast<float>(offset);
  p.gemma = gemma;
  if (grad_y != nullptr) attach_rows(fn, "grad_y", *grad_y, r.x, "x", r.grad_y, p.grad_y, p.stride_grad_y);
  return r;
}

// The plan, or unsupported when the weight's dtype is not x's (the kernels read both as one type).
l2vf::RmsNormPlan plan_norm(const NormInputs& r, int sms, bool backward) {
  if (r.weight.scalar_type() != r.x.scalar_type()) return l2vf::RmsNormPlan{};
  return l2vf::rms_norm_plan(r.p, sms, backward);
}

}  // namespace

std::optional<std::tuple<at::Tensor, at::Tensor>> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                   double eps, double offset, bool gemma) {
  const char* fn = "llm2vec_fast._C.rms_norm_forward";
  const NormInputs r = prepare_norm(fn, x, weight, eps, offset, gemma, nullptr);
  check_cuda(fn, "x", r.x, {{"weight", &r.weight}});
  const c10::cuda::CUDAGuard guard(r.x.device());
  const l2vf::RmsNormPlan plan = plan_norm(r, num_sms(), /*backward=*/false);
  if (!plan.supported) return std::nullopt;
  at::Tensor y = at::empty(r.x.sizes(), r.x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor rstd = at::empty({r.p.rows}, r.x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(l2vf::rms_norm_forward(r.p, plan, y.data_ptr(), rstd.data_ptr<float>(),
                                        at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return std::make_tuple(y, rstd);
}

std::optional<std::tuple<at::Tensor, at::Tensor>> rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& rstd,
                                                                    double eps, double offset, bool gemma) {
  const char* fn = "llm2vec_fast._C.rms_norm_backward";
  const NormInputs r = prepare_norm(fn, x, weight, eps, offset, gemma, &grad_y);
  TORCH_CHECK_VALUE(rstd.defined() && rstd.dim() == 1 && rstd.size(0) == r.p.rows, fn, ": rstd must have shape (",
                    r.p.rows, ",), got ", rstd.defined() ? rstd.sizes() : at::IntArrayRef{});
  TORCH_CHECK_TYPE(rstd.scalar_type() == at::kFloat, fn, ": rstd must be float32 (from rms_norm_forward), got ",
                   rstd.scalar_type());
  check_cuda(fn, "x", r.x, {{"weight", &r.weight}, {"grad_y", &r.grad_y}, {"rstd", &rstd}});
  const c10::cuda::CUDAGuard guard(r.x.device());
  const l2vf::RmsNormPlan plan = plan_norm(r, num_sms(), /*backward=*/true);
  if (!plan.supported) return std::nullopt;
  const at::Tensor rstd_c = rstd.contiguous();
  at::Tensor grad_x = at::empty(r.x.sizes(), r.x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor partial = at::empty({plan.partial_rows, r.p.dim}, r.x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(l2vf::rms_norm_backward(r.p, plan, rstd_c.data_ptr<float>(), grad_x.data_ptr(),
                                         partial.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return std::make_tuple(grad_x, partial.sum(0).to(r.weight.scalar_type()));
}

// The launch plan for these rows (CPU tensors work: launches nothing). num_sms defaults to an H100 SXM's 132.
pybind11::dict rms_norm_plan(const at::Tensor& x, const at::Tensor& weight, bool backward, int64_t num_sms) {
  const char* fn = "llm2vec_fast._C.rms_norm_plan";
  const NormInputs r = prepare_norm(fn, x, weight, 1e-6, 0.0, false, backward ? &x : nullptr);
  const l2vf::RmsNormPlan plan = plan_norm(r, static_cast<int>(num_sms), backward);
  pybind11::dict d;
  d["supported"] = plan.supported;
  d["vec"] = plan.vec;
  d["warps_per_row"] = plan.warps_per_row;
  d["vecs_per_thread"] = plan.vecs_per_thread;
  d["blocks"] = plan.blocks;
  d["partial_rows"] = plan.partial_rows;
  return d;
}

// ---------------------------------------------------------------------------------------------------
// gated_activation: contract of llm2vec_fast.reference.gated.gated_forward / gated_backward
// ---------------------------------------------------------------------------------------------------
namespace {

struct GatedInputs {
  at::Tensor gate, up, grad;
  l2vf::GatedProblem p;
};

GatedInputs prepare_gated(const char* fn, const at::Tensor& gate, const at::Tensor& up, bool gelu,
                          const at::Tensor* grad) {
  GatedInputs r;
  r.gate = rows_of(fn, "gate", gate);
  l2vf::GatedProblem& p = r.p;
  p.dtype = dtype_of(r.gate, fn, "gate");
  p.rows = r.gate.size(0);
  p.cols = r.gate.size(1);
  p.gate = r.gate.data_ptr();
  p.stride_gate = r.gate.stride(0);
  attach_rows(fn, "up", up, r.gate, "gate", r.up, p.up, p.stride_up);
  p.gelu = gelu;
  if (grad != nullptr) attach_rows(fn, "grad", *grad, r.gate, "gate", r.grad, p.grad, p.stride_grad);
  return r;
}

}  // namespace

at::Tensor gated_forward(const at::Tensor& gate, const at::Tensor& up, bool gelu, const std::optional<at::Tensor>& out) {
  const char* fn = "llm2vec_fast._C.gated_forward";
  const GatedInputs r = prepare_gated(fn, gate, up, gelu, nullptr);
  at::Tensor result;
  if (out.has_value() && out->defined()) {
    result = *out;
    check_like(fn, r.gate, "gate", "out", result);
    TORCH_CHECK_VALUE(result.size(1) <= 1 || result.stride(1) == 1, fn, ": out must have a contiguous last dim, got "
                      "strides ", result.strides());
  } else {
    result = at::empty(r.gate.sizes(), r.gate.options().memory_format(at::MemoryFormat::Contiguous));
  }
  check_cuda(fn, "gate", r.gate, {{"up", &r.up}, {"out", &result}});
  const c10::cuda::CUDAGuard guard(r.gate.device());
  const l2vf::GatedPlan plan = l2vf::gated_plan(r.p, result.data_ptr(), result.stride(0), /*backward=*/false);
  C10_CUDA_CHECK(l2vf::gated_forward(r.p, plan, result.data_ptr(), result.stride(0), at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

std::tuple<at::Tensor, at::Tensor> gated_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                                  bool gelu) {
  const char* fn = "llm2vec_fast._C.gated_backward";
  const GatedInputs r = prepare_gated(fn, gate, up, gelu, &grad);
  check_cuda(fn, "gate", r.gate, {{"up", &r.up}, {"grad", &r.grad}});
  const c10::cuda::CUDAGuard guard(r.gate.device());
  const auto contiguous = r.gate.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_gate = at::empty(r.gate.sizes(), contiguous), grad_up = at::empty(r.gate.sizes(), contiguous);
  const l2vf::GatedPlan plan = l2vf::gated_plan(r.p, grad_gate.data_ptr(), r.p.cols, /*backward=*/true);
  C10_CUDA_CHECK(l2vf::gated_backward(r.p, plan, grad_gate.data_ptr(), grad_up.data_ptr(),
                                      at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_gate, grad_up};
}

// The launch plan (vector width, grid) for these rows; CPU tensors work (launches nothing). The output is
// a contiguous tensor like gate unless `out` is given.
pybind11::dict gated_plan(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& out,
                          bool backward) {
  const GatedInputs r = prepare_gated("llm2vec_fast._C.gated_plan", gate, up, false, backward ? &gate : nullptr);
  const at::Tensor target = out.has_value() && out->defined() ? *out : at::empty_like(r.gate, at::MemoryFormat::Contiguous);
  const l2vf::GatedPlan plan = l2vf::gated_plan(r.p, target.data_ptr(), target.stride(0), backward);
  pybind11::dict d;
  d["vec"] = plan.vec;
  d["col_blocks"] = plan.col_blocks;
  d["row_blocks"] = plan.row_blocks;
  return d;
}

// ---------------------------------------------------------------------------------------------------
// rotary_embedding: contract of llm2vec_fast.reference.rotary.rotary_forward / rotary_backward
// ---------------------------------------------------------------------------------------------------
namespace {

// Rows longer than this do not fit the plan's int slot counts.
constexpr int64_t kMaxRotaryDim = int64_t{1} << 30;

// Stride of dim d in elements, or 0 where the dim has at most one entry (its stride is then never used, and
// may be anything: the plan must not decline 16-byte vectors for it).
int64_t stride_of(const at::Tensor& t, int64_t d) { return t.size(d) > 1 ? t.stride(d) : 0; }

// (T, H, D) heads with a unit-stride last dim (a copy otherwise); checks the shape and the dtype.
at::Tensor heads_of(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined() && t.dim() == 3, fn, ": ", name, " must be 3-D (T, H, D), got shape ",
                    t.defined() ? t.sizes() : at::IntArrayRef{});
  dtype_of(t, fn, name);
  return unit_last_dim(t);
}

// (T, R) angles with a unit-stride last dim (a copy otherwise).
at::Tensor angles_of(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& q,
                     const char* q_name) {
  TORCH_CHECK_VALUE(t.defined() && t.dim() == 2 && t.size(0) == q.size(0), fn, ": ", name,
                    " must be 2-D (T, R) with T = ", q.size(0), " like ", q_name, ", got shape ",
                    t.defined() ? t.sizes() : at::IntArrayRef{});
  dtype_of(t, fn, name);
  check_dtype_like(fn, q, q_name, name, t);
  return unit_last_dim(t);
}

struct RotaryInputs {
  at::Tensor q, k, cos, sin;  // forward: q and k; backward: grad_q and grad_k
  l2vf::RotaryProblem p;
};

RotaryInputs prepare_rotary(const char* fn, const char* q_name, const at::Tensor& q, const char* k_name,
                            const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  RotaryInputs r;
  r.q = heads_of(fn, q_name, q);
  r.k = heads_of(fn, k_name, k);
  check_dtype_like(fn, r.q, q_name, k_name, r.k);
  const int64_t tokens = r.q.size(0), dim = r.q.size(2);
  TORCH_CHECK_VALUE(r.k.size(0) == tokens && r.k.size(2) == dim, fn, ": ", k_name, " must be (", tokens, ", Hkv, ",
                    dim, ") like ", q_name, ", got shape ", r.k.sizes());
  TORCH_CHECK_VALUE(dim <= kMaxRotaryDim, fn, ": D must be at most ", kMaxRotaryDim, ", got ", dim);
  r.cos = angles_of(fn, "cos", cos, r.q, q_name);
  r.sin = angles_of(fn, "sin", sin, r.q, q_name);
  TORCH_CHECK_VALUE(r.sin.sizes() == r.cos.sizes(), fn, ": sin must have cos's shape ", r.cos.sizes(), ", got ",
                    r.sin.sizes());
  const int64_t rot = r.cos.size(1);
  TORCH_CHECK_VALUE(rot % 2 == 0 && rot > 0 && rot <= dim, fn, ": cos and sin must have an even width R with "
                    "0 < R <= D = ", dim, ", got R = ", rot);
  l2vf::RotaryProblem& p = r.p;
  p.dtype = dtype_of(r.q, fn, q_name);
  p.tokens = tokens;
  p.heads_q = r.q.size(1);
  p.heads_k = r.k.size(1);
  p.dim = dim;
  p.rot = rot;
  p.q = {r.q.data_ptr(), stride_of(r.q, 0), stride_of(r.q, 1)};
  p.k = {r.k.data_ptr(), stride_of(r.k, 0), stride_of(r.k, 1)};
  p.cos = r.cos.data_ptr();
  p.stride_cos = stride_of(r.cos, 0);
  p.sin = r.sin.data_ptr();
  p.stride_sin = stride_of(r.sin, 0);
  return r;
}

// The forward's output for `ref`: `out` when given (ref's shape and dtype, a unit-stride last dim; it may be
// the input itself), else a new contiguous tensor.
at::Tensor rotary_output(const char* fn, const char* name, const std::optional<at::Tensor>& out, const at::Tensor& ref,
                         const char* ref_name) {
  if (!out.has_value() || !out->defined()) {
    return at::empty(ref.sizes(), ref.options().memory_format(at::MemoryFormat::Contiguous));
  }
  const at::Tensor& t = *out;
  check_like(fn, ref, ref_name, name, t);
  TORCH_CHECK_VALUE(t.size(2) <= 1 || t.stride(2) == 1, fn, ": ", name, " must have a unit-stride last dim, got "
                    "strides ", t.strides());
  return t;
}

l2vf::RotaryOutputs rotary_outputs(at::Tensor& out_q, at::Tensor& out_k) {
  l2vf::RotaryOutputs o;
  o.q = out_q.data_ptr();
  o.q_stride_tok = stride_of(out_q, 0);
  o.q_stride_head = stride_of(out_q, 1);
  o.k = out_k.data_ptr();
  o.k_stride_tok = stride_of(out_k, 0);
  o.k_stride_head = stride_of(out_k, 1);
  return o;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                  const at::Tensor& sin, const std::optional<at::Tensor>& out_q,
                                                  const std::optional<at::Tensor>& out_k) {
  const char* fn = "llm2vec_fast._C.rotary_forward";
  const RotaryInputs r = prepare_rotary(fn, "q", q, "k", k, cos, sin);
  at::Tensor result_q = rotary_output(fn, "out_q", out_q, r.q, "q");
  at::Tensor result_k = rotary_output(fn, "out_k", out_k, r.k, "k");
  check_cuda(fn, "q", r.q, {{"k", &r.k}, {"cos", &r.cos}, {"sin", &r.sin}, {"out_q", &result_q}, {"out_k", &result_k}});
  const c10::cuda::CUDAGuard guard(r.q.device());
  const l2vf::RotaryOutputs o = rotary_outputs(result_q, result_k);
  const l2vf::RotaryPlan plan = l2vf::rotary_plan(r.p, o, /*backward=*/false);
  C10_CUDA_CHECK(l2vf::rotary_forward(r.p, plan, o, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {result_q, result_k};
}

std::tuple<at::Tensor, at::Tensor> rotary_backward(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                   const at::Tensor& cos, const at::Tensor& sin) {
  const char* fn = "llm2vec_fast._C.rotary_backward";
  const RotaryInputs r = prepare_rotary(fn, "grad_q", grad_q, "grad_k", grad_k, cos, sin);
  check_cuda(fn, "grad_q", r.q, {{"grad_k", &r.k}, {"cos", &r.cos}, {"sin", &r.sin}});
  const c10::cuda::CUDAGuard guard(r.q.device());
  const auto contiguous = r.q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(r.q.sizes(), contiguous), dk = at::empty(r.k.sizes(), contiguous);
  const l2vf::RotaryOutputs o = rotary_outputs(dq, dk);
  const l2vf::RotaryPlan plan = l2vf::rotary_plan(r.p, o, /*backward=*/true);
  C10_CUDA_CHECK(l2vf::rotary_backward(r.p, plan, o, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk};
}

// The launch plan (vector width, block shape, grid) for these inputs; CPU tensors work (launches nothing). The
// outputs are contiguous tensors like q and k unless out_q / out_k are given (the backward's always are).
pybind11::dict rotary_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                           const std::optional<at::Tensor>& out_q, const std::optional<at::Tensor>& out_k,
                           bool backward) {
  const char* fn = "llm2vec_fast._C.rotary_plan";
  const RotaryInputs r = prepare_rotary(fn, "q", q, "k", k, cos, sin);
  const std::optional<at::Tensor> none;
  at::Tensor target_q = rotary_output(fn, "out_q", backward ? none : out_q, r.q, "q");
  at::Tensor target_k = rotary_output(fn, "out_k", backward ? none : out_k, r.k, "k");
  const l2vf::RotaryPlan plan = l2vf::rotary_plan(r.p, rotary_outputs(target_q, target_k), backward);
  pybind11::dict d;
  d["vec"] = plan.vec;
  d["pair_slots"] = plan.pair_slots;
  d["slots"] = plan.slots;
  d["slot_threads"] = plan.slot_threads;
  d["head_lanes"] = plan.head_lanes;
  d["items"] = plan.items;
  d["blocks"] = plan.blocks;
  d["copy_tail"] = plan.copy_tail;
  return d;
}

// The launch plan for these inputs, without launching anything (works on CPU tensors: for tests and
// for the resource report). num_sms defaults to an H100 SXM's 132.
pybind11::dict pool_plan(const at::Tensor& hidden, const std::optional<at::Tensor>& cu_seqlens,
                         const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& embed_mask,
                         const std::string& mode, bool normalize, bool backward, int64_t num_sms) {
  const Prepared r = prepare("llm2vec_fast._C.pool_plan", hidden, cu_seqlens, attention_mask, embed_mask, mode,
                             normalize);
  const l2vf::PoolPlan plan = l2vf::pool_plan(r.problem, static_cast<int>(num_sms), backward);
  pybind11::dict d;
  d["vec"] = plan.vec;
  d["slices"] = plan.slices;
  d["nsplit"] = plan.nsplit;
  d["counter_ints"] = plan.counter_ints;
  d["partial_floats"] = plan.partial_floats;
  d["grad_floats"] = plan.grad_floats;
  d["threads"] = 256;
  return d;
}

// The torch and CUDA versions of the build (set by llm2vec_fast.tools.cuda_build.compile_flags).
#define L2VF_STRING_(x) #x
#define L2VF_STRING(x) L2VF_STRING_(x)
#ifdef L2VF_TORCH_VERSION
#define L2VF_BUILD_INFO "torch " L2VF_STRING(L2VF_TORCH_VERSION) ", CUDA " L2VF_STRING(L2VF_CUDA_VERSION)
#else
#define L2VF_BUILD_INFO "unknown (built without llm2vec_fast.tools.cuda_build's flags)"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.attr("build_info") = L2VF_BUILD_INFO;
  m.doc() = "llm2vec-fast CUDA kernels (sm_90a): pooling, the contrastive loss, the attention forward, RMSNorm and "
            "the gated activation, the rotary embedding. Used through "
            "llm2vec_fast.cuda_backend.";
  m.def("pool_forward", &pool_forward,
        "(B, D) float32 pooled (and optionally L2-normalised) embeddings; same contract as "
        "llm2vec_fast.reference.pooling.pool_forward",
        py::arg("hidden"), py::arg("cu_seqlens"), py::arg("attention_mask"), py::arg("embed_mask"), py::arg("mode"),
        py::arg("normalize"));
  m.def("pool_backward", &pool_backward,
        "Gradient of pool_forward w.r.t. hidden: contiguous, hidden's shape and dtype",
        py::arg("grad_out"), py::arg("hidden"), py::arg("cu_seqlens"), py::arg("attention_mask"),
        py::arg("embed_mask"), py::arg("mode"), py::arg("normalize"));
  m.def("pool_plan", &pool_plan, "The launch plan (vector width, blocks, workspace) for these inputs; launches nothing",
        py::arg("hidden"), py::arg("cu_seqlens") = py::none(), py::arg("attention_mask") = py::none(),
        py::arg("embed_mask") = py::none(), py::arg("mode") = "mean", py::arg("normalize") = false,
        py::arg("backward") = false, py::arg("num_sms") = 132);
  m.def("infonce_forward", &infonce_forward,
        "(row_loss (A,), lse (A,)) float32 of one InfoNCE direction; same contract as "
        "llm2vec_fast.reference.contrastive.infonce_forward",
        py::arg("anchors"), py::arg("candidates"), py::arg("label_offset"), py::arg("scale"));
  m.def("infonce_backward", &infonce_backward,
        "(grad_anchors, grad_candidates) in the inputs' dtypes, contiguous; same contract as "
        "llm2vec_fast.reference.contrastive.infonce_backward",
        py::arg("grad_rows"), py::arg("anchors"), py::arg("candidates"), py::arg("lse"), py::arg("label_offset"),
        py::arg("scale"));
  m.def("rms_norm_forward", &rms_norm_forward,
        "(y like x, rstd (N,) float32) of RMSNorm over rows x (N, D); None when the kernels do not take the call "
        "(see rms_norm_plan); same contract as llm2vec_fast.reference.rms_norm.rms_norm_forward",
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("offset"), py::arg("gemma"));
  m.def("rms_norm_backward", &rms_norm_backward,
        "(grad_x like x, grad_weight like weight), or None when the kernels do not take the call; same contract as "
        "llm2vec_fast.reference.rms_norm.rms_norm_backward",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("rstd"), py::arg("eps"), py::arg("offset"),
        py::arg("gemma"));
  m.def("rms_norm_plan", &rms_norm_plan, "The launch plan for these rows (supported, vector width, warps per row, "
        "vectors per thread, blocks); launches nothing",
        py::arg("x"), py::arg("weight"), py::arg("backward") = false, py::arg("num_sms") = 132);
  m.def("gated_forward", &gated_forward,
        "act(gate) * up for rows (N, I), into out when given (it may be gate); same contract as "
        "llm2vec_fast.reference.gated.gated_forward",
        py::arg("gate"), py::arg("up"), py::arg("gelu"), py::arg("out") = py::none());
  m.def("gated_backward", &gated_backward,
        "(grad_gate, grad_up), contiguous; same contract as llm2vec_fast.reference.gated.gated_backward",
        py::arg("grad"), py::arg("gate"), py::arg("up"), py::arg("gelu"));
  m.def("gated_plan", &gated_plan, "The launch plan (vector width, grid) for these rows; launches nothing",
        py::arg("gate"), py::arg("up"), py::arg("out") = py::none(), py::arg("backward") = false);
  m.def("rotary_forward", &rotary_forward,
        "(q, k) rotated by (cos, sin) over their first R dims, for q (T, Hq, D), k (T, Hkv, D), cos and sin (T, R); "
        "into out_q / out_k when given (they may be q and k); same contract as "
        "llm2vec_fast.reference.rotary.rotary_forward",
        py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("out_q") = py::none(),
        py::arg("out_k") = py::none());
  m.def("rotary_backward", &rotary_backward,
        "(grad_q, grad_k) rotated back, contiguous; same contract as llm2vec_fast.reference.rotary.rotary_backward",
        py::arg("grad_q"), py::arg("grad_k"), py::arg("cos"), py::arg("sin"));
  m.def("rotary_plan", &rotary_plan, "The launch plan (vector width, block shape, grid) for these inputs; launches "
        "nothing", py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("out_q") = py::none(),
        py::arg("out_k") = py::none(), py::arg("backward") = false);
  m.def("attention_forward", &attention_forward,
        "(out (T, Hq, D) in q's dtype, lse (Hq, T) float32) of non-causal attention without dropout on the "
        "packed varlen layout (Hopper sm_90 only: TMA + wgmma); variant 0 = default (v1), 1 = v1, 2 = v2 "
        "(warp-specialised); same contract as "
        "llm2vec_fast.reference.attention.attention_forward",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens"), py::arg("max_seqlen"),
        py::arg("softmax_scale"), py::arg("softcap"), py::arg("v_desc_lbo") = 0, py::arg("v_desc_sbo") = 0,
        py::arg("variant") = 0);
}
