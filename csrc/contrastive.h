// Plain-C++ interface of the CUDA InfoNCE kernels (csrc/contrastive.cu): one direction of
// llm2vec_fast.contrastive_loss, tiled as the Triton version (kernels/contrastive.py).
//
// s[i, j] = scale * cos(a_i, c_j); the label of anchor i is candidate label_offset + i;
// loss_i = logsumexp_j s[i, j] - s[i, label_i]. The (A x N) score matrix never exists: the forward
// streams candidate tiles through an online logsumexp, the backward recomputes score tiles into a
// bounded chunk of E = (softmax - onehot) * grad * scale, multiplied by cuBLAS in the bindings with the unit
// rows x / max(|x|, eps) (E scaled by the inverse norms instead overflows fp16 where a row is zero: 1/eps = 1e12,
// and inf * 0 makes every other row's gradient NaN).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"

namespace l2vf {

struct InfoNCEProblem {
  const void* anchors = nullptr;     // (A, D), rows stride_a elements apart, last dim contiguous
  const void* candidates = nullptr;  // (N, D), rows stride_c apart
  DType dtype = DType::kFloat32;
  int64_t n_anchors = 0, n_candidates = 0, dim = 0;
  int64_t stride_a = 0, stride_c = 0;
  int64_t label_offset = 0;
  float scale = 1.f;
  const float* inv_a = nullptr;  // 1 / max(|a_i|, 1e-12), from row_inverse_norms
  const float* inv_c = nullptr;
  int num_sms = 132;             // the device's multiprocessor count (sizes the forward's candidate split)
};

// The forward's split of the candidates over blocks (a small batch of anchors alone would leave most
// SMs idle), and the float32 workspace it needs (3 * nsplit * A floats when nsplit > 1, else 0).
int infonce_forward_splits(const InfoNCEProblem& p);
int64_t infonce_forward_workspace_floats(const InfoNCEProblem& p);

// inv[i] = 1 / max(|x_i|, 1e-12) for rows x_i of (rows, dim), accumulated in float32.
cudaError_t row_inverse_norms(const void* x, DType dtype, int64_t rows, int64_t dim, int64_t stride, float* inv,
                              cudaStream_t stream);

// Per-anchor loss and logsumexp (float32, A each). workspace: infonce_forward_workspace_floats(p) floats.
cudaError_t infonce_forward(const InfoNCEProblem& p, float* loss, float* lse, float* workspace, cudaStream_t stream);

// Writes the chunk anchors [r0, r1) x candidates [c0, c1) of
//   E = (softmax(s) - onehot(label)) * grad_rows * scale   (E[i - r0][j - c0], or E[j - c0][i - r0] if transposed)
// in the input dtype, rows of E stride_e elements apart. lse: from infonce_forward.
cudaError_t infonce_grad_scores(const InfoNCEProblem& p, const float* lse, const float* grad_rows, int64_t r0,
                                int64_t r1, int64_t c0, int64_t c1, bool transposed, void* e, int64_t stride_e,
                                cudaStream_t stream);

// out = (g - x (x . g) inv^2) * inv where inv < 1e12, else g * inv: the gradient through x / max(|x|, eps),
// row by row; x, g, out of the same dtype, (rows, dim), each with its own row stride.
cudaError_t normalize_backward_rows(const void* x, const void* grad_unit, const float* inv, void* out, DType dtype,
                                    int64_t rows, int64_t dim, int64_t stride_x, int64_t stride_g, int64_t stride_o,
                                    cudaStream_t stream);

}  // namespace l2vf
