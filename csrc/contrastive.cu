// CUDA InfoNCE over cosine scores (one direction of llm2vec_fast.contrastive_loss), tiled as the Triton
// version in kernels/contrastive.py.
//
// Score tile: a block of 128 threads (4 warps) computes a 64 x 64 tile of raw dot products a_i . c_j
// with a K loop over the embedding dim in steps of 32: both 64 x 32 operand tiles go to shared memory
// (16-byte loads when rows are aligned, prefetched into registers one step ahead so the next step's
// global loads overlap this step's math), then
//   - fp16 / bf16: tensor cores through WMMA (m16n16k16, fp32 accumulation): warp w owns rows
//     16w..16w+15 and all 64 columns (4 accumulator fragments);
//   - fp32: CUDA-core FMAs in IEEE fp32 (8 x 4 outputs per thread), as Triton's ieee products.
// The tile goes to shared memory as float and is scaled by inv_norm_a * inv_norm_c * scale (the
// L2 normalisation fused as a scaling, as in Triton).
//
// Forward: a block per 64 anchors streams candidate tiles through an online logsumexp in base 2 (two
// threads per row, 32 columns each, merged at the end) and writes only lse and loss per row. When the
// anchors alone give too few blocks, the candidates are split over several blocks per row tile too,
// and a small kernel merges their (max, sum, positive) partials in order (Triton keeps one program per
// row tile; this is the only departure from its tiling).
// Backward: the bindings loop over bounded chunks; this file's kernel recomputes a chunk's score
// tiles and writes E = (softmax - onehot) * grad * scale * inv_norm (transposed for the candidates'
// pass) in the input dtype; cuBLAS (at::mm) multiplies E by the inputs; a row kernel applies the
// normalisation's gradient. Every output row is written once: no atomics, deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifndef L2VF_EMULATOR
#include <mma.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "contrastive.h"
#include "device_common.cuh"

namespace l2vf {
namespace {

using detail::from_float;
using detail::to_float;

constexpr int kTile = 64;                // anchors x candidates per score tile
constexpr int kTileK = 32;               // embedding dims per K step
constexpr int kPitch = kTileK + 8;       // operand row pitch in shared memory (elements): 16-byte rows, fewer conflicts
constexpr int kScorePitch = kTile + 4;   // score tile row pitch (floats)
constexpr int kThreads = 128;            // 4 warps
constexpr int kNormThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNormEps = 1e-12f;

struct Args {
  const void* a;
  const void* c;
  int64_t n_a, n_c, dim, stride_a, stride_c, label_offset;
  float scale;
  const float* inv_a;
  const float* inv_c;
};

template <typename T>
struct Tiles {
  T a[kTile][kPitch];
  T c[kTile][kPitch];
  float s[kTile][kScorePitch];
};

// One thread's share of a 64 x 32 operand tile: 16-byte vectors (VEC) or single elements.
template <typename T, bool VEC>
struct TileRegs {
  static constexpr int kVecElems = VEC ? 16 / static_cast<int>(sizeof(T)) : 1;
  static constexpr int kCount = kTile * kTileK / kVecElems / kThreads;  // 2 / 4 vectors, or 16 elements
  using Item = std::conditional_t<VEC, uint4, T>;
  Item v[kCount];
};

// Loads rows [row0, row0 + 64) x dims [k0, k0 + 32) of x (zeros outside rows x dim) into registers.
template <typename T, bool VEC>
__device__ __forceinline__ void load_tile(TileRegs<T, VEC>& regs, const T* x, int64_t stride, int64_t row0,
                                          int64_t rows, int64_t k0, int64_t dim) {
  constexpr int V = TileRegs<T, VEC>::kVecElems;
  constexpr int kPerRow = kTileK / V;
#pragma unroll
  for (int i = 0; i < TileRegs<T, VEC>::kCount; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = idx / kPerRow, k = (idx % kPerRow) * V;
    const int64_t gr = row0 + r, gk = k0 + k;
    const bool inside = gr < rows && gk < dim;  // VEC: dim % V == 0, so a vector is inside or outside whole
    if constexpr (VEC) {
      regs.v[i] = inside ? __ldg(reinterpret_cast<const uint4*>(x + gr * stride + gk)) : make_uint4(0u, 0u, 0u, 0u);
    } else {
      regs.v[i] = inside ? __ldg(x + gr * stride + gk) : from_float<T>(0.f);
    }
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store_tile(T (*dst)[kPitch], const TileRegs<T, VEC>& regs) {
  constexpr int V = TileRegs<T, VEC>::kVecElems;
  constexpr int kPerRow = kTileK / V;
#pragma unroll
  for (int i = 0; i < TileRegs<T, VEC>::kCount; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = idx / kPerRow, k = (idx % kPerRow) * V;
    if constexpr (VEC) {
      *reinterpret_cast<uint4*>(&dst[r][k]) = regs.v[i];
    } else {
      dst[r][k] = regs.v[i];
    }
  }
}

// Raw dot products a_i . c_j of anchors [row0, row0 + 64) x candidates [col0, col0 + 64) into sm.s
// (zeros outside the matrices). Every thread of the block must call it; sm.s is valid on return.
template <typename T, bool VEC>
__device__ void score_tile(Tiles<T>& sm, const Args& p, int64_t row0, int64_t col0) {
  const T* a = static_cast<const T*>(p.a);
  const T* c = static_cast<const T*>(p.c);
  TileRegs<T, VEC> ra, rc;
  if (p.dim > 0) {
    load_tile<T, VEC>(ra, a, p.stride_a, row0, p.n_a, 0, p.dim);
    load_tile<T, VEC>(rc, c, p.stride_c, col0, p.n_c, 0, p.dim);
  }
  if constexpr (std::is_same_v<T, float>) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // rows ty*8 .. +8, columns tx*4 .. +4
    float acc[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int64_t k0 = 0; k0 < p.dim; k0 += kTileK) {
      __syncthreads();  // the previous step's operands are consumed
      store_tile<T, VEC>(sm.a, ra);
      store_tile<T, VEC>(sm.c, rc);
      __syncthreads();
      if (k0 + kTileK < p.dim) {  // prefetch the next step while this one computes
        load_tile<T, VEC>(ra, a, p.stride_a, row0, p.n_a, k0 + kTileK, p.dim);
        load_tile<T, VEC>(rc, c, p.stride_c, col0, p.n_c, k0 + kTileK, p.dim);
      }
#pragma unroll 4
      for (int k = 0; k < kTileK; ++k) {
        float av[8], cv[4];
#pragma unroll
        for (int i = 0; i < 8; ++i) av[i] = sm.a[ty * 8 + i][k];
#pragma unroll
        for (int j = 0; j < 4; ++j) cv[j] = sm.c[tx * 4 + j][k];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], cv[j], acc[i][j]);
      }
    }
    __syncthreads();  // the previous tile's scores are consumed
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sm.s[ty * 8 + i][tx * 4 + j] = acc[i][j];
  } else {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[j], 0.f);
    for (int64_t k0 = 0; k0 < p.dim; k0 += kTileK) {
      __syncthreads();
      store_tile<T, VEC>(sm.a, ra);
      store_tile<T, VEC>(sm.c, rc);
      __syncthreads();
      if (k0 + kTileK < p.dim) {
        load_tile<T, VEC>(ra, a, p.stride_a, row0, p.n_a, k0 + kTileK, p.dim);
        load_tile<T, VEC>(rc, c, p.stride_c, col0, p.n_c, k0 + kTileK, p.dim);
      }
#pragma unroll
      for (int kk = 0; kk < kTileK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &sm.a[warp * 16][kk], kPitch);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // c rows = columns of B = C^T
          wmma::load_matrix_sync(fb, &sm.c[j * 16][kk], kPitch);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::store_matrix_sync(&sm.s[warp * 16][j * 16], acc[j], kScorePitch, wmma::mem_row_major);
  }
  __syncthreads();
}

// scale * cos = dot * (inv_a * inv_c * scale): one expression for the forward and the backward, so
// that the backward's recomputed scores are bitwise the forward's.
__device__ __forceinline__ float score_scale(float inv_a, float inv_c, float scale) { return inv_a * inv_c * scale; }

template <typename T>
__device__ __forceinline__ Tiles<T>& shared_tiles() {
  __shared__ __align__(128) unsigned char raw[sizeof(Tiles<T>)];
  return *reinterpret_cast<Tiles<T>*>(raw);
}

// Forward: block (x, y) owns anchors [64x, 64x + 64) and the y-th of `nsplit` ranges of candidate
// tiles; thread t takes row t / 2, columns (t % 2) * 32 .. +32 of each tile. With one range it writes
// lse and loss; with several, each block writes its rows' partial (max, sum, positive) and
// infonce_merge_kernel combines them in range order (deterministic).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) infonce_fwd_kernel(Args p, int nsplit, float* __restrict__ loss,
                                                               float* __restrict__ lse,
                                                               float* __restrict__ partial) {
  Tiles<T>& sm = shared_tiles<T>();
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int64_t row = row0 + r;
  const bool row_ok = row < p.n_a;
  const float inv_a = row_ok ? __ldg(p.inv_a + row) : 0.f;
  const int64_t label = row + p.label_offset;
  const int64_t col_tiles = (p.n_c + kTile - 1) / kTile;
  const int64_t tiles_per_split = (col_tiles + nsplit - 1) / nsplit;
  const int64_t col_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split * kTile;
  const int64_t col_end = min(p.n_c, col_begin + tiles_per_split * kTile);
  float run_max = -INFINITY, run_sum = 0.f, positive = 0.f;  // run_max in base-2 units
  for (int64_t col0 = col_begin; col0 < col_end; col0 += kTile) {
    score_tile<T, VEC>(sm, p, row0, col0);
    float tile_max = -INFINITY;
    for (int j = 0; j < 32; ++j) {
      const int col = half * 32 + j;
      const int64_t gcol = col0 + col;
      if (gcol < p.n_c) {
        const float s = sm.s[r][col] * score_scale(inv_a, __ldg(p.inv_c + gcol), p.scale);
        if (gcol == label) positive += s;
        tile_max = fmaxf(tile_max, s * kLog2e);
      }
    }
    if (tile_max > -INFINITY) {
      const float new_max = fmaxf(run_max, tile_max);
      float sum = run_max > -INFINITY ? run_sum * exp2f(run_max - new_max) : 0.f;
      for (int j = 0; j < 32; ++j) {
        const int col = half * 32 + j;
        const int64_t gcol = col0 + col;
        if (gcol < p.n_c) sum += exp2f(sm.s[r][col] * score_scale(inv_a, __ldg(p.inv_c + gcol), p.scale) * kLog2e - new_max);
      }
      run_sum = sum;
      run_max = new_max;
    }
  }
  // Merge the two halves of each row (lanes 2k and 2k + 1).
  const float other_max = __shfl_xor_sync(0xffffffffu, run_max, 1);
  const float other_sum = __shfl_xor_sync(0xffffffffu, run_sum, 1);
  const float other_pos = __shfl_xor_sync(0xffffffffu, positive, 1);
  const float m = fmaxf(run_max, other_max);
  const float total = (run_max > -INFINITY ? run_sum * exp2f(run_max - m) : 0.f) +
                      (other_max > -INFINITY ? other_sum * exp2f(other_max - m) : 0.f);
  if (half == 0 && row_ok) {
    if (nsplit == 1) {
      const float l = (m + log2f(total)) / kLog2e;
      lse[row] = l;
      loss[row] = fmaxf(l - (positive + other_pos), 0.f);  // >= 0: the lse's base-2 round trip rounds
    } else {
      float* part = partial + 3 * (static_cast<int64_t>(blockIdx.y) * p.n_a + row);
      part[0] = m;
      part[1] = total;
      part[2] = positive + other_pos;
    }
  }
}

// Combines the forward's per-range partials of each row, in range order.
__global__ void __launch_bounds__(kThreads) infonce_merge_kernel(const float* __restrict__ partial, int nsplit,
                                                                 int64_t rows, float* __restrict__ loss,
                                                                 float* __restrict__ lse) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= rows) return;
  float m = -INFINITY;
  for (int z = 0; z < nsplit; ++z) m = fmaxf(m, partial[3 * (z * rows + row)]);
  float total = 0.f, positive = 0.f;
  for (int z = 0; z < nsplit; ++z) {
    const float* part = partial + 3 * (z * rows + row);
    if (part[0] > -INFINITY) total += part[1] * exp2f(part[0] - m);
    positive += part[2];
  }
  const float l = (m + log2f(total)) / kLog2e;
  lse[row] = l;
  loss[row] = fmaxf(l - positive, 0.f);
}

// A chunk of E (see contrastive.h). Grid: (tiles over [r0, r1), tiles over [c0, c1)).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) infonce_grad_scores_kernel(Args p, const float* __restrict__ lse,
                                                                       const float* __restrict__ grad_rows,
                                                                       int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                                                                       bool transposed, T* __restrict__ e,
                                                                       int64_t stride_e) {
  Tiles<T>& sm = shared_tiles<T>();
  const int64_t row0 = r0 + static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col0 = c0 + static_cast<int64_t>(blockIdx.y) * kTile;
  score_tile<T, VEC>(sm, p, row0, col0);
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
    // Consecutive threads write consecutive elements of E: along a row of E, whichever way it lies.
    const int r = transposed ? idx % kTile : idx / kTile;
    const int col = transposed ? idx / kTile : idx % kTile;
    const int64_t i = row0 + r, j = col0 + col;
    if (i >= r1 || j >= c1) continue;
    const float ia = __ldg(p.inv_a + i), ic = __ldg(p.inv_c + j);
    const float s = sm.s[r][col] * score_scale(ia, ic, p.scale);
    const float prob = exp2f((s - __ldg(lse + i)) * kLog2e);
    const float label = j == i + p.label_offset ? 1.f : 0.f;
    const float value = (prob - label) * (__ldg(grad_rows + i) * p.scale);
    e[transposed ? (j - c0) * stride_e + (i - r0) : (i - r0) * stride_e + (j - c0)] = from_float<T>(value);
  }
}

// inv[row] = 1 / max(|x_row|, eps); one warp per row.
template <typename T>
__global__ void __launch_bounds__(kNormThreads) inverse_norms_kernel(const T* __restrict__ x, int64_t rows,
                                                                     int64_t dim, int64_t stride,
                                                                     float* __restrict__ inv) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kNormThreads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  float ss = 0.f;
  for (int64_t d = lane; d < dim; d += 32) {
    const float v = to_float(__ldg(x + row * stride + d));
    ss += v * v;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) inv[row] = 1.f / fmaxf(sqrtf(ss), kNormEps);
}

// One block per row: out = (g - x * radial) * inv, radial = (x . g) inv^2 where inv < 1e12.
template <typename T>
__global__ void __launch_bounds__(kNormThreads) normalize_backward_rows_kernel(
    const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ inv, T* __restrict__ out, int64_t dim,
    int64_t stride_x, int64_t stride_g, int64_t stride_o) {
  __shared__ float partial[kNormThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * stride_x;
  const T* gr = g + row * stride_g;
  float dot = 0.f;
  for (int64_t d = threadIdx.x; d < dim; d += kNormThreads) dot += to_float(__ldg(xr + d)) * to_float(__ldg(gr + d));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = dot;
  __syncthreads();
  dot = 0.f;
#pragma unroll
  for (int w = 0; w < kNormThreads / 32; ++w) dot += partial[w];
  const float iv = __ldg(inv + row);
  const float radial = iv < 1e12f ? dot * iv * iv : 0.f;
  for (int64_t d = threadIdx.x; d < dim; d += kNormThreads)
    out[row * stride_o + d] = from_float<T>((to_float(__ldg(gr + d)) - to_float(__ldg(xr + d)) * radial) * iv);
}

// ---------------------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------------------
Args make_args(const InfoNCEProblem& p) {
  return Args{p.anchors, p.candidates, p.n_anchors, p.n_candidates, p.dim, p.stride_a, p.stride_c,
              p.label_offset, p.scale, p.inv_a, p.inv_c};
}

// 16-byte operand loads need aligned rows and a dim that is a multiple of the vector.
bool vector_ok(const InfoNCEProblem& p, int esize) {
  const int v = 16 / esize;
  return reinterpret_cast<uintptr_t>(p.anchors) % 16 == 0 && reinterpret_cast<uintptr_t>(p.candidates) % 16 == 0 &&
         p.dim % v == 0 && p.stride_a % v == 0 && p.stride_c % v == 0;
}

template <typename T>
cudaError_t forward_typed(const InfoNCEProblem& p, float* loss, float* lse, float* workspace, cudaStream_t stream) {
  const Args a = make_args(p);
  const int nsplit = infonce_forward_splits(p);
  if (nsplit > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((p.n_anchors + kTile - 1) / kTile), static_cast<unsigned>(nsplit));
  auto kernel = vector_ok(p, sizeof(T)) ? infonce_fwd_kernel<T, true> : infonce_fwd_kernel<T, false>;
  L2VF_LAUNCH(kernel, grid, kThreads, stream, a, nsplit, loss, lse, workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || nsplit == 1) return err;
  auto merge = infonce_merge_kernel;
  L2VF_LAUNCH(merge, dim3(static_cast<unsigned>((p.n_anchors + kThreads - 1) / kThreads)), kThreads, stream,
              static_cast<const float*>(workspace), nsplit, p.n_anchors, loss, lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_scores_typed(const InfoNCEProblem& p, const float* lse, const float* grad_rows, int64_t r0,
                              int64_t r1, int64_t c0, int64_t c1, bool transposed, void* e, int64_t stride_e,
                              cudaStream_t stream) {
  const Args a = make_args(p);
  const int64_t ty = (c1 - c0 + kTile - 1) / kTile;
  if (ty > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>((r1 - r0 + kTile - 1) / kTile), static_cast<unsigned>(ty));
  auto kernel = vector_ok(p, sizeof(T)) ? infonce_grad_scores_kernel<T, true> : infonce_grad_scores_kernel<T, false>;
  L2VF_LAUNCH(kernel, grid, kThreads, stream, a, lse, grad_rows, r0, r1, c0, c1, transposed, static_cast<T*>(e),
              stride_e);
  return cudaGetLastError();
}

}  // namespace

int infonce_forward_splits(const InfoNCEProblem& p) {
  // Enough blocks for two per SM, each with at least 4 candidate tiles (256 candidates) to stream.
  const int64_t row_blocks = (p.n_anchors + kTile - 1) / kTile;
  const int64_t col_tiles = (p.n_candidates + kTile - 1) / kTile;
  if (row_blocks == 0 || col_tiles == 0) return 1;
  const int64_t target = 2 * static_cast<int64_t>(p.num_sms > 0 ? p.num_sms : 132);
  const int64_t want = (target + row_blocks - 1) / row_blocks;
  const int64_t cap = std::max<int64_t>(1, col_tiles / 4);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, cap, 65535})));
}

int64_t infonce_forward_workspace_floats(const InfoNCEProblem& p) {
  const int nsplit = infonce_forward_splits(p);
  return nsplit > 1 ? 3 * static_cast<int64_t>(nsplit) * p.n_anchors : 0;
}

cudaError_t row_inverse_norms(const void* x, DType dtype, int64_t rows, int64_t dim, int64_t stride, float* inv,
                              cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((rows + kNormThreads / 32 - 1) / (kNormThreads / 32)));
  switch (dtype) {
    case DType::kFloat32: {
      auto kernel = inverse_norms_kernel<float>;
      L2VF_LAUNCH(kernel, grid, kNormThreads, stream, static_cast<const float*>(x), rows, dim, stride, inv);
      break;
    }
    case DType::kFloat16: {
      auto kernel = inverse_norms_kernel<__half>;
      L2VF_LAUNCH(kernel, grid, kNormThreads, stream, static_cast<const __half*>(x), rows, dim, stride, inv);
      break;
    }
    case DType::kBFloat16: {
      auto kernel = inverse_norms_kernel<__nv_bfloat16>;
      L2VF_LAUNCH(kernel, grid, kNormThreads, stream, static_cast<const __nv_bfloat16*>(x), rows, dim, stride, inv);
      break;
    }
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t infonce_forward(const InfoNCEProblem& p, float* loss, float* lse, float* workspace, cudaStream_t stream) {
  if (p.n_anchors == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return forward_typed<float>(p, loss, lse, workspace, stream);
    case DType::kFloat16: return forward_typed<__half>(p, loss, lse, workspace, stream);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(p, loss, lse, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t infonce_grad_scores(const InfoNCEProblem& p, const float* lse, const float* grad_rows, int64_t r0,
                                int64_t r1, int64_t c0, int64_t c1, bool transposed, void* e, int64_t stride_e,
                                cudaStream_t stream) {
  if (r1 <= r0 || c1 <= c0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return grad_scores_typed<float>(p, lse, grad_rows, r0, r1, c0, c1, transposed, e, stride_e, stream);
    case DType::kFloat16: return grad_scores_typed<__half>(p, lse, grad_rows, r0, r1, c0, c1, transposed, e, stride_e, stream);
    case DType::kBFloat16:
      return grad_scores_typed<__nv_bfloat16>(p, lse, grad_rows, r0, r1, c0, c1, transposed, e, stride_e, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t normalize_backward_rows(const void* x, const void* grad_unit, const float* inv, void* out, DType dtype,
                                    int64_t rows, int64_t dim, int64_t stride_x, int64_t stride_g, int64_t stride_o,
                                    cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(rows));
  switch (dtype) {
    case DType::kFloat32: {
      auto kernel = normalize_backward_rows_kernel<float>;
      L2VF_LAUNCH(kernel, grid, kNormThreads, stream, static_cast<const float*>(x), static_cast<const float*>(grad_unit),
                  inv, static_cast<float*>(out), dim, stride_x, stride_g, stride_o);
      break;
    }
    case DType::kFloat16: {
      auto kernel = normalize_backward_rows_kernel<__half>;
      L2VF_LAUNCH(kernel, grid, kNormThreads, stream, static_cast<const __half*>(x),
                  static_cast<const __half*>(grad_unit), inv, static_cast<__half*>(out), dim, stride_x, stride_g,
                  stride_o);
      break;
    }
    case DType::kBFloat16: {
      auto kernel = normalize_backward_rows_kernel<__nv_bfloat16>;
      L2VF_LAUNCH(kernel, grid, kNormThreads, stream, static_cast<const __nv_bfloat16*>(x),
                  static_cast<const __nv_bfloat16*>(grad_unit), inv, static_cast<__nv_bfloat16*>(out), dim, stride_x,
                  stride_g, stride_o);
      break;
    }
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace l2vf
