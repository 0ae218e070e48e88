// Hopper (sm_90a) primitives for the kernels of csrc/: shared-memory addressing, mbarriers, TMA tile
// loads and warpgroup MMA (wgmma), each a small device function with its PTX inline asm.
//
// Under the CPU emulator (L2VF_EMULATOR, csrc/emulator/cuda_emulator.h) the same names come from
// emulator/hopper_emulator.h, which emulates them as written: mbarrier phases and transaction counts,
// TMA copies into the SWIZZLE_128B layout with zero fill, wgmma operands read from shared memory by
// decoding the matrix descriptors and from the A register fragments of the warp. A kernel that uses
// only these functions compiles unchanged for both.
//
// Conventions: shared-memory operands are 32-bit shared-window addresses (smem_addr); matrix
// descriptors follow the sm_90 GmmaDescriptor (make_smem_desc_sw128). Host helpers (tensor-map
// encoding through the driver entry point, device capability, the dynamic smem attribute) are at the end.
#pragma once

#include <cstdint>

#include <cuda.h>  // CUtensorMap and its enums (the type only: no -lcuda, the encoder is looked up at run time)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.h"

#ifndef L2VF_LAUNCH_SMEM
#define L2VF_LAUNCH_SMEM(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

namespace l2vf {
namespace hopper {

// ---------------------------------------------------------------------------------------------------
// Matrix descriptors (sm_90 wgmma), identical on both sides: plain bit packing.
//   bits  0-13: start address >> 4        bits 16-29: leading byte offset (LBO) >> 4
//   bits 32-45: stride byte offset >> 4   bits 49-51: base offset (0: the swizzle atoms are 1024-aligned)
//   bits 62-63: layout type (0 interleave, 1 SWIZZLE_128B, 2 SWIZZLE_64B, 3 SWIZZLE_32B)
// Canonical SWIZZLE_128B layouts (16-bit elements, T = 8 per 16 bytes; CUTLASS mma_sm90_desc.hpp):
//   K-major:  ((8,m),(T,2)):((8T,SBO),(1,T))   rows 128 B apart, 8-row groups SBO apart, LBO unused
//   MN-major: ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))   64-element MN panels LBO apart, 8-deep K groups SBO apart
// then Swizzle<3,4,3> on the byte address: bits [4,7) ^= bits [7,10).
// ---------------------------------------------------------------------------------------------------
constexpr uint64_t kLayoutSwizzle128B = 1;

__host__ __device__ __forceinline__ uint64_t make_smem_desc_sw128(uint32_t smem_address, uint32_t lbo_bytes,
                                                                  uint32_t sbo_bytes) {
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((smem_address >> 4) & 0x3fffu);
  desc |= static_cast<uint64_t>((lbo_bytes >> 4) & 0x3fffu) << 16;
  desc |= static_cast<uint64_t>((sbo_bytes >> 4) & 0x3fffu) << 32;
  desc |= kLayoutSwizzle128B << 62;
  return desc;
}

// Two floats as the packed 16-bit pair of a wgmma A fragment register (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat16 l = __float2bfloat16_rn(lo), h = __float2bfloat16_rn(hi);
  return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&l)) |
         (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&h)) << 16);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half l = __float2half_rn(lo), h = __float2half_rn(hi);
  return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&l)) |
         (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&h)) << 16);
}

}  // namespace hopper
}  // namespace l2vf

#ifdef L2VF_EMULATOR
#include "emulator/hopper_emulator.h"
#else

#define L2VF_GRID_CONSTANT __grid_constant__

namespace l2vf {
namespace hopper {

// The block's dynamic shared memory (kernels round it up to the alignment they need).
__device__ __forceinline__ uint8_t* dynamic_smem() {
  extern __shared__ __align__(16) uint8_t l2vf_dynamic_smem[];
  return l2vf_dynamic_smem;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Nothing to do between polls on the GPU (the emulator yields the fiber here).
__device__ __forceinline__ void spin_pause() {}

// ---- mbarriers ------------------------------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}

// Makes this thread's generic-proxy shared-memory writes visible to the async proxy (TMA, wgmma operands).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Makes the initialisations visible to the async proxy (TMA) and the other threads (with a
// __syncthreads after it).
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  fence_proxy_async();
}

// Zeroes 16 bytes of shared memory (16-byte aligned) from ordinary code (the generic proxy): before a wgmma
// reads them, fence_proxy_async and then a barrier with the threads issuing that wgmma.
__device__ __forceinline__ void st_shared_zero16(uint32_t addr) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t tx_bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(tx_bytes) : "memory");
}

// A plain arrival (no transaction bytes): the consumer side of an "empty" barrier.
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// True once the phase of parity `parity` has completed.
__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

// ---- register reallocation (warp specialisation) -----------------------------------------------------
// Every warp of a warpgroup must execute the same setmaxnreg (.sync.aligned); N: 24..256, multiple of 8.
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// ---- TMA ------------------------------------------------------------------------------------------
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// The box at coordinates (c0, c1, c2) (innermost first) of a 3-D tensor map into shared memory at dst,
// signalling its bytes to the mbarrier bar (complete_tx). Out-of-bounds elements are zero-filled.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// ---- wgmma ----------------------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accesses of an accumulator register across the wgmma fences
// (CUTLASS's warpgroup_fence_operand).
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// D (64 x 128, f32) = A (64 x 16, smem, K-major) * B (16 x 128, smem, K-major) (+ D if scale_d).
template <typename T>
__device__ __forceinline__ void wgmma_ss_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d);
// D (64 x N, f32) = A (64 x 16, registers) * B (16 x N, smem, MN-major: imm-trans-b = 1) (+ D if scale_d).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_tb(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d);

// The accumulator operand lists of the asm statements below (32 or 64 f32 registers, d[0] first).
#define L2VF_ACC32 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define L2VF_ACC64 L2VF_ACC32, "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define L2VF_REGS32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define L2VF_REGS64 L2VF_REGS32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// The three wgmma shapes for one 16-bit input type (PTX name TYPE: "bf16" or "f16"). scale_d = 0
// overwrites D (the first k-step), 1 accumulates. The immediates: scale-a 1, scale-b 1, then the
// transposes (SS: none; RS: trans-b = 1, B is MN-major).
#define L2VF_DEFINE_WGMMA(T, TYPE)                                                                              \
  template <>                                                                                                   \
  __device__ __forceinline__ void wgmma_ss_m64n128k16<T>(float (&d)[64], uint64_t desc_a, uint64_t desc_b,      \
                                                         int scale_d) {                                         \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                   \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" L2VF_REGS64                   \
                 "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                              \
                 : L2VF_ACC64                                                                                   \
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                     \
  }                                                                                                             \
  template <>                                                                                                   \
  __device__ __forceinline__ void wgmma_rs_tb<T, 64>(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,   \
                                                     int scale_d) {                                             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                   \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {" L2VF_REGS32                    \
                 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                \
                 : L2VF_ACC32                                                                                   \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));                       \
  }                                                                                                             \
  template <>                                                                                                   \
  __device__ __forceinline__ void wgmma_rs_tb<T, 128>(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,  \
                                                      int scale_d) {                                            \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                   \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" L2VF_REGS64                   \
                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                                \
                 : L2VF_ACC64                                                                                   \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));                       \
  }

L2VF_DEFINE_WGMMA(__nv_bfloat16, "bf16")
L2VF_DEFINE_WGMMA(__half, "f16")
#undef L2VF_DEFINE_WGMMA

// ---- math -----------------------------------------------------------------------------------------
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- host -----------------------------------------------------------------------------------------
// (major, minor) of the current device.
inline cudaError_t device_capability(int* major, int* minor) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return e;
  return cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, dev);
}

template <typename Kernel>
inline cudaError_t set_max_dynamic_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// A 3-D tiled tensor map, SWIZZLE_128B, zero OOB fill. dims / box innermost first; strides_bytes are
// the byte strides of dims 1 and 2. cuTensorMapEncodeTiled comes from the driver through the runtime
// (cudaGetDriverEntryPointByVersion), so the extension needs no -lcuda.
inline cudaError_t encode_tensor_map_3d(CUtensorMap* map, DType dtype, const void* base, const uint64_t dims[3],
                                        const uint64_t strides_bytes[2], const uint32_t box[3]) {
  static EncodeTiledFn encode = nullptr;
  if (encode == nullptr) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                           &status);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &status);
#endif
    if (e != cudaSuccess) return e;
    if (status != cudaDriverEntryPointSuccess || fn == nullptr) return cudaErrorNotSupported;
    encode = reinterpret_cast<EncodeTiledFn>(fn);
  }
  const cuuint64_t gdims[3] = {dims[0], dims[1], dims[2]};
  const cuuint64_t gstrides[2] = {strides_bytes[0], strides_bytes[1]};
  const cuuint32_t boxd[3] = {box[0], box[1], box[2]};
  const cuuint32_t estrides[3] = {1, 1, 1};
  const CUtensorMapDataType type =
      dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult r = encode(map, type, 3, const_cast<void*>(base), gdims, gstrides, boxd, estrides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace hopper
}  // namespace l2vf

#endif  // L2VF_EMULATOR

namespace l2vf {
namespace hopper {

// Polls the mbarrier until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  while (!mbarrier_try_wait(bar, parity)) spin_pause();
}

}  // namespace hopper
}  // namespace l2vf
