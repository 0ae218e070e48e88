// Plain-C++ interface of the Hopper (sm_90a) flash-attention forward (csrc/attention.cu): the
// non-causal, dropout-free forward of llm2vec_fast.flash_attention on the packed varlen layout, with
// GQA and optional softcap, bf16 / fp16, head dim 64 or 128. TMA tile loads + wgmma (see README.md).
//
// out[t, h, :] = softmax_j(s(q_t,h . k_j,h/G)) v_j,h/G over the keys j of t's sequence, with
// s(x) = x * softmax_scale, or softcap * tanh(x * softmax_scale / softcap) when softcap > 0;
// lse[h, t] = log sum_j exp(s(...)) (natural log), float32 (heads_q, total_tokens) contiguous.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.h"

namespace l2vf {

struct AttentionProblem {
  const void* q = nullptr;  // (T, heads_q, head_dim), last dim contiguous; strides in elements
  const void* k = nullptr;  // (T, heads_kv, head_dim)
  const void* v = nullptr;  // (T, heads_kv, head_dim)
  DType dtype = DType::kBFloat16;
  int64_t total_tokens = 0, batch = 0, max_seqlen = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t q_stride_tok = 0, q_stride_head = 0, k_stride_tok = 0, k_stride_head = 0, v_stride_tok = 0,
          v_stride_head = 0;
  const int32_t* cu_seqlens = nullptr;  // (batch + 1), device memory, from 0 to total_tokens
  void* out = nullptr;                  // (T, heads_q, head_dim) in dtype, last dim contiguous
  int64_t out_stride_tok = 0, out_stride_head = 0;
  float* lse = nullptr;                 // (heads_q, total_tokens) contiguous
  float softmax_scale = 1.f, softcap = 0.f;
  // Byte strides of V's MN-major SWIZZLE_128B wgmma descriptor (LBO: between 64-column panels, SBO:
  // between groups of 8 keys); 0 takes the built-in values. A diagnostic knob for the one layout the
  // emulator cannot confirm: benchmarks/diagnose_cuda_attention.py tries both orders on the GPU.
  uint32_t v_desc_lbo = 0, v_desc_sbo = 0;
  // Which kernel: 0 = the default, 1 = v1 (2 warpgroups, __syncthreads per tile), 2 = v2 (FA3-style warp
  // specialisation: a TMA producer warpgroup, full / empty mbarriers, S of tile j+1 overlapping the
  // softmax of tile j). The default is v1 until a GPU has measured v2 (csrc/attention.cu, kDefaultVariant).
  int variant = 0;
};

// Why the kernel cannot run this problem (a message naming the argument), or nullptr when it can.
// Checks: dtype bf16/fp16, head_dim 64/128, heads_q a multiple of heads_kv, 16-byte aligned base
// pointers and token/head strides (TMA), strides nested (head_dim <= head stride, heads * head stride
// <= token stride), out 4-byte aligned pairs, batch and heads_q <= 65535, scale > 0, softcap >= 0.
const char* attention_unsupported(const AttentionProblem& p);

// nullptr when the current device is sm_90 (the kernel is built for sm_90a only), else why not.
const char* attention_device_unsupported();

// Dynamic shared memory of one block (bytes, including 1 KB of alignment slack).
int attention_smem_bytes(int64_t head_dim, int variant = 0);

// Launches the forward on stream. cudaErrorInvalidValue when attention_unsupported(p) is not null,
// cudaErrorNotSupported when attention_device_unsupported() is not null (check those first for the
// message); otherwise the error of the tensor-map encoding, the attribute or the launch.
cudaError_t attention_forward(const AttentionProblem& p, cudaStream_t stream);

}  // namespace l2vf
