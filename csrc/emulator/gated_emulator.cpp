// csrc/gated.cu compiled for the CPU emulator (cuda_emulator.h), behind a C interface for ctypes.
// Driven by tests/cuda_support.py (EmulatedExtension), which prepares the rows as csrc/bindings.cpp does;
// never part of the extension.
#include "cuda_emulator.h"

#include "../gated.cu"

namespace {

l2vf::GatedProblem make_problem(int dtype, int64_t rows, int64_t cols, const void* gate, int64_t stride_gate,
                                const void* up, int64_t stride_up, int gelu, const void* grad, int64_t stride_grad) {
  l2vf::GatedProblem p;
  p.dtype = static_cast<l2vf::DType>(dtype);
  p.rows = rows;
  p.cols = cols;
  p.gate = gate;
  p.stride_gate = stride_gate;
  p.up = up;
  p.stride_up = stride_up;
  p.gelu = gelu != 0;
  p.grad = grad;
  p.stride_grad = stride_grad;
  return p;
}

size_t span_bytes(const l2vf::GatedProblem& p, int64_t stride) {
  return emu::rows_bytes(p.rows, stride, p.cols, l2vf::element_bytes(p.dtype));
}

void write_plan(const l2vf::GatedPlan& plan, int64_t* plan_out) {
  plan_out[0] = plan.vec;
  plan_out[1] = plan.col_blocks;
  plan_out[2] = plan.row_blocks;
}

}  // namespace

extern "C" {

// plan_out: vec, col_blocks, row_blocks. out may be gate (in place).
int l2vf_emu_gated_forward(int dtype, int64_t rows, int64_t cols, const void* gate, int64_t stride_gate,
                           const void* up, int64_t stride_up, int gelu, void* out, int64_t stride_out,
                           int64_t* plan_out) {
  const l2vf::GatedProblem p = make_problem(dtype, rows, cols, gate, stride_gate, up, stride_up, gelu, nullptr, 0);
  const l2vf::GatedPlan plan = l2vf::gated_plan(p, out, stride_out, false);
  write_plan(plan, plan_out);
  emu::clear_ranges();
  if (rows > 0 && cols > 0) {
    emu::add_range(gate, span_bytes(p, stride_gate));
    emu::add_range(up, span_bytes(p, stride_up));
    emu::add_range(out, span_bytes(p, stride_out));
  }
  const int err = static_cast<int>(l2vf::gated_forward(p, plan, out, stride_out, nullptr));
  emu::clear_ranges();
  return err;
}

// grad_gate, grad_up: contiguous (rows, cols).
int l2vf_emu_gated_backward(int dtype, int64_t rows, int64_t cols, const void* gate, int64_t stride_gate,
                            const void* up, int64_t stride_up, const void* grad, int64_t stride_grad, int gelu,
                            void* grad_gate, void* grad_up, int64_t* plan_out) {
  const l2vf::GatedProblem p = make_problem(dtype, rows, cols, gate, stride_gate, up, stride_up, gelu, grad,
                                            stride_grad);
  const l2vf::GatedPlan plan = l2vf::gated_plan(p, grad_gate, cols, true);
  write_plan(plan, plan_out);
  emu::clear_ranges();
  if (rows > 0 && cols > 0) {
    emu::add_range(gate, span_bytes(p, stride_gate));
    emu::add_range(up, span_bytes(p, stride_up));
    emu::add_range(grad, span_bytes(p, stride_grad));
    emu::add_range(grad_gate, span_bytes(p, cols));
    emu::add_range(grad_up, span_bytes(p, cols));
  }
  const int err = static_cast<int>(l2vf::gated_backward(p, plan, grad_gate, grad_up, nullptr));
  emu::clear_ranges();
  return err;
}

}  // extern "C"
