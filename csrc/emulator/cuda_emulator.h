// A CPU emulator for the CUDA kernels of csrc/, for tests on machines without a GPU.
//
// The kernel sources are compiled unchanged by g++ with this header in front of them: every CUDA
// thread of a block runs as a fiber, so that __syncthreads and the warp collectives (__ballot_sync,
// __shfl_xor_sync) have their CUDA meaning, and a barrier reached in divergent code is reported as a
// deadlock. Blocks run one at a time, in a shuffled order (blocks must not depend on their order);
// __shared__ becomes a function-static variable, shared by the threads of the running block. 16-byte vector loads and stores check their alignment, and every global access made
// through __ldg / __ldcg / __stwb is checked against the buffers registered with emu::Buffers.
//
// What it does not show: timing, occupancy, races between concurrently running blocks (the
// last-block-done counters are exercised in every order, but not concurrently), memory-model bugs
// (a missing __threadfence), and nvcc-specific code generation. Those need a GPU.
#pragma once

#define L2VF_EMULATOR 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline

namespace emu {

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "cuda_emulator: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// Global-memory ranges a kernel may touch; accesses through the intrinsics outside them abort.
struct Range {
  uintptr_t lo, hi;
};
inline std::vector<Range>& ranges() {
  static std::vector<Range> r;
  return r;
}
inline void add_range(const void* p, size_t bytes) {
  if (p != nullptr && bytes > 0) ranges().push_back({reinterpret_cast<uintptr_t>(p), reinterpret_cast<uintptr_t>(p) + bytes});
}
inline void clear_ranges() { ranges().clear(); }
// Bytes spanned by `rows` rows of `cols` elements, `stride` elements apart (the range to register for them).
inline size_t rows_bytes(int64_t rows, int64_t stride, int64_t cols, int element_bytes) {
  return rows > 0 && cols > 0 ? static_cast<size_t>(((rows - 1) * stride + cols) * element_bytes) : 0;
}
inline void check_access(const void* p, size_t bytes, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (ranges().empty()) return;
  for (const Range& r : ranges())
    if (a >= r.lo && a + bytes <= r.hi) return;
  fail(std::string(what) + ": out-of-bounds access of " + std::to_string(bytes) + " bytes at " + std::to_string(a));
}

// Every CUDA thread of a block is a fiber (ucontext) on the calling OS thread; a fiber runs until it
// reaches a barrier (__syncthreads, or a warp collective's exchange) or returns. When every fiber waits,
// the scheduler releases each warp whose live lanes all wait at a warp barrier, and the block when all
// its live threads wait at __syncthreads; otherwise the kernel has diverged around a barrier: abort.
// kSpin: the fiber polls something (an mbarrier) that another fiber or an emulated asynchronous unit
// must change; it yields and runs again after the others. When every live fiber spins or waits and
// nothing changed in a whole round (no barrier released, no mbarrier touched: see note_progress),
// the kernel can never finish: the scheduler reports a deadlock.
enum FiberState { kRunnable, kWaitBlock, kWaitWarp, kSpin, kDone };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  FiberState state = kRunnable;
  bool from_spin = false;   // resumed from kSpin (a poll that found nothing new is no progress)
  unsigned collectives = 0;  // warp collectives done: selects the exchange buffer (double buffering)
};

struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  unsigned current = 0;
  std::function<void()> body;
  uint64_t exchange[2][32][32];  // [buffer][warp][lane]
};

// The exchange row of this lane's warp for its next collective. Two buffers alternate, so a single
// warp barrier per collective suffices: a lane can only write buffer k again after the whole warp has
// passed the barrier of the collective in between, that is after every lane has read buffer k.
inline uint64_t* exchange_row();

inline Scheduler*& scheduler() {
  static Scheduler* s = nullptr;
  return s;
}

inline dim3 thread_idx, block_idx, block_dim, grid_dim;

// Something a spinning fiber may be waiting for changed (an mbarrier arrival or transaction).
inline uint64_t progress_events = 0;
inline void note_progress() { ++progress_events; }

// Dynamic shared memory: a window standing for the block's shared address space. The dynamic
// allocation starts kDynamicSmemOffset bytes into it (16-byte aligned only, as the CUDA guarantee is:
// kernels that need more alignment must round up themselves). Shared addresses (cvta) are offsets
// into the window. Refilled with 0xff bytes (NaN in fp16 / bf16 / fp32) before every block.
constexpr size_t kSmemWindowBytes = 256 * 1024;
constexpr size_t kDynamicSmemOffset = 0x410;
inline size_t dynamic_smem_bytes = 0;
inline unsigned char* smem_window() {
  alignas(4096) static unsigned char w[kSmemWindowBytes];
  return w;
}
inline uint64_t block_serial = 0;  // incremented for every block run
// cudaFuncAttributeMaxDynamicSharedMemorySize per kernel (hopper_emulator.h sets it): a launch with more
// than 48 KB of dynamic shared memory needs it, as on the GPU.
inline std::vector<std::pair<const void*, size_t>>& smem_limits() {
  static std::vector<std::pair<const void*, size_t>> v;
  return v;
}
// Hooks for extensions of the emulator (hopper_emulator.h): called before and after every block.
inline std::function<void()> on_block_start, on_block_end;

inline unsigned lane() { return thread_idx.x & 31u; }
inline unsigned warp() { return thread_idx.x >> 5; }

inline void wait_at(FiberState what) {
  Scheduler& s = *scheduler();
  Fiber& f = s.fibers[s.current];
  f.state = what;
  swapcontext(&f.ctx, &s.main);
}

inline uint64_t* exchange_row() {
  Scheduler& s = *scheduler();
  const unsigned parity = s.fibers[s.current].collectives++ & 1u;
  return s.exchange[parity][warp()];
}

inline void spin_yield() { wait_at(kSpin); }

inline void fiber_entry() {
  Scheduler& s = *scheduler();
  s.body();
  s.fibers[s.current].state = kDone;  // uc_link returns to the scheduler
}

inline uint64_t& launch_count() {
  static uint64_t n = 0;
  return n;
}

constexpr size_t kStackBytes = 128 * 1024;

// Runs kernel(args...) over the grid: blocks one at a time in a shuffled order (seed: L2VF_EMU_SEED).
template <typename... KArgs, typename... Args>
void launch_smem(void (*kernel)(KArgs...), dim3 grid, unsigned threads, size_t smem_bytes, Args&&... args) {
  if (smem_bytes + kDynamicSmemOffset > kSmemWindowBytes) fail("dynamic shared memory larger than the window");
  if (smem_bytes > 48 * 1024) {
    size_t limit = 48 * 1024;
    for (const auto& [k, bytes] : smem_limits())
      if (k == reinterpret_cast<const void*>(kernel)) limit = bytes;
    if (smem_bytes > limit)
      fail("launch with " + std::to_string(smem_bytes) + " bytes of dynamic shared memory, but the kernel's "
           "cudaFuncAttributeMaxDynamicSharedMemorySize is " + std::to_string(limit));
  }
  dynamic_smem_bytes = smem_bytes;
  if (threads % 32 != 0 || threads > 1024) fail("block size must be a multiple of 32, at most 1024");
  std::tuple<std::decay_t<KArgs>...> targs(std::forward<Args>(args)...);
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(nblocks);
  std::iota(order.begin(), order.end(), 0);
  const char* seed_env = std::getenv("L2VF_EMU_SEED");
  std::mt19937_64 rng((seed_env ? std::strtoull(seed_env, nullptr, 10) : 0) + launch_count()++);
  std::shuffle(order.begin(), order.end(), rng);

  Scheduler s;
  s.fibers.resize(threads);
  for (Fiber& f : s.fibers) f.stack.resize(kStackBytes);
  s.body = [&] { std::apply(kernel, targs); };
  scheduler() = &s;
  block_dim = dim3(threads);
  grid_dim = grid;
  for (uint64_t linear : order) {
    block_idx = dim3(static_cast<unsigned>(linear % grid.x), static_cast<unsigned>((linear / grid.x) % grid.y),
                     static_cast<unsigned>(linear / (static_cast<uint64_t>(grid.x) * grid.y)));
    for (Fiber& f : s.fibers) {
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &s.main;
      makecontext(&f.ctx, fiber_entry, 0);
      f.state = kRunnable;
      f.from_spin = false;
      f.collectives = 0;
    }
    ++block_serial;
    std::memset(smem_window(), 0xff, kSmemWindowBytes);
    if (on_block_start) on_block_start();
    for (;;) {
      const uint64_t events_before = progress_events;
      bool moved = false;  // a fiber ran code other than a fruitless poll
      for (unsigned t = 0; t < threads; ++t) {
        if (s.fibers[t].state != kRunnable) continue;
        s.current = t;
        thread_idx = dim3(t);
        swapcontext(&s.main, &s.fibers[t].ctx);
        if (!(s.fibers[t].from_spin && s.fibers[t].state == kSpin)) moved = true;
        s.fibers[t].from_spin = false;
      }
      // Everyone waits or is done: release what can be released.
      bool released = false, all_done = true, block_ready = true;
      for (unsigned t = 0; t < threads; ++t) {
        if (s.fibers[t].state != kDone) all_done = false;
        if (s.fibers[t].state != kDone && s.fibers[t].state != kWaitBlock) block_ready = false;
      }
      if (all_done) break;
      for (unsigned w = 0; w < threads / 32; ++w) {
        bool ready = true, any = false;
        for (unsigned l = 0; l < 32; ++l) {
          const FiberState st = s.fibers[32 * w + l].state;
          if (st == kDone) continue;
          any = true;
          if (st != kWaitWarp) ready = false;
        }
        if (ready && any) {
          for (unsigned l = 0; l < 32; ++l)
            if (s.fibers[32 * w + l].state == kWaitWarp) s.fibers[32 * w + l].state = kRunnable;
          released = true;
        }
      }
      if (!released && block_ready) {
        for (Fiber& f : s.fibers)
          if (f.state == kWaitBlock) f.state = kRunnable;
        released = true;
      }
      bool spinning = false;
      for (const Fiber& f : s.fibers) spinning = spinning || f.state == kSpin;
      if (spinning) {
        if (!released && !moved && progress_events == events_before)
          fail("deadlock: every live thread spins (on an mbarrier phase that can no longer complete) or waits at "
               "a barrier that the spinning threads never reach");
        for (Fiber& f : s.fibers)
          if (f.state == kSpin) {
            f.state = kRunnable;
            f.from_spin = true;
          }
        continue;
      }
      if (!released) fail("deadlock: threads wait at different barriers (a barrier or warp collective in divergent code)");
    }
    if (on_block_end) on_block_end();
  }
  scheduler() = nullptr;
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, unsigned threads, Args&&... args) {
  launch_smem(kernel, grid, threads, 0, std::forward<Args>(args)...);
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

#undef L2VF_LAUNCH
#define L2VF_LAUNCH(kernel, grid, block, stream, ...) emu::launch(kernel, (grid), (block), __VA_ARGS__)
#undef L2VF_LAUNCH_SMEM
#define L2VF_LAUNCH_SMEM(kernel, grid, block, smem, stream, ...) \
  emu::launch_smem(kernel, (grid), (block), (smem), __VA_ARGS__)

inline void __syncthreads() { emu::wait_at(emu::kWaitBlock); }
inline void __threadfence() {}

inline void emu_check_mask(unsigned mask) {
  if (mask != 0xffffffffu) emu::fail("only full-warp masks are emulated");
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  emu_check_mask(mask);
  uint64_t* row = emu::exchange_row();
  row[emu::lane()] = pred ? 1u : 0u;
  emu::wait_at(emu::kWaitWarp);
  unsigned bits = 0;
  for (unsigned i = 0; i < 32; ++i) bits |= (row[i] ? 1u : 0u) << i;
  return bits;
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  emu_check_mask(mask);
  uint64_t* row = emu::exchange_row();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  row[emu::lane()] = bits;
  emu::wait_at(emu::kWaitWarp);
  const uint64_t other = row[emu::lane() ^ static_cast<unsigned>(lane_mask)];
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

template <typename T>
inline T __ldg(const T* p) {
  if constexpr (sizeof(T) == 16) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fail("misaligned 16-byte load");
  }
  emu::check_access(p, sizeof(T), "__ldg");
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  emu::check_access(p, sizeof(T), "__ldcg");
  return *p;
}
template <typename T>
inline void __stwb(T* p, const T& v) {
  if constexpr (sizeof(T) == 16) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fail("misaligned 16-byte store");
  }
  emu::check_access(p, sizeof(T), "__stwb");
  *p = v;
}

inline int atomicAdd(int* p, int v) {
  emu::check_access(p, sizeof(int), "atomicAdd");
  const int old = *p;
  *p = old + v;
  return old;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline cudaError_t emu_get_last_error() { return cudaSuccess; }
#define cudaGetLastError emu_get_last_error

using std::max;
using std::min;

#include "../device_common.cuh"

// WMMA (nvcuda::wmma) for the m16n16k16 shapes the kernels use. Which lane holds which element of a
// real fragment is unspecified, so code may only move fragments through load / mma / store; here
// every lane holds the whole 16 x 16 tile (the warp-wide result is the same). Pointers must be
// 32-byte aligned and ldm a multiple of 16 bytes, as on the GPU.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
  float x[16 * 16];
  static constexpr int num_elements = 16 * 16;
};

inline void emu_check_wmma_pointer(const void* p, unsigned ldm_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("wmma: pointer not 32-byte aligned");
  if (ldm_bytes % 16 != 0) emu::fail("wmma: ldm not a multiple of 16 bytes");
}

template <typename F>
inline void fill_fragment(F& f, float v) {
  for (float& e : f.x) e = v;
}

// A: 16 x 16 (rows i, columns k), element (i, k) at p[i * ldm + k].
template <typename T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  emu_check_wmma_pointer(p, ldm * sizeof(T));
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) f.x[i * 16 + k] = l2vf::detail::to_float(p[i * ldm + k]);
}

// B: 16 x 16 (rows k, columns j), column-major: element (k, j) at p[j * ldm + k].
template <typename T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  emu_check_wmma_pointer(p, ldm * sizeof(T));
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 16; ++j) f.x[k * 16 + j] = l2vf::detail::to_float(p[j * ldm + k]);
}

template <typename T>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, T, col_major>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) acc = std::fma(a.x[i * 16 + k], b.x[k * 16 + j], acc);
      out[i * 16 + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout) {
  emu_check_wmma_pointer(p, ldm * sizeof(float));
  if (layout != mem_row_major) emu::fail("wmma: only mem_row_major stores are emulated");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ldm + j] = f.x[i * 16 + j];
}
}  // namespace wmma
}  // namespace nvcuda
