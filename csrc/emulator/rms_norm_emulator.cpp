// csrc/rms_norm.cu compiled for the CPU emulator (cuda_emulator.h), behind a C interface for ctypes.
// Driven by tests/cuda_support.py (EmulatedExtension), which prepares the rows as csrc/bindings.cpp does;
// never part of the extension.
#include "cuda_emulator.h"

#include "../rms_norm.cu"

namespace {

l2vf::RmsNormProblem make_problem(int dtype, int64_t rows, int64_t dim, const void* x, int64_t stride_x,
                                  const void* weight, float eps, float offset, int gemma, const void* grad_y,
                                  int64_t stride_grad_y) {
  l2vf::RmsNormProblem p;
  p.dtype = static_cast<l2vf::DType>(dtype);
  p.rows = rows;
  p.dim = dim;
  p.x = x;
  p.stride_x = stride_x;
  p.weight = weight;
  p.eps = eps;
  p.offset = offset;
  p.gemma = gemma != 0;
  p.grad_y = grad_y;
  p.stride_grad_y = stride_grad_y;
  return p;
}

size_t row_span_bytes(const l2vf::RmsNormProblem& p, int64_t stride) {
  return emu::rows_bytes(p.rows, stride, p.dim, l2vf::element_bytes(p.dtype));
}

}  // namespace

extern "C" {

// plan_out: supported, vec, warps_per_row, vecs_per_thread, blocks, partial_rows.
void l2vf_emu_rms_norm_plan(int dtype, int64_t rows, int64_t dim, const void* x, int64_t stride_x, const void* weight,
                            const void* grad_y, int64_t stride_grad_y, int backward, int num_sms, int64_t* plan_out) {
  const l2vf::RmsNormProblem p = make_problem(dtype, rows, dim, x, stride_x, weight, 1e-6f, 0.f, 0, grad_y,
                                              stride_grad_y);
  const l2vf::RmsNormPlan plan = l2vf::rms_norm_plan(p, num_sms, backward != 0);
  const int64_t values[6] = {plan.supported, plan.vec, plan.warps_per_row, plan.vecs_per_thread, plan.blocks,
                             plan.partial_rows};
  for (int i = 0; i < 6; ++i) plan_out[i] = values[i];
}

int l2vf_emu_rms_norm_forward(int dtype, int64_t rows, int64_t dim, const void* x, int64_t stride_x,
                              const void* weight, float eps, float offset, int gemma, void* y, float* rstd) {
  const l2vf::RmsNormProblem p = make_problem(dtype, rows, dim, x, stride_x, weight, eps, offset, gemma, nullptr, 0);
  const l2vf::RmsNormPlan plan = l2vf::rms_norm_plan(p, 1, false);
  emu::clear_ranges();
  emu::add_range(x, row_span_bytes(p, stride_x));
  emu::add_range(weight, row_span_bytes(p, 0));
  emu::add_range(y, row_span_bytes(p, dim));
  emu::add_range(rstd, static_cast<size_t>(rows) * 4);
  const int err = static_cast<int>(l2vf::rms_norm_forward(p, plan, y, rstd, nullptr));
  emu::clear_ranges();
  return err;
}

int l2vf_emu_rms_norm_backward(int dtype, int64_t rows, int64_t dim, const void* x, int64_t stride_x,
                               const void* weight, float offset, int gemma, const void* grad_y, int64_t stride_grad_y,
                               const float* rstd, int num_sms, void* grad_x, float* partial_dw) {
  const l2vf::RmsNormProblem p = make_problem(dtype, rows, dim, x, stride_x, weight, 1e-6f, offset, gemma, grad_y,
                                              stride_grad_y);
  const l2vf::RmsNormPlan plan = l2vf::rms_norm_plan(p, num_sms, true);
  emu::clear_ranges();
  emu::add_range(x, row_span_bytes(p, stride_x));
  emu::add_range(grad_y, row_span_bytes(p, stride_grad_y));
  emu::add_range(weight, row_span_bytes(p, 0));
  emu::add_range(rstd, static_cast<size_t>(rows) * 4);
  emu::add_range(grad_x, row_span_bytes(p, dim));
  emu::add_range(partial_dw, static_cast<size_t>(plan.partial_rows * dim) * 4);
  const int err = static_cast<int>(l2vf::rms_norm_backward(p, plan, rstd, grad_x, partial_dw, nullptr));
  emu::clear_ranges();
  return err;
}

}  // extern "C"
