// CUDA rotary position embedding (RoPE) for llm2vec_fast.rotary_embedding: q and k rotated by (cos, sin) in
// one launch, forward (also in place) and backward.
//
// Work split (see RotaryPlan): a head row of D elements is cut into slots of VEC elements: the rotated pairs
// (slot s: columns j = s VEC + [0, VEC) and their partners j + R / 2), then the pass-through columns [R, D).
// A block of 256 threads is slot_threads x head_lanes; thread (lane, head lane) keeps its slots and walks
// the items (token, group of kHeadsPerStep consecutive heads of q then k), block by block grid-stride. Per
// item it loads the token's cos / sin at its columns once, then its columns of kHeadsPerStep heads (all
// loads in flight before the first store), and stores them rotated. grid.x stays under 65535 whatever T is.
//
// Rounding as llm2vec_fast.reference.rotary (transformers' q * cos + rotate_half(q) * sin in the input
// dtype), bit for bit: each product rounded to T, then the sum rounded to T; a term sign x[p] sin[j] with
// sign -1 is subtracted (a - round(b) == a + round(-b): rounding to nearest is symmetric). The products and
// sums are IEEE float32 operations that neither contract into an FMA nor flush denormals (mul_rn, add_rn,
// sub_rn), as torch's separate kernels compute them.
//
// In place (out == in): a thread reads a column vector and its partner vector of a (token, head) row, and
// only it ever reads or writes them, so every element is read before it is overwritten.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "rotary.h"
#include "vector_io.cuh"

namespace l2vf {
namespace {

constexpr int kThreads = 256;
constexpr int kHeadsPerStep = 4;           // heads of one token per item: their loads in flight together
constexpr int64_t kMaxBlocks = 65535;      // grid.x cap: blocks walk the items grid-stride beyond it
constexpr int kVectorBytes = 16;           // one LDG.E.128 / STG.E.128

using detail::from_float;
using detail::load_raw;
using detail::Raw;
using detail::raw_to_float;
using detail::rows_aligned16;
using detail::store_vec;
using detail::to_float;

// Everything the kernel reads, by value (the kernel parameters). `in` is q / k (forward) or grad_q / grad_k.
struct Args {
  const void* in_q;
  int64_t in_q_tok, in_q_head;
  const void* in_k;
  int64_t in_k_tok, in_k_head;
  void* out_q;
  int64_t out_q_tok, out_q_head;
  void* out_k;
  int64_t out_k_tok, out_k_head;
  const void* cos;
  int64_t stride_cos;
  const void* sin;
  int64_t stride_sin;
  int64_t heads_q, heads;  // heads: Hq + Hkv
  int64_t dim, rot, half;  // D, R, R / 2
  int64_t groups;          // items per token: ceil(heads / kHeadsPerStep)
  int64_t items;           // T x groups
  int pair_slots, slots, slot_threads, head_lanes;
};

// float32 a * b and a + b rounded to nearest, never contracted into an FMA and never flushed to zero: the
// extension is built with --use_fast_math, whose -ftz=true turns __fmul_rn / __fadd_rn into mul.rn.ftz.f32,
// which would lose the denormal results torch keeps (tiny bf16 products are float32 denormals).
__device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a * b;  // the CPU emulator: separate SSE operations (x86-64 without -mfma has no FMA to contract to)
#endif
}

__device__ __forceinline__ float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a + b;
#endif
}

// a - b: one sub.rn.f32, where -b and an add would negate through an FADD.FTZ (-0 for a denormal b).
__device__ __forceinline__ float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a - b;
#endif
}

// x rounded to T and back (the identity for float).
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// Stores VEC raw elements as loaded (no conversion: the pass-through columns are copied bit for bit, NaN
// payloads included); `valid` (<= VEC) of them lie inside the row.
template <typename T, int VEC>
__device__ __forceinline__ void store_raw(T* p, int valid, const Raw<T, VEC>& r) {
  if constexpr (VEC * sizeof(T) == kVectorBytes) {
    if (valid >= VEC) {
      __stwb(reinterpret_cast<uint4*>(p), r);
      return;
    }
    union {
      uint4 u;
      unsigned short h[8];
      unsigned f[4];
    } parts;
    parts.u = r;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (v < valid) {
        if constexpr (sizeof(T) == 2) reinterpret_cast<unsigned short*>(p)[v] = parts.h[v];
        else reinterpret_cast<unsigned*>(p)[v] = parts.f[v];
      }
    }
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v)
      if (v < valid) p[v] = r.x[v];
  }
}

// The row of head `head` (q's heads first, then k's) of token `token`, in the inputs and in the outputs.
// Called for heads past the last too (a group's padding): the pointer is then never dereferenced.
template <typename T>
__device__ __forceinline__ const T* in_row(const Args& a, int64_t token, int64_t head) {
  if (head < a.heads_q) return static_cast<const T*>(a.in_q) + token * a.in_q_tok + head * a.in_q_head;
  return static_cast<const T*>(a.in_k) + token * a.in_k_tok + (head - a.heads_q) * a.in_k_head;
}

template <typename T>
__device__ __forceinline__ T* out_row(const Args& a, int64_t token, int64_t head) {
  if (head < a.heads_q) return static_cast<T*>(a.out_q) + token * a.out_q_tok + head * a.out_q_head;
  return static_cast<T*>(a.out_k) + token * a.out_k_tok + (head - a.heads_q) * a.out_k_head;
}

// One item, rotated columns: col and col + R / 2 of kHeadsPerStep heads of one token.
//   forward:  y[j] = x[j] cos[j] - x[p] sin[j],   y[p] = x[p] cos[p] + x[j] sin[p]
//   backward: d[j] = g[j] cos[j] + g[p] sin[p],   d[p] = g[p] cos[p] - g[j] sin[j]
// (j < R / 2, p = j + R / 2), every product and every sum rounded to T.
template <typename T, int VEC, bool BACKWARD>
__device__ __forceinline__ void rotate_item(const Args& a, int64_t token, int64_t first_head, int64_t col) {
  Raw<T, VEC> firsts[kHeadsPerStep], seconds[kHeadsPerStep];
#pragma unroll
  for (int g = 0; g < kHeadsPerStep; ++g) {  // every load of the item before the first store (out may be in)
    const int64_t head = first_head + g;
    const int n = head < a.heads ? VEC : 0;
    const T* row = in_row<T>(a, token, head) + col;
    firsts[g] = load_raw<T, VEC>(row, n);
    seconds[g] = load_raw<T, VEC>(row + a.half, n);
  }
  const T* cos_row = static_cast<const T*>(a.cos) + token * a.stride_cos + col;
  const T* sin_row = static_cast<const T*>(a.sin) + token * a.stride_sin + col;
  float cos_j[VEC], cos_p[VEC], sin_j[VEC], sin_p[VEC];  // the token's angles, shared by its heads
  raw_to_float<T, VEC>(load_raw<T, VEC>(cos_row, VEC), cos_j);
  raw_to_float<T, VEC>(load_raw<T, VEC>(cos_row + a.half, VEC), cos_p);
  raw_to_float<T, VEC>(load_raw<T, VEC>(sin_row, VEC), sin_j);
  raw_to_float<T, VEC>(load_raw<T, VEC>(sin_row + a.half, VEC), sin_p);
#pragma unroll
  for (int g = 0; g < kHeadsPerStep; ++g) {
    const int64_t head = first_head + g;
    if (head >= a.heads) break;
    float x_j[VEC], x_p[VEC];
    raw_to_float<T, VEC>(firsts[g], x_j);
    raw_to_float<T, VEC>(seconds[g], x_p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float xj = x_j[e], xp = x_p[e];
      const float straight_j = round_to<T>(mul_rn(xj, cos_j[e])), straight_p = round_to<T>(mul_rn(xp, cos_p[e]));
      if constexpr (BACKWARD) {
        x_j[e] = add_rn(straight_j, round_to<T>(mul_rn(xp, sin_p[e])));
        x_p[e] = sub_rn(straight_p, round_to<T>(mul_rn(xj, sin_j[e])));
      } else {
        x_j[e] = sub_rn(straight_j, round_to<T>(mul_rn(xp, sin_j[e])));
        x_p[e] = add_rn(straight_p, round_to<T>(mul_rn(xj, sin_p[e])));
      }
    }
    T* row = out_row<T>(a, token, head) + col;
    store_vec<T, VEC>(row, VEC, x_j);  // store_vec rounds the sums to T
    store_vec<T, VEC>(row + a.half, VEC, x_p);
  }
}

// One item, pass-through columns: [col, col + valid) of kHeadsPerStep heads of one token, copied.
template <typename T, int VEC>
__device__ __forceinline__ void copy_item(const Args& a, int64_t token, int64_t first_head, int64_t col,
                                          int valid) {
  Raw<T, VEC> parts[kHeadsPerStep];
#pragma unroll
  for (int g = 0; g < kHeadsPerStep; ++g) {
    const int64_t head = first_head + g;
    parts[g] = load_raw<T, VEC>(in_row<T>(a, token, head) + col, head < a.heads ? valid : 0);
  }
#pragma unroll
  for (int g = 0; g < kHeadsPerStep; ++g) {
    const int64_t head = first_head + g;
    if (head >= a.heads) break;
    store_raw<T, VEC>(out_row<T>(a, token, head) + col, valid, parts[g]);
  }
}

// BACKWARD false: out = in (q, k) rotated; BACKWARD true: out = the gradients in (grad_q, grad_k) rotated back.
template <typename T, int VEC, bool BACKWARD>
__global__ void __launch_bounds__(kThreads) rotary_kernel(Args a) {
  const int lane = static_cast<int>(threadIdx.x) % a.slot_threads;
  const int head_lane = static_cast<int>(threadIdx.x) / a.slot_threads;
  if (head_lane >= a.head_lanes) return;  // the block's threads beyond slot_threads x head_lanes
  const int64_t first_item = static_cast<int64_t>(blockIdx.x) * a.head_lanes + head_lane;
  const int64_t item_step = static_cast<int64_t>(gridDim.x) * a.head_lanes;
  for (int slot = lane; slot < a.slots; slot += a.slot_threads) {
    const bool rotated = slot < a.pair_slots;
    const int64_t col = rotated ? static_cast<int64_t>(slot) * VEC
                                : a.rot + static_cast<int64_t>(slot - a.pair_slots) * VEC;
    const int64_t left = a.dim - col;  // pass-through columns: the row's last vector may be partial
    const int valid = left >= VEC ? VEC : static_cast<int>(left);
    for (int64_t item = first_item; item < a.items; item += item_step) {
      const int64_t token = item / a.groups;
      const int64_t first_head = (item - token * a.groups) * kHeadsPerStep;
      if (rotated) rotate_item<T, VEC, BACKWARD>(a, token, first_head, col);
      else copy_item<T, VEC>(a, token, first_head, col, valid);
    }
  }
}

template <typename T>
cudaError_t launch_typed(const Args& a, const RotaryPlan& plan, bool backward, cudaStream_t stream) {
  constexpr int kVec = kVectorBytes / sizeof(T);
  const dim3 grid(plan.blocks);
  if (backward && plan.vec == kVec) {
    L2VF_LAUNCH((rotary_kernel<T, kVec, true>), grid, kThreads, stream, a);
  } else if (backward) {
    L2VF_LAUNCH((rotary_kernel<T, 1, true>), grid, kThreads, stream, a);
  } else if (plan.vec == kVec) {
    L2VF_LAUNCH((rotary_kernel<T, kVec, false>), grid, kThreads, stream, a);
  } else {
    L2VF_LAUNCH((rotary_kernel<T, 1, false>), grid, kThreads, stream, a);
  }
  return cudaGetLastError();
}

cudaError_t dispatch(const RotaryProblem& p, const RotaryPlan& plan, const RotaryOutputs& out, bool backward,
                     cudaStream_t stream) {
  if (plan.items == 0 || plan.blocks == 0 || p.dim == 0) return cudaSuccess;
  Args a;
  a.in_q = p.q.data;
  a.in_q_tok = p.q.stride_tok;
  a.in_q_head = p.q.stride_head;
  a.in_k = p.k.data;
  a.in_k_tok = p.k.stride_tok;
  a.in_k_head = p.k.stride_head;
  a.out_q = out.q;
  a.out_q_tok = out.q_stride_tok;
  a.out_q_head = out.q_stride_head;
  a.out_k = out.k;
  a.out_k_tok = out.k_stride_tok;
  a.out_k_head = out.k_stride_head;
  a.cos = p.cos;
  a.stride_cos = p.stride_cos;
  a.sin = p.sin;
  a.stride_sin = p.stride_sin;
  a.heads_q = p.heads_q;
  a.heads = p.heads_q + p.heads_k;
  a.dim = p.dim;
  a.rot = p.rot;
  a.half = p.rot / 2;
  a.groups = (a.heads + kHeadsPerStep - 1) / kHeadsPerStep;
  a.items = plan.items;
  a.pair_slots = plan.pair_slots;
  a.slots = plan.slots;
  a.slot_threads = plan.slot_threads;
  a.head_lanes = plan.head_lanes;
  switch (p.dtype) {
    case DType::kFloat16: return launch_typed<__half>(a, plan, backward, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(a, plan, backward, stream);
    default: return launch_typed<float>(a, plan, backward, stream);
  }
}

// Whether (T, H, D) rows at ptr allow 16-byte vectors: base pointer and both strides 16-byte aligned.
bool heads_aligned16(const void* ptr, int64_t stride_tok, int64_t stride_head, int bytes) {
  return rows_aligned16(ptr, stride_tok, bytes) && rows_aligned16(ptr, stride_head, bytes);
}

}  // namespace

RotaryPlan rotary_plan(const RotaryProblem& p, const RotaryOutputs& out, bool backward) {
  RotaryPlan plan;
  const int bytes = element_bytes(p.dtype);
  const int64_t half = p.rot / 2;
  const bool aligned = heads_aligned16(p.q.data, p.q.stride_tok, p.q.stride_head, bytes) &&
                       heads_aligned16(p.k.data, p.k.stride_tok, p.k.stride_head, bytes) &&
                       heads_aligned16(out.q, out.q_stride_tok, out.q_stride_head, bytes) &&
                       heads_aligned16(out.k, out.k_stride_tok, out.k_stride_head, bytes) &&
                       rows_aligned16(p.cos, p.stride_cos, bytes) && rows_aligned16(p.sin, p.stride_sin, bytes) &&
                       (half * bytes) % kVectorBytes == 0;  // the partners' vectors start 16-byte aligned too
  plan.vec = aligned ? kVectorBytes / bytes : 1;
  // In place (both outputs are their inputs) the pass-through columns already hold their values.
  const bool in_place = out.q == p.q.data && out.q_stride_tok == p.q.stride_tok &&
                        out.q_stride_head == p.q.stride_head && out.k == p.k.data &&
                        out.k_stride_tok == p.k.stride_tok && out.k_stride_head == p.k.stride_head;
  plan.copy_tail = backward || !in_place;
  const int64_t tail_vectors = plan.copy_tail ? (p.dim - p.rot + plan.vec - 1) / plan.vec : 0;
  plan.pair_slots = static_cast<int>(half / plan.vec);
  plan.slots = static_cast<int>(plan.pair_slots + tail_vectors);
  plan.slot_threads = std::max(1, std::min(plan.slots, kThreads));
  plan.head_lanes = kThreads / plan.slot_threads;
  const int64_t groups = (p.heads_q + p.heads_k + kHeadsPerStep - 1) / kHeadsPerStep;
  plan.items = p.tokens * groups;
  plan.blocks = static_cast<unsigned>(std::min(kMaxBlocks, (plan.items + plan.head_lanes - 1) / plan.head_lanes));
  return plan;
}

cudaError_t rotary_forward(const RotaryProblem& p, const RotaryPlan& plan, const RotaryOutputs& out,
                           cudaStream_t stream) {
  return dispatch(p, plan, out, false, stream);
}

cudaError_t rotary_backward(const RotaryProblem& p, const RotaryPlan& plan, const RotaryOutputs& out,
                            cudaStream_t stream) {
  return dispatch(p, plan, out, true, stream);
}

}  // namespace l2vf
