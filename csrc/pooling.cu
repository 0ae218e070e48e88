// CUDA pooling for llm2vec_fast.pool: forward and backward, every mode, packed and padded layouts.
//
// One pass over the hidden states, straight from their layout; no (B, S, D) intermediate.
//
// Block shape (all kernels): 256 threads = 8 warps. In the reduction and gradient kernels a block owns
// one sequence b, one slice of D (32 vectors: lane l holds dims [(32 * slice + l) * VEC, +VEC)) and one
// range of its tokens (the whole sequence unless the batch is too small to fill the GPU, see pool_plan).
// It walks the range in chunks of 32 tokens; warp w takes tokens w, w + 8, w + 16, w + 24 of a chunk,
// so each thread issues 4 independent 16-byte loads (LDG.E.128) per chunk and each warp reads 512
// contiguous bytes of a row per load.
//
// Token weights come from the masks on the fly: every warp loads the chunk's 32 mask bytes (one per
// lane, prefetched one chunk ahead so that the mask latency overlaps the hidden loads) and ballots
// them into a 32-bit set of pooled tokens. mean: weight 1; weighted_mean: rank = the pooled count
// before the chunk + popc of the set up to the token; the sum is scaled by 1/n or 1/(n(n+1)/2) at the
// end. n (and, for a token range that starts mid-sequence, the count before it) comes from a block-wide
// scan of the sequence's mask bytes before the main loop (skipped when there is no mask). Tokens with
// weight 0 are never loaded, so padding is never read and can hold anything.
//
// Vector width: 16 bytes (8 x fp16/bf16, 4 x fp32) when the rows are 16-byte aligned (base pointer and
// token stride); else 1 element. D need not be a multiple of the width: the last vector of a row is
// read element by element (the tail), the slices past D do nothing.
//
// Reductions across blocks, deterministic: when a sequence's tokens are split over several blocks each
// writes its partial sum to a workspace and the last block to finish (an atomic counter per sequence
// and slice, after __threadfence) adds the partials in split order. normalize=True is fused the same
// way: the last slice of a sequence to finish L2-normalises the whole (B, D) row in place.
//
// last_token / bos_token: the forward is one block per sequence copying (and normalising) the chosen
// token's row; the chosen token is the last / first real one (a block-wide scan of attention_mask,
// or directly from the length without one). The gradient kernel writes every token of the sequence:
// weight * grad for the pooled / chosen ones and zeros elsewhere (16-byte stores).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "device_common.cuh"
#include "vector_io.cuh"
#include "pooling.h"

namespace l2vf {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;                            // tokens per step: one ballot
constexpr int kTokensPerThread = kChunk / kWarps;     // 4 loads in flight per thread and chunk
constexpr int kMinTokensPerSplit = 256;
constexpr int kMinBlocksPerSM = 4;                    // <= 64 registers: 1024 threads per SM
constexpr float kNormEps = 1e-12f;                    // x / max(|x|, eps), as llm2vec_fast.reference.norm

struct Args {
  const void* hidden;
  int64_t stride_seq, stride_tok;
  const int32_t* cu_seqlens;
  int64_t batch, padded_len, dim;
  const uint8_t* am;
  const uint8_t* em;
  int mode;
  bool normalize;
  int64_t slices;
  int nsplit;
};

using detail::from_float;
using detail::load_raw;
using detail::load_vec;
using detail::Raw;
using detail::raw_to_float;
using detail::store_vec;
using detail::to_float;
using detail::zero_raw;

// ---------------------------------------------------------------------------------------------------
// Sequences, masks and block-wide reductions.
// ---------------------------------------------------------------------------------------------------
struct Span {
  int64_t tok0;   // element offset of the sequence's first token in hidden
  int64_t mbase;  // index of its first token in the masks (and in a contiguous gradient, in rows)
  int len;
};

__device__ __forceinline__ Span span_of(const Args& a, int64_t b) {
  if (a.cu_seqlens != nullptr) {
    const int start = __ldg(a.cu_seqlens + b);
    const int stop = __ldg(a.cu_seqlens + b + 1);
    return {static_cast<int64_t>(start) * a.stride_tok, start, stop - start};
  }
  return {b * a.stride_seq, b * a.padded_len, static_cast<int>(a.padded_len)};
}

__device__ __forceinline__ bool real_at(const Args& a, int64_t m) { return a.am == nullptr || __ldg(a.am + m) != 0; }
__device__ __forceinline__ bool pooled_at(const Args& a, int64_t m) {
  return real_at(a, m) && (a.em == nullptr || __ldg(a.em + m) != 0);
}

// [begin, end): the tokens of a sequence of `len` taken by split z of nsplit (whole chunks each).
__device__ __forceinline__ void split_range(int len, int z, int nsplit, int& begin, int& end) {
  int64_t per = (static_cast<int64_t>(len) + nsplit - 1) / nsplit;
  per = (per + kChunk - 1) / kChunk * kChunk;
  const int64_t b = min(static_cast<int64_t>(z) * per, static_cast<int64_t>(len));
  begin = static_cast<int>(b);
  end = static_cast<int>(min(b + per, static_cast<int64_t>(len)));
}

// What block blockIdx.x of the split grid (pool_reduce_kernel, pool_backward_kernel) works on: sequence b,
// D-slice `slice`, token split z of a.nsplit, and that split's tokens [begin, end) of the sequence's span s.
struct BlockPart {
  int64_t slice, b;
  int z;
  Span s;
  int begin, end;
};

__device__ __forceinline__ BlockPart block_part(const Args& a) {
  BlockPart part;
  int64_t blk = blockIdx.x;  // slices vary fastest, then splits, then sequences
  part.slice = blk % a.slices;
  blk /= a.slices;
  part.z = static_cast<int>(blk % a.nsplit);
  part.b = blk / a.nsplit;
  part.s = span_of(a, part.b);
  split_range(part.s.len, part.z, a.nsplit, part.begin, part.end);
  return part;
}

__device__ __forceinline__ float block_sum(float x, float* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();  // sm may still be read by a previous call
  if (lane == 0) sm[warp] = x;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += sm[w];  // same order in every thread: same result
  return total;
}

struct SeqScan {
  int total;   // pooled tokens (real and embed-masked)
  int before;  // pooled tokens at positions < begin
  int first;   // first real position, or INT_MAX
  int last;    // last real position, or -1
};

// A block-wide pass over a sequence's mask bytes (never over hidden). sm: 4 * kWarps ints.
__device__ SeqScan scan_sequence(const Args& a, const Span& s, int begin, int* sm) {
  int total = 0, before = 0, first = INT_MAX, last = -1;
#pragma unroll 4
  for (int p = threadIdx.x; p < s.len; p += kThreads) {
    const int64_t m = s.mbase + p;
    const bool real = real_at(a, m);
    const bool pooled = real && (a.em == nullptr || __ldg(a.em + m) != 0);
    total += pooled;
    before += pooled && p < begin;
    if (real) {
      first = min(first, p);
      last = max(last, p);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    total += __shfl_xor_sync(0xffffffffu, total, o);
    before += __shfl_xor_sync(0xffffffffu, before, o);
    first = min(first, __shfl_xor_sync(0xffffffffu, first, o));
    last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    sm[4 * warp] = total;
    sm[4 * warp + 1] = before;
    sm[4 * warp + 2] = first;
    sm[4 * warp + 3] = last;
  }
  __syncthreads();
  SeqScan r{0, 0, INT_MAX, -1};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    r.total += sm[4 * w];
    r.before += sm[4 * w + 1];
    r.first = min(r.first, sm[4 * w + 2]);
    r.last = max(r.last, sm[4 * w + 3]);
  }
  return r;
}

// The position of the last (last_token) or first (bos_token) real token, or -1 if there is none.
// Block-uniform; calls __syncthreads unless the sequence is empty or has no attention mask.
__device__ __forceinline__ int chosen_token(const Args& a, const Span& s, int* sm) {
  if (s.len == 0) return -1;
  if (a.am == nullptr) return a.mode == kPoolBosToken ? 0 : s.len - 1;
  const SeqScan r = scan_sequence(a, s, 0, sm);
  if (r.last < 0) return -1;
  return a.mode == kPoolBosToken ? r.first : r.last;
}

__device__ __forceinline__ float mean_scale(int mode, int n) {
  const float nf = static_cast<float>(n);
  return mode == kPoolWeightedMean ? 1.f / fmaxf(nf * (nf + 1.f) * 0.5f, 1.f) : 1.f / fmaxf(nf, 1.f);
}

// The 32 tokens of the chunk at c0 that carry weight, as bits. `f` holds this lane's mask flag for
// the chunk (loaded one chunk ahead) and is advanced to the next chunk.
__device__ __forceinline__ unsigned chunk_bits(const Args& a, const Span& s, bool has_flags, int c0, int end,
                                               bool& f) {
  if (has_flags) {
    const unsigned bits = __ballot_sync(0xffffffffu, f);
    const int next = c0 + kChunk + (threadIdx.x & 31);
    f = next < end && pooled_at(a, s.mbase + next);
    return bits;
  }
  const int n = end - c0;
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// L2-normalises row[0:dim) in place (float32), reading through L2 what other blocks wrote.
__device__ void normalize_row(float* row, int64_t dim, float* sm) {
  float ss = 0.f;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
    const float x = __ldcg(row + d);
    ss += x * x;
  }
  const float inv = 1.f / fmaxf(sqrtf(block_sum(ss, sm)), kNormEps);
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) row[d] = __ldcg(row + d) * inv;
}

// ---------------------------------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------------------------------

// mean / weighted_mean forward. Grid: B * nsplit * slices blocks, slice fastest.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) pool_reduce_kernel(Args a, float* __restrict__ out,
                                                               int32_t* __restrict__ counters,
                                                               float* __restrict__ partials) {
  constexpr int kSliceElems = 32 * VEC;
  __shared__ float red[kWarps][kSliceElems];
  __shared__ int scan_sm[4 * kWarps];
  __shared__ float sum_sm[kWarps];
  __shared__ int s_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const BlockPart part = block_part(a);
  const int64_t slice = part.slice, b = part.b;
  const int z = part.z, begin = part.begin, end = part.end;
  const Span s = part.s;
  const bool has_flags = a.am != nullptr || a.em != nullptr;
  int total = s.len, before = begin;
  if (has_flags) {
    const SeqScan r = scan_sequence(a, s, begin, scan_sm);
    total = r.total;
    before = r.before;
  }
  const bool weighted = a.mode == kPoolWeightedMean;
  const int64_t d0 = (slice * 32 + lane) * VEC;
  const int valid = static_cast<int>(max(static_cast<int64_t>(0), min(static_cast<int64_t>(VEC), a.dim - d0)));
  const T* hrow = static_cast<const T*>(a.hidden) + s.tok0 + (valid > 0 ? d0 : 0);

  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
  int carry = before;
  bool f = has_flags && begin + lane < end && pooled_at(a, s.mbase + begin + lane);
  for (int c0 = begin; c0 < end; c0 += kChunk) {
    const unsigned bits = chunk_bits(a, s, has_flags, c0, end, f);
    Raw<T, VEC> raw[kTokensPerThread];  // all loads of the chunk are issued before the first use
#pragma unroll
    for (int k = 0; k < kTokensPerThread; ++k) {
      const int j = warp + kWarps * k;
      raw[k] = valid > 0 && ((bits >> j) & 1u)
                   ? load_raw<T, VEC>(hrow + static_cast<int64_t>(c0 + j) * a.stride_tok, valid)
                   : zero_raw<T, VEC>();
    }
#pragma unroll
    for (int k = 0; k < kTokensPerThread; ++k) {
      const int j = warp + kWarps * k;
      // Rank of token j among the pooled tokens (1-based); unweighted tokens hold h = 0.
      const float w = weighted ? static_cast<float>(carry + __popc(bits & ((2u << j) - 1u))) : 1.f;
      float h[VEC];
      raw_to_float<T, VEC>(raw[k], h);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = fmaf(w, h[v], acc[v]);
    }
    carry += __popc(bits);
  }

  // Reduce the 8 warps' partial sums; thread e then owns element e of the slice (coalesced stores).
#pragma unroll
  for (int v = 0; v < VEC; ++v) red[warp][lane * VEC + v] = acc[v];
  __syncthreads();
  const float scale = mean_scale(a.mode, total);
  const int64_t dslice = slice * kSliceElems;
  float* dst = a.nsplit == 1 ? out + b * a.dim : partials + (b * a.nsplit + z) * a.dim;
  for (int e = tid; e < kSliceElems; e += kThreads) {
    const int64_t d = dslice + e;
    if (d < a.dim) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[w][e];
      dst[d] = sum * scale;
    }
  }

  bool slice_done = true;  // this block holds the final values of (b, slice) in out
  if (a.nsplit > 1) {
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(counters + b * a.slices + slice, 1) == a.nsplit - 1;
    __syncthreads();
    slice_done = s_last;
    if (slice_done) {
      __threadfence();
      for (int e = tid; e < kSliceElems; e += kThreads) {
        const int64_t d = dslice + e;
        if (d < a.dim) {
          float sum = 0.f;
          for (int zz = 0; zz < a.nsplit; ++zz) sum += __ldcg(partials + (b * a.nsplit + zz) * a.dim + d);
          out[b * a.dim + d] = sum;
        }
      }
    }
  }
  if (a.normalize && slice_done) {
    bool last = true;
    __threadfence();
    __syncthreads();
    if (a.slices > 1) {
      int32_t* seq_counters = counters + (a.nsplit > 1 ? a.batch * a.slices : 0);
      if (tid == 0) s_last = atomicAdd(seq_counters + b, 1) == a.slices - 1;
      __syncthreads();
      last = s_last;
      if (last) __threadfence();
    }
    if (last) normalize_row(out + b * a.dim, a.dim, sum_sm);
  }
}

// last_token / bos_token forward: one block per sequence copies (and normalises) the chosen row.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) pool_select_kernel(Args a, float* __restrict__ out) {
  __shared__ int scan_sm[4 * kWarps];
  __shared__ float sum_sm[kWarps];
  const int64_t b = blockIdx.x;
  const Span s = span_of(a, b);
  const int chosen = chosen_token(a, s, scan_sm);
  float* row = out + b * a.dim;
  if (chosen < 0) {  // nothing to pool: zeros
    for (int64_t d = threadIdx.x; d < a.dim; d += kThreads) row[d] = 0.f;
    return;
  }
  const T* src = static_cast<const T*>(a.hidden) + s.tok0 + chosen * a.stride_tok;
  const int64_t nvec = (a.dim + VEC - 1) / VEC;
  float scale = 1.f;
  if (a.normalize) {
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      float h[VEC];
      load_vec<T, VEC>(src + i * VEC, static_cast<int>(min(static_cast<int64_t>(VEC), a.dim - i * VEC)), h);
#pragma unroll
      for (int v = 0; v < VEC; ++v) ss += h[v] * h[v];
    }
    scale = 1.f / fmaxf(sqrtf(block_sum(ss, sum_sm)), kNormEps);
  }
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    const int valid = static_cast<int>(min(static_cast<int64_t>(VEC), a.dim - i * VEC));
    float h[VEC];
    load_vec<T, VEC>(src + i * VEC, valid, h);
#pragma unroll
    for (int v = 0; v < VEC; ++v)
      if (v < valid) row[i * VEC + v] = h[v] * scale;
  }
}

// The gradient through x / max(|x|, eps) for each pooled row (one block per row):
// g' = (g - u (u . g)) / |x| with u = x / |x| where |x| > eps, else g / eps.
__global__ void __launch_bounds__(kThreads) normalize_backward_kernel(const float* __restrict__ pooled,
                                                                      const float* __restrict__ grad,
                                                                      float* __restrict__ out, int64_t dim) {
  __shared__ float sum_sm[kWarps];
  const int64_t b = blockIdx.x;
  const float* x = pooled + b * dim;
  const float* g = grad + b * dim;
  float sxx = 0.f, sxg = 0.f;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
    const float xv = x[d];
    sxx += xv * xv;
    sxg += xv * g[d];
  }
  sxx = block_sum(sxx, sum_sm);
  sxg = block_sum(sxg, sum_sm);
  const float norm = fmaxf(sqrtf(sxx), kNormEps);
  const float inv = 1.f / norm;
  const float radial = norm > kNormEps ? sxg * inv * inv : 0.f;  // (u . g) / |x|
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) out[b * dim + d] = (g[d] - x[d] * radial) * inv;
}

// Gradient: grad_hidden[token] = weight(token) * g[seq] for every token. Grid as pool_reduce_kernel.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) pool_backward_kernel(Args a, const float* __restrict__ grad,
                                                                 T* __restrict__ grad_hidden) {
  __shared__ int scan_sm[4 * kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const BlockPart part = block_part(a);
  const int64_t slice = part.slice, b = part.b;
  const int begin = part.begin, end = part.end;
  const Span s = part.s;
  const bool token_mode = a.mode == kPoolLastToken || a.mode == kPoolBosToken;
  const bool weighted = a.mode == kPoolWeightedMean;
  const bool has_flags = !token_mode && (a.am != nullptr || a.em != nullptr);
  int total = s.len, before = begin, chosen = -1;
  if (token_mode) {
    chosen = chosen_token(a, s, scan_sm);
  } else if (has_flags) {
    const SeqScan r = scan_sequence(a, s, begin, scan_sm);
    total = r.total;
    before = r.before;
  }

  const int64_t d0 = (slice * 32 + lane) * VEC;
  const int valid = static_cast<int>(max(static_cast<int64_t>(0), min(static_cast<int64_t>(VEC), a.dim - d0)));
  const float scale = token_mode ? 1.f : mean_scale(a.mode, total);
  float g[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) g[v] = v < valid ? __ldg(grad + b * a.dim + d0 + v) * scale : 0.f;
  T* grow = grad_hidden + s.mbase * a.dim + (valid > 0 ? d0 : 0);

  int carry = before;
  bool f = has_flags && begin + lane < end && pooled_at(a, s.mbase + begin + lane);
  for (int c0 = begin; c0 < end; c0 += kChunk) {
    unsigned bits;
    if (token_mode) {
      bits = (chosen >= c0 && chosen < c0 + kChunk) ? (1u << (chosen - c0)) : 0u;
    } else {
      bits = chunk_bits(a, s, has_flags, c0, end, f);
    }
#pragma unroll
    for (int k = 0; k < kTokensPerThread; ++k) {
      const int j = warp + kWarps * k;
      if (valid > 0 && c0 + j < end) {
        float w = 0.f;
        if ((bits >> j) & 1u) w = weighted ? static_cast<float>(carry + __popc(bits & ((2u << j) - 1u))) : 1.f;
        float x[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) x[v] = w * g[v];
        store_vec<T, VEC>(grow + static_cast<int64_t>(c0 + j) * a.dim, valid, x);
      }
    }
    carry += __popc(bits);
  }
}

// ---------------------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------------------
Args make_args(const PoolProblem& p, const PoolPlan& plan) {
  Args a;
  a.hidden = p.hidden;
  a.stride_seq = p.stride_seq;
  a.stride_tok = p.stride_tok;
  a.cu_seqlens = p.cu_seqlens;
  a.batch = p.batch;
  a.padded_len = p.padded_len;
  a.dim = p.dim;
  a.am = p.cu_seqlens != nullptr ? nullptr : p.attention_mask;
  a.em = p.embed_mask;
  a.mode = p.mode;
  a.normalize = p.normalize;
  a.slices = plan.slices;
  a.nsplit = plan.nsplit;
  return a;
}

int element_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

bool grid_too_large(const Args& a, bool per_sequence) {
  const int64_t blocks = per_sequence ? a.batch : a.batch * a.nsplit * a.slices;
  return blocks > static_cast<int64_t>(INT_MAX);
}

template <typename T>
cudaError_t forward_typed(const Args& a, const PoolPlan& plan, float* out, int32_t* counters, float* partials,
                          cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool token_mode = a.mode == kPoolLastToken || a.mode == kPoolBosToken;
  if (grid_too_large(a, token_mode)) return cudaErrorInvalidConfiguration;
  if (token_mode) {
    const dim3 grid(static_cast<unsigned>(a.batch));
    auto kernel = plan.vec == V ? pool_select_kernel<T, V> : pool_select_kernel<T, 1>;
    L2VF_LAUNCH(kernel, grid, kThreads, stream, a, out);
  } else {
    const dim3 grid(static_cast<unsigned>(a.batch * a.nsplit * a.slices));
    auto kernel = plan.vec == V ? pool_reduce_kernel<T, V> : pool_reduce_kernel<T, 1>;
    L2VF_LAUNCH(kernel, grid, kThreads, stream, a, out, counters, partials);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const Args& a, const PoolPlan& plan, const float* grad, void* grad_hidden,
                           cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (grid_too_large(a, false)) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(a.batch * a.nsplit * a.slices));
  auto kernel = plan.vec == V ? pool_backward_kernel<T, V> : pool_backward_kernel<T, 1>;
  L2VF_LAUNCH(kernel, grid, kThreads, stream, a, grad, static_cast<T*>(grad_hidden));
  return cudaGetLastError();
}

}  // namespace

PoolPlan pool_plan(const PoolProblem& p, int num_sms, bool backward) {
  PoolPlan plan;
  const int esize = element_size(p.dtype);
  const int v16 = 16 / esize;
  if (backward) {
    plan.vec = p.dim % v16 == 0 ? v16 : 1;
  } else {
    const bool aligned = reinterpret_cast<uintptr_t>(p.hidden) % 16 == 0 && p.stride_tok % v16 == 0 &&
                         (p.cu_seqlens != nullptr || p.stride_seq % v16 == 0);
    plan.vec = aligned ? v16 : 1;
  }
  const bool token_mode = p.mode == kPoolLastToken || p.mode == kPoolBosToken;
  if (!backward && token_mode) {
    plan.slices = 1;
    plan.nsplit = 1;
    return plan;
  }
  const int64_t vectors = (p.dim + plan.vec - 1) / plan.vec;
  plan.slices = (vectors + 31) / 32;
  plan.nsplit = 1;
  const int64_t blocks = p.batch * plan.slices;
  const int64_t target = 8 * static_cast<int64_t>(num_sms > 0 ? num_sms : 132);  // 2048 threads per SM
  if (blocks > 0 && blocks < target) {
    const int64_t avg_len = p.total_tokens / p.batch;
    const int64_t want = (target + blocks - 1) / blocks;
    const int64_t cap = avg_len / kMinTokensPerSplit;
    plan.nsplit = static_cast<int>(max(static_cast<int64_t>(1), min(min(want, cap), static_cast<int64_t>(1024))));
  }
  if (backward) {
    plan.grad_floats = p.normalize ? p.batch * p.dim : 0;
  } else {
    plan.counter_ints = (plan.nsplit > 1 ? p.batch * plan.slices : 0) + (p.normalize && plan.slices > 1 ? p.batch : 0);
    plan.partial_floats = plan.nsplit > 1 ? p.batch * plan.nsplit * p.dim : 0;
  }
  return plan;
}

cudaError_t pool_forward(const PoolProblem& p, const PoolPlan& plan, float* out, int32_t* counters,
                         float* partials, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;
  const Args a = make_args(p, plan);
  switch (p.dtype) {
    case DType::kFloat32: return forward_typed<float>(a, plan, out, counters, partials, stream);
    case DType::kFloat16: return forward_typed<__half>(a, plan, out, counters, partials, stream);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(a, plan, out, counters, partials, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t pool_backward(const PoolProblem& p, const PoolPlan& plan, const float* grad_out, const float* pooled,
                          float* grad_scratch, void* grad_hidden, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;
  const float* grad = grad_out;
  if (p.normalize) {
    if (pooled == nullptr || grad_scratch == nullptr) return cudaErrorInvalidValue;
    auto kernel = normalize_backward_kernel;
    L2VF_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch)), kThreads, stream, pooled, grad_out, grad_scratch, p.dim);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    grad = grad_scratch;
  }
  const Args a = make_args(p, plan);
  switch (p.dtype) {
    case DType::kFloat32: return backward_typed<float>(a, plan, grad, grad_hidden, stream);
    case DType::kFloat16: return backward_typed<__half>(a, plan, grad, grad_hidden, stream);
    case DType::kBFloat16: return backward_typed<__nv_bfloat16>(a, plan, grad, grad_hidden, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace l2vf
