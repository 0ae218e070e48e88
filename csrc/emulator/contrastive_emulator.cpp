// csrc/contrastive.cu compiled for the CPU emulator (cuda_emulator.h), behind a C interface for ctypes.
// Built with pooling_emulator.cpp into one library by tests/test_cuda_kernels.py; the test drives the
// backward's chunk loop and matrix products as csrc/bindings.cpp does (with torch.mm for cuBLAS).
#include "cuda_emulator.h"

#include "../contrastive.cu"

namespace {

l2vf::InfoNCEProblem make_problem(const void* a, int64_t a_bytes, const void* c, int64_t c_bytes, int dtype,
                                  int64_t n_a, int64_t n_c, int64_t dim, int64_t stride_a, int64_t stride_c,
                                  int64_t label_offset, float scale, const float* inv_a, const float* inv_c) {
  emu::clear_ranges();
  emu::add_range(a, static_cast<size_t>(a_bytes));
  emu::add_range(c, static_cast<size_t>(c_bytes));
  emu::add_range(inv_a, static_cast<size_t>(n_a) * 4);
  emu::add_range(inv_c, static_cast<size_t>(n_c) * 4);
  l2vf::InfoNCEProblem p;
  p.anchors = a;
  p.candidates = c;
  p.dtype = static_cast<l2vf::DType>(dtype);
  p.n_anchors = n_a;
  p.n_candidates = n_c;
  p.dim = dim;
  p.stride_a = stride_a;
  p.stride_c = stride_c;
  p.label_offset = label_offset;
  p.scale = scale;
  p.inv_a = inv_a;
  p.inv_c = inv_c;
  return p;
}

}  // namespace

extern "C" {

int l2vf_emu_inverse_norms(const void* x, int64_t x_bytes, int dtype, int64_t rows, int64_t dim, int64_t stride,
                           float* inv) {
  emu::clear_ranges();
  emu::add_range(x, static_cast<size_t>(x_bytes));
  emu::add_range(inv, static_cast<size_t>(rows) * 4);
  const int err = l2vf::row_inverse_norms(x, static_cast<l2vf::DType>(dtype), rows, dim, stride, inv, nullptr);
  emu::clear_ranges();
  return err;
}

// splits_out: the number of candidate ranges the forward used (1: no merge kernel).
int l2vf_emu_infonce_forward(const void* a, int64_t a_bytes, const void* c, int64_t c_bytes, int dtype, int64_t n_a,
                             int64_t n_c, int64_t dim, int64_t stride_a, int64_t stride_c, int64_t label_offset,
                             float scale, const float* inv_a, const float* inv_c, int num_sms, float* loss, float* lse,
                             int* splits_out) {
  l2vf::InfoNCEProblem p = make_problem(a, a_bytes, c, c_bytes, dtype, n_a, n_c, dim, stride_a, stride_c,
                                        label_offset, scale, inv_a, inv_c);
  p.num_sms = num_sms;
  if (splits_out != nullptr) *splits_out = l2vf::infonce_forward_splits(p);
  std::vector<float> workspace(static_cast<size_t>(l2vf::infonce_forward_workspace_floats(p)), 0.f);
  emu::add_range(workspace.data(), workspace.size() * 4);
  emu::add_range(loss, static_cast<size_t>(n_a) * 4);
  emu::add_range(lse, static_cast<size_t>(n_a) * 4);
  const int err = l2vf::infonce_forward(p, loss, lse, workspace.empty() ? nullptr : workspace.data(), nullptr);
  emu::clear_ranges();
  return err;
}

int l2vf_emu_infonce_grad_scores(const void* a, int64_t a_bytes, const void* c, int64_t c_bytes, int dtype,
                                 int64_t n_a, int64_t n_c, int64_t dim, int64_t stride_a, int64_t stride_c,
                                 int64_t label_offset, float scale, const float* inv_a, const float* inv_c,
                                 const float* lse, const float* grad_rows, int64_t r0, int64_t r1, int64_t c0,
                                 int64_t c1, int transposed, void* e, int64_t e_bytes, int64_t stride_e) {
  const l2vf::InfoNCEProblem p = make_problem(a, a_bytes, c, c_bytes, dtype, n_a, n_c, dim, stride_a, stride_c,
                                              label_offset, scale, inv_a, inv_c);
  emu::add_range(lse, static_cast<size_t>(n_a) * 4);
  emu::add_range(grad_rows, static_cast<size_t>(n_a) * 4);
  emu::add_range(e, static_cast<size_t>(e_bytes));
  const int err = l2vf::infonce_grad_scores(p, lse, grad_rows, r0, r1, c0, c1, transposed != 0, e, stride_e, nullptr);
  emu::clear_ranges();
  return err;
}

int l2vf_emu_normalize_backward_rows(const void* x, int64_t x_bytes, const void* g, int64_t g_bytes, const float* inv,
                                     void* out, int64_t out_bytes, int dtype, int64_t rows, int64_t dim,
                                     int64_t stride_x, int64_t stride_g, int64_t stride_o) {
  emu::clear_ranges();
  emu::add_range(x, static_cast<size_t>(x_bytes));
  emu::add_range(g, static_cast<size_t>(g_bytes));
  emu::add_range(inv, static_cast<size_t>(rows) * 4);
  emu::add_range(out, static_cast<size_t>(out_bytes));
  const int err = l2vf::normalize_backward_rows(x, g, inv, out, static_cast<l2vf::DType>(dtype), rows, dim, stride_x,
                                                stride_g, stride_o, nullptr);
  emu::clear_ranges();
  return err;
}

}  // extern "C"
