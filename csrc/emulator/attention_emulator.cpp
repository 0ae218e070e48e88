// csrc/attention.cu compiled for the CPU emulator (cuda_emulator.h + hopper_emulator.h), behind a C
// interface for ctypes (tests/test_cuda_kernels.py). The kernel source is the one nvcc compiles.
#include "cuda_emulator.h"

#include "../attention.cu"

namespace selftest {

using namespace l2vf::hopper;

// Kernels that break the rules the emulator enforces; each must abort with its message (run in a
// subprocess by the tests). 1: a phase nobody completes (deadlock); 2: expect_tx bytes that never
// arrive (deadlock); 3: a wgmma without wgmma.fence; 4: a wgmma never waited for; 5: a descriptor with
// a layout type other than SWIZZLE_128B; 6: a TMA destination that is not 1024-byte aligned.
// Warp-specialisation protocol bugs (kernel v2): 7: consumers that never arrive on the empty barriers
// (the producer waits forever: deadlock); 8: a TMA refilling shared memory that an unretired wgmma still
// reads; 9: accumulators written while their wgmma is in flight; 10: setmaxnreg executed by one warp of
// a warpgroup only; 11: RS A-fragment registers overwritten before their wgmma retired.
__global__ void broken_kernel(int which, const CUtensorMap map) {
  const uint32_t base = (smem_addr(dynamic_smem()) + 1023u) & ~1023u;
  const uint32_t bar = base + 32768;
  if (threadIdx.x == 0) mbarrier_init(bar, 1);
  __syncthreads();
  float d[64] = {};
  const uint64_t desc = make_smem_desc_sw128(base, 16, 1024);
  switch (which) {
    case 1: mbarrier_wait(bar, 0); break;
    case 2:
      if (threadIdx.x == 0) mbarrier_arrive_expect_tx(bar, 128);
      mbarrier_wait(bar, 0);
      break;
    case 3: wgmma_ss_m64n128k16<__nv_bfloat16>(d, desc, desc, 0); break;
    case 4:
      wgmma_fence();
      wgmma_ss_m64n128k16<__nv_bfloat16>(d, desc, desc, 0);
      wgmma_commit();
      break;
    case 5:
      wgmma_fence();
      wgmma_ss_m64n128k16<__nv_bfloat16>(d, desc & ~(3ull << 62), desc, 0);
      break;
    case 6:
      if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(bar, 128 * 128);
        tma_load_3d(base + 128, &map, bar, 0, 0, 0);
      }
      break;
    case 7: {  // thread 0 produces 4 tiles into 2 stages, warps 1-3 consume and never release
      const uint32_t full = bar, empty = bar + 16;
      if (threadIdx.x == 0) {
        for (int s = 0; s < 2; ++s) {
          mbarrier_init(full + 8 * s, 1);
          mbarrier_init(empty + 8 * s, 96);
        }
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        for (int j = 0; j < 4; ++j) {
          if (j >= 2) mbarrier_wait(empty + 8 * (j % 2), ((j / 2) + 1) & 1);
          mbarrier_arrive_expect_tx(full + 8 * (j % 2), 128 * 128);
          tma_load_3d(base + 16384 * (j % 2), &map, full + 8 * (j % 2), 0, 0, 0);
        }
      } else if (threadIdx.x >= 32) {
        for (int j = 0; j < 4; ++j) mbarrier_wait(full + 8 * (j % 2), (j / 2) & 1);  // no mbarrier_arrive(empty)
      }
      break;
    }
    case 8:
      wgmma_fence();
      wgmma_ss_m64n128k16<__nv_bfloat16>(d, desc, desc, 0);
      wgmma_commit();
      if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(bar, 128 * 128);
        tma_load_3d(base, &map, bar, 0, 0, 0);
      }
      wgmma_wait<0>();
      break;
    case 9:
      wgmma_fence();
      wgmma_ss_m64n128k16<__nv_bfloat16>(d, desc, desc, 0);
      wgmma_commit();
      d[5] += 1.f;
      wgmma_wait<0>();
      break;
    case 10:
      if (threadIdx.x < 32) setmaxnreg_inc<240>();
      break;
    case 11: {
      uint32_t a[4] = {1, 2, 3, 4};
      wgmma_fence();
      wgmma_rs_tb<__nv_bfloat16, 128>(d, a, desc, 1);
      wgmma_commit();
      a[2] = 7;
      wgmma_wait<0>();
      break;
    }
    default: break;
  }
}

}  // namespace selftest

extern "C" {

// Runs selftest::broken_kernel(which) on one block of 128 threads (aborts the process when the
// emulator catches the broken rule, which is the expected outcome).
void l2vf_emu_attention_selftest(int which) {
  static uint16_t data[128 * 64] = {};
  CUtensorMap map;
  const uint64_t dims[3] = {64, 1, 128}, strides[2] = {128, 128};
  const uint32_t box[3] = {64, 1, 128};
  l2vf::hopper::encode_tensor_map_3d(&map, l2vf::DType::kBFloat16, data, dims, strides, box);
  emu::clear_ranges();
  L2VF_LAUNCH_SMEM(selftest::broken_kernel, dim3(1), 128, 40000, nullptr, which, map);
}

// Returns the launcher's cudaError_t; *why gets attention_unsupported / attention_device_unsupported.
int l2vf_emu_attention_forward(const void* q, int64_t q_bytes, const void* k, int64_t k_bytes, const void* v,
                               int64_t v_bytes, int dtype, int64_t total, int64_t batch, int64_t max_seqlen,
                               int64_t heads_q, int64_t heads_kv, int64_t head_dim, int64_t q_st, int64_t q_sh,
                               int64_t k_st, int64_t k_sh, int64_t v_st, int64_t v_sh, const int32_t* cu_seqlens,
                               void* out, int64_t out_bytes, int64_t out_st, int64_t out_sh, float* lse,
                               float softmax_scale, float softcap, uint32_t v_desc_lbo, uint32_t v_desc_sbo,
                               int variant, const char** why) {
  l2vf::AttentionProblem p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.dtype = static_cast<l2vf::DType>(dtype);
  p.total_tokens = total;
  p.batch = batch;
  p.max_seqlen = max_seqlen;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  p.q_stride_tok = q_st;
  p.q_stride_head = q_sh;
  p.k_stride_tok = k_st;
  p.k_stride_head = k_sh;
  p.v_stride_tok = v_st;
  p.v_stride_head = v_sh;
  p.cu_seqlens = cu_seqlens;
  p.out = out;
  p.out_stride_tok = out_st;
  p.out_stride_head = out_sh;
  p.lse = lse;
  p.softmax_scale = softmax_scale;
  p.softcap = softcap;
  p.v_desc_lbo = v_desc_lbo;
  p.v_desc_sbo = v_desc_sbo;
  p.variant = variant;
  const char* msg = l2vf::attention_unsupported(p);
  if (msg == nullptr) msg = l2vf::attention_device_unsupported();
  if (why != nullptr) *why = msg;
  emu::clear_ranges();
  emu::add_range(q, static_cast<size_t>(q_bytes));
  emu::add_range(k, static_cast<size_t>(k_bytes));
  emu::add_range(v, static_cast<size_t>(v_bytes));
  emu::add_range(cu_seqlens, static_cast<size_t>(batch + 1) * 4);
  emu::add_range(out, static_cast<size_t>(out_bytes));
  emu::add_range(lse, static_cast<size_t>(heads_q * total) * 4);
  const int err = l2vf::attention_forward(p, nullptr);
  emu::clear_ranges();
  return err;
}

}  // extern "C"
