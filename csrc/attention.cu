// Hopper (sm_90a) non-causal flash-attention forward: TMA tile loads through a 2-stage mbarrier
// pipeline, S = Q K^T and O += P V on warpgroup MMA (wgmma), online softmax in base 2 in registers.
// Design: /work/notes/hopper_attention_design.md (kernel v1) and README.md ("Attention").
//
// Block: 256 threads = 2 warpgroups, 128 query rows (warpgroup g owns rows 64g .. 64g+63) of one
// (sequence, query head); keys in tiles of 128. Grid (ceil(max_seqlen / 128), heads_q, batch); blocks
// past their sequence's end return at once.
// Shared memory (dynamic, rounded up to 1024 bytes): Q (128 x D), K[2], V[2] (128 x D each), then 5
// mbarriers (q_full, k_full[2], v_full[2]). Every 128 x D tile is stored as D/64 "panels" of 64
// columns (128-byte rows, panels 16 KB apart) in the TMA SWIZZLE_128B layout, which is the canonical
// wgmma SWIZZLE_128B layout: K-major for Q and K (S = Q K^T), MN-major for V (imm-trans-b = 1).
// Thread 0 issues every TMA; iteration j waits k_full[j%2] / v_full[j%2] with parity (j/2)&1, and after
// a __syncthreads (both warpgroups are done with stage j%2) thread 0 refills the stage with tile j+2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "attention.h"
#include "device_common.cuh"
#include "hopper.cuh"

namespace l2vf {
namespace {

constexpr int kBlockM = 128;       // query rows per block
constexpr int kBlockN = 128;       // keys per tile
constexpr int kThreads = 256;      // 2 warpgroups
constexpr int kPanelCols = 64;     // 64 16-bit columns = one 128-byte swizzle row
constexpr uint32_t kPanelBytes = 128u * 128u;  // a panel of a 128-row tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Descriptor strides. K-major SWIZZLE_128B (Q, K): 8-row groups 1024 bytes apart; LBO is not used by
// the hardware for swizzled K-major layouts (CUTLASS writes 1, i.e. 16 bytes).
constexpr uint32_t kKMajorSBO = 1024;
constexpr uint32_t kKMajorLBO = 16;
// MN-major SWIZZLE_128B (V, B operand of O += P V): LBO = stride between 64-column panels, SBO = stride
// between groups of 8 keys (CUTLASS make_gmma_desc<Major::MN>). UNCERTAIN until checked on the GPU: if
// the output for head dim 128 is wrong in columns 64..127 only (or everywhere but the first 8 keys of
// each 16), these two are swapped: swap them here (the emulator decodes the descriptor as written).
// benchmarks/diagnose_cuda_attention.py runs both orders on the GPU (AttentionProblem::v_desc_lbo/sbo).
constexpr uint32_t kMNMajorLBO = kPanelBytes;
constexpr uint32_t kMNMajorSBO = 1024;

template <int D>
struct Layout {
  static constexpr uint32_t kTileBytes = kBlockM * D * 2;  // one 128 x D tile of 16-bit elements
  static constexpr uint32_t kQ = 0;
  static constexpr uint32_t kK = kTileBytes;       // stages 0, 1
  static constexpr uint32_t kV = 3 * kTileBytes;   // stages 0, 1
  static constexpr uint32_t kBars = 5 * kTileBytes;
  static constexpr uint32_t kBytes = kBars + 5 * 8;
  static constexpr uint32_t kAlloc = kBytes + 1024;  // slack to round the base up to 1024
  static constexpr int kPanels = D / kPanelCols;
};

struct Params {
  const int32_t* cu_seqlens;
  void* out;
  float* lse;
  int64_t out_stride_tok, out_stride_head, total_tokens;
  int group;           // heads_q / heads_kv
  float scale_log2;    // softmax_scale * log2(e)          (no softcap)
  float cap_in;        // softmax_scale / softcap          (softcap)
  float cap_out;       // softcap * log2(e)                (softcap)
  int softcap;
  uint32_t v_lbo, v_sbo;  // V's descriptor strides (kMNMajorLBO / kMNMajorSBO unless overridden)
};

template <int D>
__device__ __forceinline__ void issue_tile(const CUtensorMap* map, uint32_t dst, uint32_t bar, int head, int token) {
  hopper::mbarrier_arrive_expect_tx(bar, Layout<D>::kTileBytes);
#pragma unroll
  for (int p = 0; p < Layout<D>::kPanels; ++p) hopper::tma_load_3d(dst + p * kPanelBytes, map, bar, p * kPanelCols, head, token);
}

// The (sequence, query head, 128-row block) of this block; false when the block starts past its sequence.
struct BlockWork {
  int start, seqlen, m0, head, kv_head, n_tiles;
};

__device__ __forceinline__ bool block_work(const Params& p, BlockWork& w) {
  w.head = blockIdx.y;
  w.start = __ldg(p.cu_seqlens + blockIdx.z);
  w.seqlen = __ldg(p.cu_seqlens + blockIdx.z + 1) - w.start;
  w.m0 = static_cast<int>(blockIdx.x) * kBlockM;
  w.kv_head = w.head / p.group;
  w.n_tiles = (w.seqlen + kBlockN - 1) / kBlockN;
  return w.m0 < w.seqlen;
}

// Zeroes rows [valid, 128) of a 128 x D K/V tile in shared memory (every panel; a 128-byte row stays one row
// under SWIZZLE_128B), shared by `threads` threads of which this is number `t`; then fences them for the async
// proxy (the caller syncs before the wgmma). Those keys are the next sequence's tokens (or TMA zero fill): P
// is 0 there, but 0 * NaN or inf in a neighbour's V is NaN and would leak into this sequence's output.
template <int D>
__device__ __forceinline__ void zero_tail_rows(uint32_t tile, int valid, int t, int threads) {
  const int chunks = (kBlockN - valid) * 8;  // 16-byte chunks per panel
  for (int i = t; i < chunks * Layout<D>::kPanels; i += threads) {
    const int panel = i / chunks, r = valid + (i % chunks) / 8;
    hopper::st_shared_zero16(tile + panel * kPanelBytes + r * 128 + (i % 8) * 16);
  }
  hopper::fence_proxy_async();
}

// Issues S = Q K^T for one warpgroup's 64 rows (one commit group): D/16 k-steps of m64n128k16, 32 bytes
// apart inside a 64-column panel, the next panel after 4.
template <typename T, int D>
__device__ __forceinline__ void issue_qk(float (&sc)[64], uint32_t q_rows, uint32_t k_tile) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t off = (kk / 4) * kPanelBytes + (kk % 4) * 32;
    const uint64_t da = hopper::make_smem_desc_sw128(q_rows + off, kKMajorLBO, kKMajorSBO);
    const uint64_t db = hopper::make_smem_desc_sw128(k_tile + off, kKMajorLBO, kKMajorSBO);
    hopper::wgmma_ss_m64n128k16<T>(sc, da, db, kk > 0 ? 1 : 0);
  }
  hopper::wgmma_commit();
}

// Issues O += P V (one commit group): 8 k-steps of 16 keys (2 KB of V rows apart), V MN-major.
template <typename T, int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], uint32_t (&pa)[kBlockN / 16][4], uint32_t v_tile,
                                         const Params& p) {
#pragma unroll
  for (int q = 0; q < kBlockN / 16; ++q) {
    const uint64_t db = hopper::make_smem_desc_sw128(v_tile + q * 16 * 128, p.v_lbo, p.v_sbo);
    hopper::wgmma_rs_tb<T, D>(o, pa[q], db, 1);
  }
  hopper::wgmma_commit();
}

// Compiler fences on the registers an async wgmma reads or writes (CUTLASS's warpgroup_fence_operand).
template <int N>
__device__ __forceinline__ void fence_all(float (&r)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) hopper::fence_operand(r[e]);
}
__device__ __forceinline__ void fence_all(uint32_t (&pa)[kBlockN / 16][4]) {
#pragma unroll
  for (int q = 0; q < kBlockN / 16; ++q)
#pragma unroll
    for (int i = 0; i < 4; ++i) hopper::fence_operand(pa[q][i]);
}

// The online-softmax step on a fresh S tile, in place: sc becomes exp2(s - m) (masked keys 0), m_run the
// new row maxima, alpha the factor that rescales what was accumulated before, sum the row sums of sc.
template <int D>
__device__ __forceinline__ void softmax_tile(float (&sc)[64], float (&m_run)[2], float (&alpha)[2], float (&sum)[2],
                                             int valid, int lane, const Params& p) {
  float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
  for (int e = 0; e < 64; ++e) {
    const int col = 8 * (e / 4) + 2 * (lane % 4) + (e % 2);
    float x = p.softcap ? hopper::tanh_approx(sc[e] * p.cap_in) * p.cap_out : sc[e] * p.scale_log2;
    x = col < valid ? x : -INFINITY;
    sc[e] = x;
    mx[(e / 2) % 2] = fmaxf(mx[(e / 2) % 2], x);
  }
  float m_use[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    m_use[i] = mx[i] == -INFINITY ? 0.f : mx[i];
    alpha[i] = hopper::ex2(m_run[i] - m_use[i]);
    m_run[i] = mx[i];
    sum[i] = 0.f;
  }
#pragma unroll
  for (int e = 0; e < 64; ++e) {
    sc[e] = hopper::ex2(sc[e] - m_use[(e / 2) % 2]);
    sum[(e / 2) % 2] += sc[e];
  }
}

// What softmax_tile's alpha and sum do to the running state: l = l * alpha + sum, and O's rows scaled by alpha.
template <int D>
__device__ __forceinline__ void rescale_running(float (&o)[D / 2], float (&l_run)[2], const float (&alpha)[2],
                                                const float (&sum)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) l_run[i] = l_run[i] * alpha[i] + sum[i];
#pragma unroll
  for (int e = 0; e < D / 2; ++e) o[e] *= alpha[(e / 2) % 2];
}

template <typename T>
__device__ __forceinline__ void pack_p(const float (&sc)[64], uint32_t (&pa)[kBlockN / 16][4]) {
#pragma unroll
  for (int q = 0; q < kBlockN / 16; ++q) {
    pa[q][0] = hopper::pack2<T>(sc[8 * q + 0], sc[8 * q + 1]);
    pa[q][1] = hopper::pack2<T>(sc[8 * q + 2], sc[8 * q + 3]);
    pa[q][2] = hopper::pack2<T>(sc[8 * q + 4], sc[8 * q + 5]);
    pa[q][3] = hopper::pack2<T>(sc[8 * q + 6], sc[8 * q + 7]);
  }
}

// Epilogue: O / l and lse = (m + log2 l) ln 2 for this thread's two rows (row0 + lane/4 and + 8); a quad
// holds a row, so l is reduced over it first. Rows past the sequence are not stored.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&o)[D / 2], float (&l_run)[2], const float (&m_run)[2],
                                           const BlockWork& w, int row0, int lane, const Params& p) {
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
    const int row = row0 + lane / 4 + 8 * i;
    if (row >= w.seqlen) continue;
    const int64_t token = w.start + row;
    const float inv = l_run[i] > 0.f ? 1.f / l_run[i] : 0.f;
    T* dst = out + token * p.out_stride_tok + w.head * p.out_stride_head + 2 * (lane % 4);
#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
      const uint32_t pair = hopper::pack2<T>(o[4 * c + 2 * i] * inv, o[4 * c + 2 * i + 1] * inv);
      __stwb(reinterpret_cast<unsigned int*>(dst + 8 * c), pair);
    }
    if (lane % 4 == 0) {
      const float lse = l_run[i] > 0.f ? (m_run[i] + log2f(l_run[i])) * kLn2 : -INFINITY;
      __stwb(p.lse + w.head * p.total_tokens + token, lse);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attention_fwd_kernel(const L2VF_GRID_CONSTANT CUtensorMap tm_q, const L2VF_GRID_CONSTANT CUtensorMap tm_k,
                         const L2VF_GRID_CONSTANT CUtensorMap tm_v, const Params p) {
  using L = Layout<D>;
  BlockWork w;
  if (!block_work(p, w)) return;

  const uint32_t base = (hopper::smem_addr(hopper::dynamic_smem()) + 1023u) & ~1023u;
  const uint32_t q_tile = base + L::kQ;
  const uint32_t q_full = base + L::kBars;
  auto k_tile = [&](int s) { return base + L::kK + s * L::kTileBytes; };
  auto v_tile = [&](int s) { return base + L::kV + s * L::kTileBytes; };
  auto k_full = [&](int s) { return base + L::kBars + 8 + 8 * s; };
  auto v_full = [&](int s) { return base + L::kBars + 24 + 8 * s; };

  const int tid = threadIdx.x;
  if (tid == 0) {
    hopper::prefetch_tensor_map(&tm_q);
    hopper::prefetch_tensor_map(&tm_k);
    hopper::prefetch_tensor_map(&tm_v);
    for (int i = 0; i < 5; ++i) hopper::mbarrier_init(base + L::kBars + 8 * i, 1);
    hopper::fence_barrier_init();
  }
  __syncthreads();
  if (tid == 0) {
    issue_tile<D>(&tm_q, q_tile, q_full, w.head, w.start + w.m0);
    for (int s = 0; s < 2 && s < w.n_tiles; ++s) {
      issue_tile<D>(&tm_k, k_tile(s), k_full(s), w.kv_head, w.start + s * kBlockN);
      issue_tile<D>(&tm_v, v_tile(s), v_full(s), w.kv_head, w.start + s * kBlockN);
    }
  }

  const int wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const uint32_t q_rows = q_tile + wg * 64 * 128;  // this warpgroup's 64 rows (8 KB into each panel)

  float o[D / 2];
#pragma unroll
  for (int e = 0; e < D / 2; ++e) o[e] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2], sum[2];
  float sc[64];
  uint32_t pa[kBlockN / 16][4];

  hopper::mbarrier_wait(q_full, 0);
  for (int j = 0; j < w.n_tiles; ++j) {
    const int s = j & 1;
    const uint32_t parity = (j >> 1) & 1;
    hopper::mbarrier_wait(k_full(s), parity);
    hopper::wgmma_fence();
    issue_qk<T, D>(sc, q_rows, k_tile(s));
    hopper::wgmma_wait<0>();
    fence_all(sc);

    // Online softmax in base 2; keys past the sequence (the next sequence's or zero fill) are masked.
    softmax_tile<D>(sc, m_run, alpha, sum, w.seqlen - j * kBlockN, lane, p);
    pack_p<T>(sc, pa);
    rescale_running<D>(o, l_run, alpha, sum);

    hopper::mbarrier_wait(v_full(s), parity);
    if (w.seqlen - j * kBlockN < kBlockN) {  // the last tile, partial (block-uniform)
      zero_tail_rows<D>(v_tile(s), w.seqlen - j * kBlockN, tid, kThreads);
      __syncthreads();
    }
    fence_all(o);
    fence_all(pa);
    hopper::wgmma_fence();
    issue_pv<T, D>(o, pa, v_tile(s), p);
    hopper::wgmma_wait<0>();
    fence_all(o);

    __syncthreads();  // both warpgroups are done with stage s
    if (tid == 0 && j + 2 < w.n_tiles) {
      issue_tile<D>(&tm_k, k_tile(s), k_full(s), w.kv_head, w.start + (j + 2) * kBlockN);
      issue_tile<D>(&tm_v, v_tile(s), v_full(s), w.kv_head, w.start + (j + 2) * kBlockN);
    }
  }
  store_rows<T, D>(o, l_run, m_run, w, w.m0 + wg * 64 + warp * 16, lane, p);
}

// ---------------------------------------------------------------------------------------------------
// Kernel v2: FA3-style warp specialisation (see README.md, "Kernel v2").
// Block: 384 threads = producer warpgroup 0 + consumer warpgroups 1, 2 (consumer c = wg - 1 owns query
// rows 64c .. 64c+63). The producer drops to kProducerRegs registers (setmaxnreg.dec) and one thread
// issues every TMA; the consumers raise theirs to kConsumerRegs (setmaxnreg.inc). K and V go through a
// ring of kStages stages, each with a full mbarrier (1 arrival + tx bytes, TMA) and an empty mbarrier
// (kConsumerThreads arrivals: every consumer thread arrives once its wgmma reading the stage has been
// waited). The producer waits on empty before refilling a stage: no __syncthreads after the set-up.
// Consumer iteration j (FA3's intra-warpgroup overlap): issue S_j = Q K_j^T, issue O += P_{j-1} V_{j-1}
// (P from registers), wait_group 1 (S_j done, PV still running), release K_j, softmax of S_j in place
// (max, exp, sum: only S registers and scalars), wait_group 0, release V_{j-1}, rescale O, pack P_j.
// Nothing written by ordinary code is read by an in-flight wgmma and vice versa: S is free while PV
// runs, O and the P fragments are only touched after wait_group 0.
// ---------------------------------------------------------------------------------------------------
constexpr int kThreadsV2 = 384;
constexpr int kConsumerThreads = 256;
constexpr int kProducerRegs = 24;   // 128 x 24 + 256 x 240 = 64512 <= 65536 registers per SM
constexpr int kConsumerRegs = 240;

template <int D>
struct LayoutV2 {
  static constexpr int kStages = D == 128 ? 2 : 4;         // hd128: 160 KB of tiles; hd64: 144 KB
  static constexpr uint32_t kTileBytes = kBlockM * D * 2;
  static constexpr uint32_t kQ = 0;
  static constexpr uint32_t kK = kTileBytes;
  static constexpr uint32_t kV = (1 + kStages) * kTileBytes;
  static constexpr uint32_t kBars = (1 + 2 * kStages) * kTileBytes;
  static constexpr int kNumBars = 2 + 4 * kStages;         // q_full, k_full[], v_full[], k_empty[], v_empty[], v_tail
  static constexpr uint32_t kBytes = kBars + kNumBars * 8;
  static constexpr uint32_t kAlloc = kBytes + 1024;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreadsV2, 1)
    attention_fwd_ws_kernel(const L2VF_GRID_CONSTANT CUtensorMap tm_q, const L2VF_GRID_CONSTANT CUtensorMap tm_k,
                            const L2VF_GRID_CONSTANT CUtensorMap tm_v, const Params p) {
  using L = LayoutV2<D>;
  constexpr int S = L::kStages;
  BlockWork w;
  if (!block_work(p, w)) return;

  const uint32_t base = (hopper::smem_addr(hopper::dynamic_smem()) + 1023u) & ~1023u;
  const uint32_t q_tile = base + L::kQ;
  const uint32_t q_full = base + L::kBars;
  auto k_tile = [&](int s) { return base + L::kK + s * L::kTileBytes; };
  auto v_tile = [&](int s) { return base + L::kV + s * L::kTileBytes; };
  auto k_full = [&](int s) { return base + L::kBars + 8 * (1 + s); };
  auto v_full = [&](int s) { return base + L::kBars + 8 * (1 + S + s); };
  auto k_empty = [&](int s) { return base + L::kBars + 8 * (1 + 2 * S + s); };
  auto v_empty = [&](int s) { return base + L::kBars + 8 * (1 + 3 * S + s); };
  const uint32_t v_tail = base + L::kBars + 8 * (1 + 4 * S);  // the consumers' barrier after zero_tail_rows

  const int tid = threadIdx.x;
  if (tid == 0) {
    hopper::prefetch_tensor_map(&tm_q);
    hopper::prefetch_tensor_map(&tm_k);
    hopper::prefetch_tensor_map(&tm_v);
    hopper::mbarrier_init(q_full, 1);
    for (int s = 0; s < S; ++s) {
      hopper::mbarrier_init(k_full(s), 1);
      hopper::mbarrier_init(v_full(s), 1);
      hopper::mbarrier_init(k_empty(s), kConsumerThreads);
      hopper::mbarrier_init(v_empty(s), kConsumerThreads);
    }
    hopper::mbarrier_init(v_tail, kConsumerThreads);
    hopper::fence_barrier_init();
  }
  __syncthreads();  // the only block-wide barrier: the mbarriers are initialised

  const int wg = tid / 128;
  if (wg == 0) {  // ---- producer ----
    hopper::setmaxnreg_dec<kProducerRegs>();
    if (tid == 0) {
      issue_tile<D>(&tm_q, q_tile, q_full, w.head, w.start + w.m0);
      for (int j = 0; j < w.n_tiles; ++j) {
        const int s = j % S;
        const uint32_t parity = ((j / S) + 1) & 1;  // use n = j / S >= 1 of stage s waits phase n - 1
        if (j >= S) hopper::mbarrier_wait(k_empty(s), parity);
        issue_tile<D>(&tm_k, k_tile(s), k_full(s), w.kv_head, w.start + j * kBlockN);
        if (j >= S) hopper::mbarrier_wait(v_empty(s), parity);
        issue_tile<D>(&tm_v, v_tile(s), v_full(s), w.kv_head, w.start + j * kBlockN);
      }
    }
    return;
  }

  // ---- consumers ----
  hopper::setmaxnreg_inc<kConsumerRegs>();
  const int c = wg - 1, warp = (tid % 128) / 32, lane = tid % 32;
  const uint32_t q_rows = q_tile + c * 64 * 128;  // this warpgroup's 64 rows (8 KB into each panel)

  float o[D / 2];
#pragma unroll
  for (int e = 0; e < D / 2; ++e) o[e] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2], sum[2];
  float sc[64];
  uint32_t pa[kBlockN / 16][4];

  // Tile 0: S_0, softmax, P_0 (O is still zero: nothing to rescale).
  hopper::mbarrier_wait(q_full, 0);
  hopper::mbarrier_wait(k_full(0), 0);
  hopper::wgmma_fence();
  issue_qk<T, D>(sc, q_rows, k_tile(0));
  hopper::wgmma_wait<0>();
  fence_all(sc);
  hopper::mbarrier_arrive(k_empty(0));
  softmax_tile<D>(sc, m_run, alpha, sum, w.seqlen, lane, p);
#pragma unroll
  for (int i = 0; i < 2; ++i) l_run[i] = sum[i];
  pack_p<T>(sc, pa);

  for (int j = 1; j < w.n_tiles; ++j) {
    const int s = j % S, sp = (j - 1) % S;
    hopper::mbarrier_wait(k_full(s), (j / S) & 1);
    fence_all(sc);
    fence_all(o);
    fence_all(pa);
    hopper::wgmma_fence();
    issue_qk<T, D>(sc, q_rows, k_tile(s));  // S_j = Q K_j^T
    hopper::mbarrier_wait(v_full(sp), ((j - 1) / S) & 1);
    issue_pv<T, D>(o, pa, v_tile(sp), p);  // O += P_{j-1} V_{j-1}
    hopper::wgmma_wait<1>();  // S_j retired; the PV group may still run
    fence_all(sc);
    hopper::mbarrier_arrive(k_empty(s));
    softmax_tile<D>(sc, m_run, alpha, sum, w.seqlen - j * kBlockN, lane, p);
    hopper::wgmma_wait<0>();  // PV retired: O and the P fragments are free
    fence_all(o);
    fence_all(pa);
    hopper::mbarrier_arrive(v_empty(sp));
    rescale_running<D>(o, l_run, alpha, sum);
    pack_p<T>(sc, pa);
  }

  // The last tile's PV.
  {
    const int sp = (w.n_tiles - 1) % S;
    hopper::mbarrier_wait(v_full(sp), ((w.n_tiles - 1) / S) & 1);
    const int valid = w.seqlen - (w.n_tiles - 1) * kBlockN;
    if (valid < kBlockN) {  // partial (uniform over the consumers): they sync on v_tail, not the block
      zero_tail_rows<D>(v_tile(sp), valid, tid - 128, kConsumerThreads);
      hopper::mbarrier_arrive(v_tail);
      hopper::mbarrier_wait(v_tail, 0);
    }
    fence_all(o);
    fence_all(pa);
    hopper::wgmma_fence();
    issue_pv<T, D>(o, pa, v_tile(sp), p);
    hopper::wgmma_wait<0>();
    fence_all(o);
  }

  store_rows<T, D>(o, l_run, m_run, w, w.m0 + c * 64 + warp * 16, lane, p);
}

// Variant 0 (the default) is v1 until a GPU measures v2 faster (and correct) at the encoder's shapes;
// then change this one line (and csrc/README.md).
constexpr int kDefaultVariant = 1;
int resolve_variant(int variant) { return variant == 0 ? kDefaultVariant : variant; }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, int D>
cudaError_t launch(const AttentionProblem& pr, cudaStream_t stream) {
  const uint64_t es = 2;
  CUtensorMap maps[3];
  const void* bases[3] = {pr.q, pr.k, pr.v};
  const int64_t heads[3] = {pr.heads_q, pr.heads_kv, pr.heads_kv};
  const int64_t st_tok[3] = {pr.q_stride_tok, pr.k_stride_tok, pr.v_stride_tok};
  const int64_t st_head[3] = {pr.q_stride_head, pr.k_stride_head, pr.v_stride_head};
  for (int i = 0; i < 3; ++i) {
    const uint64_t dims[3] = {static_cast<uint64_t>(D), static_cast<uint64_t>(heads[i]),
                              static_cast<uint64_t>(pr.total_tokens)};
    // A single head's stride is never used (coordinate 0): give the map a nested one.
    const int64_t head_stride = heads[i] == 1 ? D : st_head[i];
    const uint64_t strides[2] = {static_cast<uint64_t>(head_stride) * es, static_cast<uint64_t>(st_tok[i]) * es};
    const uint32_t box[3] = {static_cast<uint32_t>(kPanelCols), 1u, static_cast<uint32_t>(kBlockM)};
    const cudaError_t e = hopper::encode_tensor_map_3d(&maps[i], pr.dtype, bases[i], dims, strides, box);
    if (e != cudaSuccess) return e;
  }
  Params p{};
  p.cu_seqlens = pr.cu_seqlens;
  p.out = pr.out;
  p.lse = pr.lse;
  p.out_stride_tok = pr.out_stride_tok;
  p.out_stride_head = pr.out_stride_head;
  p.total_tokens = pr.total_tokens;
  p.group = static_cast<int>(pr.heads_q / pr.heads_kv);
  p.softcap = pr.softcap > 0.f;
  p.scale_log2 = pr.softmax_scale * kLog2e;
  p.cap_in = p.softcap ? pr.softmax_scale / pr.softcap : 0.f;
  p.cap_out = pr.softcap * kLog2e;
  p.v_lbo = pr.v_desc_lbo != 0 ? pr.v_desc_lbo : kMNMajorLBO;
  p.v_sbo = pr.v_desc_sbo != 0 ? pr.v_desc_sbo : kMNMajorSBO;
  const dim3 grid(static_cast<unsigned>((pr.max_seqlen + kBlockM - 1) / kBlockM), static_cast<unsigned>(pr.heads_q),
                  static_cast<unsigned>(pr.batch));
  if (resolve_variant(pr.variant) == 2) {
    auto kernel = attention_fwd_ws_kernel<T, D>;
    const int smem = static_cast<int>(LayoutV2<D>::kAlloc);
    cudaError_t e = hopper::set_max_dynamic_smem(kernel, smem);
    if (e != cudaSuccess) return e;
    L2VF_LAUNCH_SMEM(kernel, grid, kThreadsV2, smem, stream, maps[0], maps[1], maps[2], p);
    return cudaGetLastError();
  }
  auto kernel = attention_fwd_kernel<T, D>;
  const int smem = static_cast<int>(Layout<D>::kAlloc);
  cudaError_t e = hopper::set_max_dynamic_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  L2VF_LAUNCH_SMEM(kernel, grid, kThreads, smem, stream, maps[0], maps[1], maps[2], p);
  return cudaGetLastError();
}

}  // namespace

const char* attention_unsupported(const AttentionProblem& p) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return "dtype must be bfloat16 or float16";
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim must be 64 or 128";
  if (p.heads_q <= 0 || p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0)
    return "heads_q must be a positive multiple of heads_kv";
  if (p.heads_q > 65535 || p.batch > 65535) return "heads_q and the batch size must be at most 65535 (grid limits)";
  if (p.batch < 0 || p.total_tokens < 0 || p.max_seqlen < 0) return "negative sizes";
  if (p.total_tokens >= (int64_t{1} << 31)) return "at most 2^31 - 1 tokens are supported";
  if (!(p.softmax_scale > 0.f) || !std::isfinite(p.softmax_scale)) return "softmax_scale must be finite and > 0";
  if (!(p.softcap >= 0.f) || !std::isfinite(p.softcap)) return "softcap must be finite and >= 0";
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v))
    return "q, k and v must start at 16-byte aligned addresses (TMA)";
  const int64_t strides[6] = {p.q_stride_tok, p.q_stride_head, p.k_stride_tok, p.k_stride_head, p.v_stride_tok,
                              p.v_stride_head};
  const int64_t heads[6] = {p.heads_q, p.heads_q, p.heads_kv, p.heads_kv, p.heads_kv, p.heads_kv};
  for (int i = 0; i < 6; ++i) {
    const bool head = i % 2 == 1;
    if (head && heads[i] == 1) continue;  // a single head's stride is never used
    if (strides[i] <= 0 || (strides[i] * 2) % 16 != 0)
      return "the token and head strides of q, k and v must be positive multiples of 16 bytes (TMA)";
  }
  for (int i = 0; i < 3; ++i) {
    const int64_t hs = heads[2 * i] == 1 ? p.head_dim : strides[2 * i + 1];
    if (hs < p.head_dim || strides[2 * i] < hs * heads[2 * i])
      return "q, k and v must have nested strides: head stride >= head_dim, token stride >= heads * head stride";
  }
  if (reinterpret_cast<uintptr_t>(p.out) % 4 != 0 || p.out_stride_tok % 2 != 0 || p.out_stride_head % 2 != 0)
    return "out must be 4-byte aligned with even strides";
  if (p.batch > 0 && p.cu_seqlens == nullptr) return "cu_seqlens is null";
  if (p.variant < 0 || p.variant > 2) return "variant must be 0 (default), 1 (v1) or 2 (v2, warp-specialised)";
  for (const uint32_t stride : {p.v_desc_lbo, p.v_desc_sbo})
    if (stride % 16 != 0 || stride >= (1u << 18))
      return "v_desc_lbo and v_desc_sbo must be multiples of 16 below 2^18 (0: the built-in layout)";
  return nullptr;
}

const char* attention_device_unsupported() {
  int major = 0, minor = 0;
  if (hopper::device_capability(&major, &minor) != cudaSuccess) return "cannot query the current device";
  if (major != 9 || minor != 0) return "the kernel needs an sm_90 GPU (H100 / H200; built for sm_90a)";
  return nullptr;
}

int attention_smem_bytes(int64_t head_dim, int variant) {
  if (resolve_variant(variant) == 2)
    return head_dim == 64 ? static_cast<int>(LayoutV2<64>::kAlloc) : static_cast<int>(LayoutV2<128>::kAlloc);
  return head_dim == 64 ? static_cast<int>(Layout<64>::kAlloc) : static_cast<int>(Layout<128>::kAlloc);
}

cudaError_t attention_forward(const AttentionProblem& p, cudaStream_t stream) {
  if (attention_unsupported(p) != nullptr) return cudaErrorInvalidValue;
  if (attention_device_unsupported() != nullptr) return cudaErrorNotSupported;
  if (p.batch == 0 || p.total_tokens == 0 || p.max_seqlen == 0) return cudaSuccess;
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64) return bf16 ? launch<__nv_bfloat16, 64>(p, stream) : launch<__half, 64>(p, stream);
  return bf16 ? launch<__nv_bfloat16, 128>(p, stream) : launch<__half, 128>(p, stream);
}

}  // namespace l2vf
