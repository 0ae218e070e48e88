// The Hopper primitives of csrc/hopper.cuh for the CPU emulator (included by hopper.cuh when
// L2VF_EMULATOR is defined, after cuda_emulator.h). Each emulates the PTX it stands for, as written:
//
// - shared memory: the emulator's window (cuda_emulator.h); smem_addr gives offsets into it, and every
//   access by address (TMA, wgmma, mbarrier) is checked against the block's dynamic allocation.
// - mbarrier: expected arrival count, pending arrivals, transaction count and completed phases, per the
//   PTX ISA: a phase completes when the pending arrivals and the tx-count are both zero; then the
//   arrivals are re-armed. try_wait.parity(P) is true once the phase of parity P has completed
//   (current phase parity != P). A poll that fails yields the fiber (spin_pause); the scheduler reports
//   a deadlock when every live thread only polls and nothing changes.
// - TMA (cp.async.bulk.tensor 3-D): copies the box synchronously at issue, zero-filling out-of-bounds
//   elements, into the SWIZZLE_128B layout (16-byte chunk c of a 128-byte row r lands at chunk
//   c ^ (address bits [7,10))), then performs complete_tx on the mbarrier.
// - wgmma: issue is warp-converged (a warp barrier); the operation is queued per thread and executed
//   at the wgmma.wait_group that retires its commit group (so a kernel reading its accumulators before
//   waiting sees stale values, and an issue without a wgmma.fence since the last wait aborts). Each
//   thread computes its own accumulator elements (fragment layout of the PTX ISA: row 16*warp + lane/4
//   (+8), columns 8c + 2*(lane%4) (+1)), reading shared-memory operands by decoding the descriptor
//   (start, LBO, SBO, layout type) with the canonical SWIZZLE_128B layouts (K-major / MN-major). The
//   A fragments of the RS form are exchanged within the warp (a row's 16 values live on a quad).
// - ex2 / tanh: exact std:: functions.
#pragma once

#include <cuda.h>

#include <array>
#include <deque>
#include <map>

#define L2VF_GRID_CONSTANT

namespace l2vf {
namespace hopper {
namespace emu_detail {

constexpr uint64_t kMapMagic = 0x6c3276667472746dull;  // "l2vftrtm"

struct TensorMap {
  uint64_t magic;
  const unsigned char* base;
  uint64_t dims[3];
  uint64_t strides[2];  // bytes, dims 1 and 2
  uint32_t box[3];
  uint32_t elem_bytes;
};
static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "the emulated tensor map must fit a CUtensorMap");

struct Mbarrier {
  uint32_t expected = 0, pending = 0;
  int64_t tx = 0;
  uint64_t phase = 0;  // completed phases
};

struct ThreadState {
  std::vector<std::function<void()>> uncommitted;
  std::deque<std::vector<std::function<void()>>> committed;
  bool fenced = false;
  std::map<const float*, int> pending_acc;  // accumulator arrays with issued, unretired wgmma
  std::vector<uint32_t> maxnreg;            // setmaxnreg values, in order
};

// Shared-memory bytes [lo, hi) that an issued, unretired wgmma of warpgroup wg reads (recorded by the
// warpgroup's first thread): a TMA write into them is a pipeline bug (a stage refilled too early).
struct InFlightRead {
  uint64_t id;
  uint32_t lo, hi, wg;
};

struct BlockState {
  std::map<uint32_t, Mbarrier> bars;
  std::vector<ThreadState> threads;
  std::vector<InFlightRead> inflight;
  uint64_t next_id = 0;
};

inline BlockState& block() {
  static BlockState b;
  return b;
}

inline ThreadState& thread() {
  BlockState& b = block();
  if (b.threads.size() != emu::block_dim.x) b.threads.resize(emu::block_dim.x);
  return b.threads[emu::thread_idx.x];
}

inline bool install_hooks() {
  emu::on_block_start = [] {
    block().bars.clear();
    block().threads.assign(emu::block_dim.x, ThreadState{});
    block().inflight.clear();
  };
  emu::on_block_end = [] {
    for (const ThreadState& t : block().threads)
      if (!t.uncommitted.empty() || !t.committed.empty())
        emu::fail("wgmma: the block ended with wgmma operations never retired by wgmma.wait_group");
    // setmaxnreg: every thread of a warpgroup executes the same sequence; the final counts fit the SM's
    // 64K registers when every warpgroup set one.
    const auto& th = block().threads;
    uint64_t total = 0;
    bool all_set = true;
    for (size_t g = 0; g + 128 <= th.size(); g += 128) {
      for (size_t t = g; t < g + 128; ++t)
        if (th[t].maxnreg != th[g].maxnreg)
          emu::fail("setmaxnreg: not executed uniformly by the warpgroup of thread " + std::to_string(g) +
                    " (thread " + std::to_string(t) + " differs)");
      if (th[g].maxnreg.empty()) all_set = false;
      else total += 128u * th[g].maxnreg.back();
    }
    if (all_set && total > 65536)
      emu::fail("setmaxnreg: the warpgroups' register counts add up to " + std::to_string(total) + " > 65536");
  };
  return true;
}
inline const bool hooks_installed = install_hooks();

// Shared-window address -> pointer, checked against the block's dynamic allocation.
inline unsigned char* smem_ptr(uint64_t addr, size_t bytes, const char* what) {
  const uint64_t lo = emu::kDynamicSmemOffset, hi = lo + emu::dynamic_smem_bytes;
  if (addr < lo || addr + bytes > hi)
    emu::fail(std::string(what) + ": shared address " + std::to_string(addr) + " (+" + std::to_string(bytes) +
              ") outside the dynamic allocation [" + std::to_string(lo) + ", " + std::to_string(hi) + ")");
  return emu::smem_window() + addr;
}

inline Mbarrier& bar_at(uint32_t bar, const char* what) {
  auto it = block().bars.find(bar);
  if (it == block().bars.end()) emu::fail(std::string(what) + ": mbarrier at " + std::to_string(bar) + " not initialised");
  return it->second;
}

inline void maybe_complete(Mbarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.expected;
    b.tx = 0;
  }
}

inline void complete_tx(uint32_t bar, uint32_t bytes) {
  Mbarrier& b = bar_at(bar, "complete_tx");
  b.tx -= bytes;
  maybe_complete(b);
  emu::note_progress();
}

inline uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

struct Desc {
  uint32_t start, lbo, sbo;
};

inline Desc decode_desc(uint64_t d) {
  const uint64_t layout = d >> 62, base_offset = (d >> 49) & 7u;
  const uint64_t reserved = d & ((3ull << 14) | (3ull << 30) | (7ull << 46) | (0x3ffull << 52));
  if (layout != 1) emu::fail("wgmma descriptor: only SWIZZLE_128B (layout type 1) is emulated, got " + std::to_string(layout));
  if (base_offset != 0) emu::fail("wgmma descriptor: base offset must be 0 (1024-aligned swizzle atoms)");
  if (reserved != 0) emu::fail("wgmma descriptor: reserved bits set");
  return {static_cast<uint32_t>((d & 0x3fffu) << 4), static_cast<uint32_t>(((d >> 16) & 0x3fffu) << 4),
          static_cast<uint32_t>(((d >> 32) & 0x3fffu) << 4)};
}

// Byte address of element (mn, k) (k < 16) of a 16-bit operand in the canonical SWIZZLE_128B layouts.
inline uint32_t operand_addr(const Desc& d, uint32_t mn, uint32_t k, bool k_major) {
  uint32_t a;
  if (k_major) {
    a = d.start + (mn / 8) * d.sbo + (mn % 8) * 128 + k * 2;
  } else {
    a = d.start + (mn / 64) * d.lbo + (mn % 64) * 2 + (k / 8) * d.sbo + (k % 8) * 128;
  }
  return swizzle128(a);
}

// The 1024-byte blocks of 8 rows of 128 bytes an operand reads: K-major (rows mn, 8-row groups SBO
// apart) or MN-major (64-column panels LBO apart, two 8-deep k groups SBO apart).
inline void operand_rows(const Desc& d, uint32_t mn_extent, bool k_major, std::vector<std::pair<uint32_t, uint32_t>>* out) {
  if (k_major) {
    for (uint32_t g = 0; g < mn_extent / 8; ++g) {
      const uint32_t lo = (d.start + g * d.sbo) & ~127u;
      out->push_back({lo, lo + 1024});
    }
  } else {
    for (uint32_t p = 0; p < (mn_extent + 63) / 64; ++p)
      for (uint32_t kg = 0; kg < 2; ++kg) {
        const uint32_t lo = (d.start + p * d.lbo + kg * d.sbo) & ~127u;
        out->push_back({lo, lo + 1024});
      }
  }
}

// Records the reads of a wgmma being issued (first thread of the warpgroup only); returns its id.
inline uint64_t record_reads(const std::vector<std::pair<uint32_t, uint32_t>>& rows) {
  BlockState& b = block();
  const uint64_t id = ++b.next_id;
  if (emu::thread_idx.x % 128 == 0)
    for (const auto& [lo, hi] : rows) b.inflight.push_back({id, lo, hi, emu::thread_idx.x / 128});
  return id;
}

inline void retire_reads(uint64_t id) {
  auto& v = block().inflight;
  v.erase(std::remove_if(v.begin(), v.end(), [id](const InFlightRead& r) { return r.id == id; }), v.end());
}

inline void check_tma_write(uint32_t lo, uint32_t hi) {
  for (const InFlightRead& r : block().inflight)
    if (r.lo < hi && lo < r.hi)
      emu::fail("cp.async.bulk.tensor: writes shared memory [" + std::to_string(lo) + ", " + std::to_string(hi) +
                ") that an unretired wgmma of warpgroup " + std::to_string(r.wg) + " still reads ([" +
                std::to_string(r.lo) + ", " + std::to_string(r.hi) + ")): a stage refilled before its consumers "
                "released it");
}

// Accumulator registers must not be touched by ordinary code between a wgmma's issue and its retirement:
// the first pending wgmma on an accumulator array snapshots it and compares at retirement.
struct AccGuard {
  const float* d = nullptr;
  std::vector<float> snapshot;  // empty: not the first pending wgmma on d
};

inline AccGuard guard_acc(const float* d, int n) {
  AccGuard g;
  g.d = d;
  if (thread().pending_acc[d]++ == 0) g.snapshot.assign(d, d + n);
  return g;
}

inline void check_acc(const AccGuard& g, int n) {
  if (!g.snapshot.empty() && std::memcmp(g.snapshot.data(), g.d, n * sizeof(float)) != 0)
    emu::fail("wgmma: accumulator registers written by ordinary code while an async wgmma on them was in flight "
              "(before the wgmma.wait_group that retires it)");
  if (--thread().pending_acc[g.d] == 0) thread().pending_acc.erase(g.d);
}

template <typename T>
inline float load_elem(uint32_t addr) {
  T v;
  std::memcpy(static_cast<void*>(&v), smem_ptr(addr, sizeof(T), "wgmma operand"), sizeof(T));
  return l2vf::detail::to_float(v);
}

template <typename T>
inline float half_of(uint32_t reg, int hi) {
  const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu);
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, 2);
  return l2vf::detail::to_float(v);
}

inline void issue_checks(const char* what) {
  if (emu::block_dim.x % 128 != 0) emu::fail(std::string(what) + ": the block is not made of whole warpgroups");
  if (!thread().fenced) emu::fail(std::string(what) + ": issued without a wgmma.fence since the last wait_group");
  emu::wait_at(emu::kWaitWarp);  // the warp is converged (.sync.aligned)
}

// Accumulator element e of a thread (m64nN, f32): row, column.
inline void acc_coords(int e, uint32_t* row, uint32_t* col) {
  const uint32_t t = emu::thread_idx.x % 128, w = t / 32, l = t % 32;
  const uint32_t c = e / 4, r = e % 4;
  *row = 16 * w + l / 4 + ((r & 2) ? 8 : 0);
  *col = 8 * c + 2 * (l % 4) + (r & 1);
}

// d[e] = (scale_d ? d[e] : 0) + sum_k a(row(e), k) b(k, col(e)).
template <int N>
inline void mma_rows(float* d, const float (&a)[2][16], const Desc& db, bool b_k_major, int scale_d,
                     float (*load_b)(uint32_t)) {
  for (int e = 0; e < N / 2; ++e) {
    uint32_t row, col;
    acc_coords(e, &row, &col);
    const int i = (row % 16) >= 8 ? 1 : 0;
    float acc = scale_d ? d[e] : 0.f;
    for (uint32_t k = 0; k < 16; ++k) acc = std::fma(a[i][k], load_b(operand_addr(db, col, k, b_k_major)), acc);
    d[e] = acc;
  }
}

}  // namespace emu_detail

inline uint8_t* dynamic_smem() {
  if (emu::dynamic_smem_bytes == 0) emu::fail("dynamic_smem: the kernel was launched without dynamic shared memory");
  return emu::smem_window() + emu::kDynamicSmemOffset;
}

inline uint32_t smem_addr(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p), w = reinterpret_cast<uintptr_t>(emu::smem_window());
  if (a < w || a >= w + emu::kSmemWindowBytes) emu::fail("smem_addr: not a shared-memory pointer");
  return static_cast<uint32_t>(a - w);
}

inline void spin_pause() { emu::spin_yield(); }

inline void mbarrier_init(uint32_t bar, uint32_t arrivals) {
  if (bar % 8 != 0) emu::fail("mbarrier.init: address not 8-byte aligned");
  emu_detail::smem_ptr(bar, 8, "mbarrier.init");
  if (arrivals == 0) emu::fail("mbarrier.init: zero arrivals");
  emu_detail::Mbarrier b;
  b.expected = b.pending = arrivals;
  emu_detail::block().bars[bar] = b;
  emu::note_progress();
}

inline void fence_barrier_init() {}

// Ordinary stores are immediate here; an unretired wgmma still reading the bytes would see them change.
inline void st_shared_zero16(uint32_t addr) {
  if (addr % 16 != 0) emu::fail("st.shared.v4: address not 16-byte aligned");
  unsigned char* p = emu_detail::smem_ptr(addr, 16, "st.shared.v4");
  for (const emu_detail::InFlightRead& r : emu_detail::block().inflight)
    if (r.lo < addr + 16 && addr < r.hi)
      emu::fail("st.shared.v4: writes shared memory that an unretired wgmma of warpgroup " + std::to_string(r.wg) +
                " still reads");
  std::memset(p, 0, 16);
}

inline void fence_proxy_async() {}

inline void mbarrier_arrive(uint32_t bar) {
  emu_detail::Mbarrier& b = emu_detail::bar_at(bar, "mbarrier.arrive");
  if (b.pending == 0) emu::fail("mbarrier.arrive: more arrivals than expected in this phase");
  --b.pending;
  emu_detail::maybe_complete(b);
  emu::note_progress();
}

// setmaxnreg: no register file to resize; checks the count, the warp's convergence (.sync.aligned) and,
// at the block's end, that each warpgroup executed the same sequence (emu_detail::install_hooks).
inline void setmaxnreg_record(uint32_t n) {
  emu_detail::thread().maxnreg.push_back(n);
  emu::wait_at(emu::kWaitWarp);
}
template <int N>
inline void setmaxnreg_inc() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
  setmaxnreg_record(N);
}
template <int N>
inline void setmaxnreg_dec() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
  setmaxnreg_record(N);
}

inline void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t tx_bytes) {
  emu_detail::Mbarrier& b = emu_detail::bar_at(bar, "mbarrier.arrive.expect_tx");
  if (b.pending == 0) emu::fail("mbarrier.arrive: more arrivals than expected in this phase");
  b.tx += tx_bytes;
  --b.pending;
  emu_detail::maybe_complete(b);
  emu::note_progress();
}

inline bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
  if (parity > 1) emu::fail("mbarrier.try_wait.parity: parity must be 0 or 1");
  return (emu_detail::bar_at(bar, "mbarrier.try_wait").phase & 1u) != parity;
}

inline void prefetch_tensor_map(const CUtensorMap* map) {
  emu_detail::TensorMap m;
  std::memcpy(&m, map, sizeof(m));
  if (m.magic != emu_detail::kMapMagic) emu::fail("prefetch.tensormap: not an encoded tensor map");
}

inline void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2) {
  emu_detail::TensorMap m;
  std::memcpy(&m, map, sizeof(m));
  if (m.magic != emu_detail::kMapMagic) emu::fail("cp.async.bulk.tensor: not an encoded tensor map");
  if (dst % 1024 != 0) emu::fail("cp.async.bulk.tensor: SWIZZLE_128B destination not 1024-byte aligned");
  emu_detail::bar_at(bar, "cp.async.bulk.tensor");
  const uint32_t es = m.elem_bytes, row_bytes = m.box[0] * es;
  const uint32_t bytes = row_bytes * m.box[1] * m.box[2];
  unsigned char* smem = emu_detail::smem_ptr(dst, bytes, "cp.async.bulk.tensor destination");
  (void)smem;
  emu_detail::check_tma_write(dst, dst + bytes);
  for (uint32_t z = 0; z < m.box[2]; ++z)
    for (uint32_t y = 0; y < m.box[1]; ++y)
      for (uint32_t x = 0; x < m.box[0]; ++x) {
        const int64_t g0 = int64_t{c0} + x, g1 = int64_t{c1} + y, g2 = int64_t{c2} + z;
        const uint32_t off = ((z * m.box[1] + y) * m.box[0] + x) * es;
        unsigned char* out = emu::smem_window() + emu_detail::swizzle128(dst + off);
        const bool inside = g0 >= 0 && g1 >= 0 && g2 >= 0 && uint64_t(g0) < m.dims[0] && uint64_t(g1) < m.dims[1] &&
                            uint64_t(g2) < m.dims[2];
        if (!inside) {
          std::memset(out, 0, es);
          continue;
        }
        const unsigned char* src = m.base + g0 * es + g1 * m.strides[0] + g2 * m.strides[1];
        emu::check_access(src, es, "cp.async.bulk.tensor");
        std::memcpy(out, src, es);
      }
  emu_detail::complete_tx(bar, bytes);
}

inline void wgmma_fence() { emu_detail::thread().fenced = true; }

inline void wgmma_commit() {
  emu_detail::ThreadState& t = emu_detail::thread();
  t.committed.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

template <int N>
inline void wgmma_wait() {
  emu_detail::ThreadState& t = emu_detail::thread();
  while (t.committed.size() > static_cast<size_t>(N)) {
    for (auto& op : t.committed.front()) op();
    t.committed.pop_front();
  }
  t.fenced = false;
}

inline void fence_operand(float&) {}
inline void fence_operand(uint32_t&) {}

template <typename T>
inline void wgmma_ss_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  emu_detail::issue_checks("wgmma.mma_async (SS)");
  const emu_detail::Desc da = emu_detail::decode_desc(desc_a), db = emu_detail::decode_desc(desc_b);
  const uint32_t t = emu::thread_idx.x % 128, w = t / 32, l = t % 32;
  std::vector<std::pair<uint32_t, uint32_t>> rows;
  emu_detail::operand_rows(da, 64, true, &rows);
  emu_detail::operand_rows(db, 128, true, &rows);
  const uint64_t id = emu_detail::record_reads(rows);
  const emu_detail::AccGuard guard = emu_detail::guard_acc(d, 64);
  emu_detail::thread().uncommitted.push_back([&d, da, db, scale_d, w, l, id, guard] {
    emu_detail::check_acc(guard, 64);
    emu_detail::retire_reads(id);
    float a[2][16];
    for (int i = 0; i < 2; ++i)
      for (uint32_t k = 0; k < 16; ++k)
        a[i][k] = emu_detail::load_elem<T>(emu_detail::operand_addr(da, 16 * w + l / 4 + 8 * i, k, true));
    emu_detail::mma_rows<128>(d, a, db, true, scale_d, &emu_detail::load_elem<T>);
  });
}

template <typename T, int N>
inline void wgmma_rs_tb(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  static_assert(N == 64 || N == 128, "m64n64k16 / m64n128k16");
  emu_detail::issue_checks("wgmma.mma_async (RS)");
  // The warp's A fragments: two exchanges of 64 bits per lane (registers 0,1 then 2,3). Each exchange
  // row is read right after its own barrier: the double buffering only protects a row until the lane's
  // next collective but one (a shuffle right after this issue would overwrite row01 otherwise).
  const uint32_t l = emu::lane(), g = l / 4;
  uint64_t quad01[4], quad23[4];
  uint64_t* row01 = emu::exchange_row();
  row01[l] = uint64_t{a[0]} | (uint64_t{a[1]} << 32);
  emu::wait_at(emu::kWaitWarp);
  for (uint32_t q = 0; q < 4; ++q) quad01[q] = row01[4 * g + q];
  uint64_t* row23 = emu::exchange_row();
  row23[l] = uint64_t{a[2]} | (uint64_t{a[3]} << 32);
  emu::wait_at(emu::kWaitWarp);
  for (uint32_t q = 0; q < 4; ++q) quad23[q] = row23[4 * g + q];
  float av[2][16];
  for (uint32_t q = 0; q < 4; ++q) {  // lane 4g + q holds k = 2q, 2q+1 (regs 0/1) and 8 + 2q, 8 + 2q + 1 (regs 2/3)
    const uint64_t lo = quad01[q], hi = quad23[q];
    const uint32_t r0 = static_cast<uint32_t>(lo), r1 = static_cast<uint32_t>(lo >> 32);
    const uint32_t r2 = static_cast<uint32_t>(hi), r3 = static_cast<uint32_t>(hi >> 32);
    for (int e = 0; e < 2; ++e) {
      av[0][2 * q + e] = emu_detail::half_of<T>(r0, e);
      av[1][2 * q + e] = emu_detail::half_of<T>(r1, e);
      av[0][8 + 2 * q + e] = emu_detail::half_of<T>(r2, e);
      av[1][8 + 2 * q + e] = emu_detail::half_of<T>(r3, e);
    }
  }
  const emu_detail::Desc db = emu_detail::decode_desc(desc_b);
  std::vector<std::pair<uint32_t, uint32_t>> rows;
  emu_detail::operand_rows(db, N, false, &rows);
  const uint64_t id = emu_detail::record_reads(rows);
  const emu_detail::AccGuard guard = emu_detail::guard_acc(d, N / 2);
  // The A fragment registers are read asynchronously too: they must hold the same values at retirement.
  const uint32_t* a_regs = a;
  const std::array<uint32_t, 4> a_issued = {a[0], a[1], a[2], a[3]};
  emu_detail::thread().uncommitted.push_back([&d, av, db, scale_d, id, guard, a_regs, a_issued] {
    emu_detail::check_acc(guard, N / 2);
    if (std::memcmp(a_regs, a_issued.data(), sizeof(a_issued)) != 0)
      emu::fail("wgmma (RS): A fragment registers overwritten before the wgmma reading them was retired");
    emu_detail::retire_reads(id);
    emu_detail::mma_rows<N>(d, av, db, false, scale_d, &emu_detail::load_elem<T>);
  });
}

inline float ex2(float x) { return std::exp2(x); }
inline float tanh_approx(float x) { return std::tanh(x); }

// ---- host -----------------------------------------------------------------------------------------
// The emulated device: compute capability L2VF_EMU_CC (e.g. "80"), default 90.
inline cudaError_t device_capability(int* major, int* minor) {
  const char* cc = std::getenv("L2VF_EMU_CC");
  const int v = cc ? std::atoi(cc) : 90;
  *major = v / 10;
  *minor = v % 10;
  return cudaSuccess;
}

template <typename Kernel>
inline cudaError_t set_max_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes < 0 || bytes > 227 * 1024) return cudaErrorInvalidValue;  // sm_90: 227 KB per block
  auto& limits = emu::smem_limits();
  for (auto& [k, b] : limits)
    if (k == reinterpret_cast<const void*>(kernel)) {
      b = static_cast<size_t>(bytes);
      return cudaSuccess;
    }
  limits.emplace_back(reinterpret_cast<const void*>(kernel), static_cast<size_t>(bytes));
  return cudaSuccess;
}

// The checks cuTensorMapEncodeTiled makes for this use (3-D, SWIZZLE_128B, element strides 1).
inline cudaError_t encode_tensor_map_3d(CUtensorMap* map, DType dtype, const void* base, const uint64_t dims[3],
                                        const uint64_t strides_bytes[2], const uint32_t box[3]) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  const uint32_t es = 2;
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return cudaErrorInvalidValue;
  for (int i = 0; i < 3; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t{1} << 32)) return cudaErrorInvalidValue;
    if (box[i] == 0 || box[i] > 256) return cudaErrorInvalidValue;
  }
  for (int i = 0; i < 2; ++i)
    if (strides_bytes[i] % 16 != 0 || strides_bytes[i] >= (uint64_t{1} << 40)) return cudaErrorInvalidValue;
  if ((box[0] * es) % 16 != 0 || box[0] * es > 128) return cudaErrorInvalidValue;  // SWIZZLE_128B: inner box <= 128 B
  emu_detail::TensorMap m{};
  m.magic = emu_detail::kMapMagic;
  m.base = static_cast<const unsigned char*>(base);
  for (int i = 0; i < 3; ++i) {
    m.dims[i] = dims[i];
    m.box[i] = box[i];
  }
  m.strides[0] = strides_bytes[0];
  m.strides[1] = strides_bytes[1];
  m.elem_bytes = es;
  std::memset(map, 0, sizeof(*map));
  std::memcpy(map, &m, sizeof(m));
  return cudaSuccess;
}

}  // namespace hopper
}  // namespace l2vf
