// f32 matmul y[M, N] = x[M, K] . w[K, N] as an XLA FFI custom call, reading one layer of weights stacked
// [L, K, N] in place (XLA copies a dynamic slice of the stack before its dot: 14 MB per layer of SmolLM2, ~20% of
// a batched decode step). Register-blocked: an MR x (NV vectors) tile of y lives in registers while k runs over
// all of K; each k broadcasts MR activations and loads NV vectors of w's row k (rows N apart, read in place).
// Threads take (row block, column panel) chunks from XLA's own pool. AVX-512 where the CPU has it (picked at run
// time), else AVX2: one template over a vector type.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace jaxserve_cpu {
namespace {

// One MR x (NV * lanes) tile of y (rows N apart) over k in [k0, k1) (x rows are K long, w's ldw apart): y = the sum
// when k0 == 0, else y += it. TAIL: the panel runs past N (masked loads and stores). PREF: prefetch w ahead.
// The first row tile of a panel reads w from memory, one 256-byte row per k, each N floats from the last: too
// far apart for the hardware prefetcher, so it prefetches kAhead rows ahead (the later tiles find them in L2).
// Measured on 30 layers of SmolLM2's projections from memory: -13% at 64 rows, -15% at 8, -5% at 512.
constexpr int64_t kAhead = 32;
template <class V, int MR, int NV, bool TAIL, bool PREF = false>
inline __attribute__((always_inline)) void tile(const float* x, int64_t K, int64_t k0, int64_t k1, const float* w,
                                                int64_t ldw, int64_t N, float* y, const typename V::Mask* masks) {
  typename V::T acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) {
      if (k0 == 0) acc[i][j] = V::zero();
      else acc[i][j] = TAIL ? V::load(y + i * N + j * V::kLanes, masks[j]) : V::load(y + i * N + j * V::kLanes);
    }
  for (int64_t k = k0; k < k1; ++k) {
    const float* wk = w + k * ldw;
    if (PREF)
      for (int j = 0; j < NV; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(wk + kAhead * ldw + j * V::kLanes), _MM_HINT_T0);
    typename V::T b[NV];
    for (int j = 0; j < NV; ++j) b[j] = TAIL ? V::load(wk + j * V::kLanes, masks[j]) : V::load(wk + j * V::kLanes);
    for (int i = 0; i < MR; ++i) {
      const typename V::T a = V::set1(x[i * K + k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = V::fma(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) {
      if (TAIL) V::store(y + i * N + j * V::kLanes, acc[i][j], masks[j]);
      else V::store(y + i * N + j * V::kLanes, acc[i][j]);
    }
}

// Rows [m0, m1) x columns [n0, n0 + NV * lanes) (clipped at N), in tiles of MR rows (then the leftover rows);
// K in blocks of kKc so the panel's slice of w (kKc x 256 bytes) stays in L2 while the row tiles reuse it.
// wp: the panel's first column of w (row k at wp + k * ldw).
constexpr int64_t kKc = 512;
template <class V, int MR, int NV, bool TAIL>
inline __attribute__((always_inline)) void panel(const float* x, const float* wp, int64_t ldw, int64_t K,
                                                 int64_t N, float* y, int64_t m0, int64_t m1, int64_t n0) {
  typename V::Mask masks[NV];
  for (int j = 0; j < NV; ++j) masks[j] = V::mask(N - n0 - j * V::kLanes);
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t k1 = std::min(K, k0 + kKc);
    int64_t m = m0;
    if (m + MR <= m1) {
      tile<V, MR, NV, TAIL, true>(x + m * K, K, k0, k1, wp, ldw, N, y + m * N + n0, masks);
      m += MR;
    }
    for (; m + MR <= m1; m += MR) tile<V, MR, NV, TAIL>(x + m * K, K, k0, k1, wp, ldw, N, y + m * N + n0, masks);
    const float* xm = x + m * K;
    float* ym = y + m * N + n0;
    switch (m1 - m) {  // MR <= 6
      case 5: if constexpr (MR > 5) tile<V, 5, NV, TAIL>(xm, K, k0, k1, wp, ldw, N, ym, masks); break;
      case 4: if constexpr (MR > 4) tile<V, 4, NV, TAIL>(xm, K, k0, k1, wp, ldw, N, ym, masks); break;
      case 3: if constexpr (MR > 3) tile<V, 3, NV, TAIL>(xm, K, k0, k1, wp, ldw, N, ym, masks); break;
      case 2: if constexpr (MR > 2) tile<V, 2, NV, TAIL>(xm, K, k0, k1, wp, ldw, N, ym, masks); break;
      case 1: if constexpr (MR > 1) tile<V, 1, NV, TAIL>(xm, K, k0, k1, wp, ldw, N, ym, masks); break;
      default: break;
    }
  }
}

template <class V, int MR, int NV>
inline __attribute__((always_inline)) void chunk(const float* x, const float* wp, int64_t ldw, int64_t K,
                                                 int64_t N, float* y, int64_t m0, int64_t m1, int64_t n0) {
  if (n0 + NV * V::kLanes <= N) panel<V, MR, NV, false>(x, wp, ldw, K, N, y, m0, m1, n0);
  else panel<V, MR, NV, true>(x, wp, ldw, K, N, y, m0, m1, n0);
}

// Few rows (decode): wide panels, every row in one tile. Many rows: 6 x 4 vectors (24 accumulators).
constexpr int kSmallM = 2;
template <class V>
constexpr int64_t panel_width(int64_t M) { return (M <= kSmallM ? 8 : 4) * V::kLanes; }

template <class V>
inline __attribute__((always_inline)) void run_chunk(const float* x, const float* wp, int64_t ldw, int64_t K,
                                                     int64_t N, float* y, int64_t M, int64_t m0, int64_t m1,
                                                     int64_t n0) {
  if (M <= kSmallM) chunk<V, kSmallM, 8>(x, wp, ldw, K, N, y, m0, m1, n0);
  else if constexpr (V::kLanes == 16) chunk<V, 6, 4>(x, wp, ldw, K, N, y, m0, m1, n0);
  else chunk<V, 3, 4>(x, wp, ldw, K, N, y, m0, m1, n0);  // AVX2: 16 registers
}

JAXSERVE_AVX512 void run_chunk512(const float* x, const float* wp, int64_t ldw, int64_t K, int64_t N, float* y,
                                  int64_t M, int64_t m0, int64_t m1, int64_t n0) {
  run_chunk<V512>(x, wp, ldw, K, N, y, M, m0, m1, n0);
}

void run_chunk256(const float* x, const float* wp, int64_t ldw, int64_t K, int64_t N, float* y, int64_t M,
                  int64_t m0, int64_t m1, int64_t n0) {
  run_chunk<V256>(x, wp, ldw, K, N, y, M, m0, m1, n0);
}

// One weight of a call: this layer's [K, N] and where its output goes.
struct Job {
  const float* w;
  float* y;
  int64_t N;
};

ffi::Error weight_job(int64_t K, ffi::Buffer<ffi::F32> w, int64_t l, float* y, Job& job) {
  auto wd = w.dimensions();
  if (wd.size() != 2 && wd.size() != 3) return ffi::Error::InvalidArgument("matmul_f32: w must be [(L,) K, N]");
  const bool stacked = wd.size() == 3;
  const int64_t L = stacked ? wd[0] : 1, N = wd[wd.size() - 1];
  if (wd[wd.size() - 2] != K)
    return ffi::Error::InvalidArgument("matmul_f32: x [M, K] and w [(L,) K, N] disagree on K");
  if (!stacked) l = 0;
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("matmul_f32: layer index out of range");
  job = {w.typed_data() + l * K * N, y, N};
  return ffi::Error::Success();
}

// y_j = x . w_j for every job, in (row block, run of column panels) chunks over XLA's pool, the panels of all
// jobs together. Runs of contiguous panels, ~4 per thread: each thread streams its stretch of w's columns in
// order. Row blocks of up to 96 (16 tiles of 6) keep a block of x in L2 while a panel of w is reused over its
// rows; smaller (whole tiles) where there are too few panels to give every thread ~4 chunks.
ffi::Error run_jobs(ffi::ThreadPool& pool, const float* xp, int64_t M, int64_t K, const std::vector<Job>& jobs,
                    int64_t isa) {
  const bool wide = use_avx512(isa);
  const int64_t pw = wide ? panel_width<V512>(M) : panel_width<V256>(M);
  int64_t sum_n = 0, panels = 0;
  std::vector<int64_t> counts;  // panels per job
  for (const Job& job : jobs) sum_n += job.N, panels += counts.emplace_back((job.N + pw - 1) / pw);
  if (M == 0 || sum_n == 0) return ffi::Error::Success();
  if (K == 0) {  // an empty sum: the tiles would never write y
    for (const Job& job : jobs) std::fill(job.y, job.y + M * job.N, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t threads = M * sum_n * K < (int64_t(1) << 17) ? 1 : std::max<int64_t>(1, pool.num_threads());
  const std::vector<Piece> pieces = runs_of(counts, std::max<int64_t>(1, panels / (4 * threads)));
  const int64_t np = int64_t(pieces.size());
  int64_t mb = M <= kSmallM ? M : 96;
  if (M > kSmallM && threads > 1 && np * ((M + mb - 1) / mb) < 4 * threads) {
    const int64_t want = (4 * threads + np - 1) / np;
    mb = std::max<int64_t>(6, ((M + want - 1) / want + 5) / 6 * 6);
  }
  const int64_t blocks = (M + mb - 1) / mb;
  const Piece* pp = pieces.data();
  const Job* jp = jobs.data();
  parallel_chunks(pool, np * blocks, threads, [=](int64_t c) {
    const Piece& piece = pp[c % np];
    const Job& job = jp[piece.j];
    const int64_t m0 = (c / np) * mb, m1 = std::min(M, m0 + mb);
    for (int64_t p = piece.i0; p < piece.i1; ++p) {
      const int64_t n0 = p * pw;
      if (wide) run_chunk512(xp, job.w + n0, job.N, K, job.N, job.y, M, m0, m1, n0);
      else run_chunk256(xp, job.w + n0, job.N, K, job.N, job.y, M, m0, m1, n0);
    }
  });
  return ffi::Error::Success();
}

// y[M, N] = x[M, K] . w[N, K]^T for few rows (the LM head over a tied embedding [V, E], sampled rows only): each
// row of w (one vocabulary entry, K floats contiguous) is read once, for every row of x at once: MR x 2
// accumulators of K-vectors, reduced to 2 * MR dot products. x (at most 8 rows of K here) stays in L1; w streams
// from memory once, so a step that samples 5 or 9 rows (one stream verifying 4 or 8 speculated tokens) costs
// about one.
template <class V, int MR>
inline __attribute__((always_inline)) void nt_rows(const float* x, const float* w, int64_t K, int64_t N,
                                                   float* y, int64_t n0, int64_t n1) {
  const int64_t kv = K / V::kLanes * V::kLanes;
  const typename V::Mask tail = V::mask(K - kv);
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    const float* w0 = w + n * K;
    const float* w1 = w0 + K;
    typename V::T a0[MR], a1[MR];
    for (int i = 0; i < MR; ++i) a0[i] = a1[i] = V::zero();
    for (int64_t k = 0; k < kv; k += V::kLanes) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + k + 8 * K), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + k + 8 * K), _MM_HINT_T0);
      const typename V::T b0 = V::load(w0 + k), b1 = V::load(w1 + k);
      for (int i = 0; i < MR; ++i) {
        const typename V::T xi = V::load(x + i * K + k);
        a0[i] = V::fma(xi, b0, a0[i]);
        a1[i] = V::fma(xi, b1, a1[i]);
      }
    }
    if (kv < K) {
      const typename V::T b0 = V::load(w0 + kv, tail), b1 = V::load(w1 + kv, tail);
      for (int i = 0; i < MR; ++i) {
        const typename V::T xi = V::load(x + i * K + kv, tail);
        a0[i] = V::fma(xi, b0, a0[i]);
        a1[i] = V::fma(xi, b1, a1[i]);
      }
    }
    for (int i = 0; i < MR; ++i) y[i * N + n] = V::reduce(a0[i]), y[i * N + n + 1] = V::reduce(a1[i]);
  }
  for (; n < n1; ++n) {  // an odd last row
    const float* w0 = w + n * K;
    for (int i = 0; i < MR; ++i) {
      typename V::T a = V::zero();
      for (int64_t k = 0; k < kv; k += V::kLanes) a = V::fma(V::load(x + i * K + k), V::load(w0 + k), a);
      if (kv < K) a = V::fma(V::load(x + i * K + kv, tail), V::load(w0 + kv, tail), a);
      y[i * N + n] = V::reduce(a);
    }
  }
}

template <class V>
inline __attribute__((always_inline)) void nt_group(const float* x, const float* w, int64_t M, int64_t K,
                                                    int64_t N, float* y, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: nt_rows<V, 1>(x, w, K, N, y, n0, n1); break;
    case 2: nt_rows<V, 2>(x, w, K, N, y, n0, n1); break;
    case 3: nt_rows<V, 3>(x, w, K, N, y, n0, n1); break;
    case 4: nt_rows<V, 4>(x, w, K, N, y, n0, n1); break;
    case 5: nt_rows<V, 5>(x, w, K, N, y, n0, n1); break;
    case 6: nt_rows<V, 6>(x, w, K, N, y, n0, n1); break;
    case 7: nt_rows<V, 7>(x, w, K, N, y, n0, n1); break;
    default: nt_rows<V, 8>(x, w, K, N, y, n0, n1); break;
  }
}

// Up to 8 rows of x in one pass over w[n0, n1). 9-16 rows: runs of kNtRun rows of w (18 KB of SmolLM2's head,
// in L1) take x's first 8 rows, then the rest, so w still streams from memory once. Every (row, n) is the same
// dot in the same order whatever M is: a row's logits are the same bits at 1 row as at 16.
constexpr int64_t kNtGroup = 8, kNtRun = 8;
template <class V>
inline __attribute__((always_inline)) void nt_chunk(const float* x, const float* w, int64_t M, int64_t K,
                                                    int64_t N, float* y, int64_t n0, int64_t n1) {
  if (M <= kNtGroup) return nt_group<V>(x, w, M, K, N, y, n0, n1);
  for (int64_t r0 = n0; r0 < n1; r0 += kNtRun) {
    const int64_t r1 = std::min(n1, r0 + kNtRun);
    nt_group<V>(x, w, kNtGroup, K, N, y, r0, r1);
    nt_group<V>(x + kNtGroup * K, w, M - kNtGroup, K, N, y + kNtGroup * N, r0, r1);
  }
}

JAXSERVE_AVX512 void nt_chunk512(const float* x, const float* w, int64_t M, int64_t K, int64_t N, float* y,
                                 int64_t n0, int64_t n1) {
  nt_chunk<V512>(x, w, M, K, N, y, n0, n1);
}

void nt_chunk256(const float* x, const float* w, int64_t M, int64_t K, int64_t N, float* y, int64_t n0,
                 int64_t n1) {
  nt_chunk<V256>(x, w, M, K, N, y, n0, n1);
}

constexpr int64_t kMaxNtRows = 2 * kNtGroup;

ffi::Error MatmulF32NT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t isa) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("matmul_f32_nt: need x [M, K] and w [N, K]");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (M > kMaxNtRows) return ffi::Error::InvalidArgument("matmul_f32_nt: at most 16 rows of x");
  if (M == 0 || N == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const bool wide = use_avx512(isa);
  const int64_t threads = N * K < (int64_t(1) << 16) ? 1 : std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(64, (N / (8 * threads) + 1) / 2 * 2);  // ~8 even chunks per thread
  const int64_t chunks = (N + chunk - 1) / chunk;
  parallel_chunks(pool, chunks, threads, [=](int64_t c) {
    const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
    if (wide) nt_chunk512(xp, wp, M, K, N, yp, n0, n1);
    else nt_chunk256(xp, wp, M, K, N, yp, n0, n1);
  });
  return ffi::Error::Success();
}

ffi::Error MatmulF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int64_t isa) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("matmul_f32: x must be [M, K]");
  std::vector<Job> jobs(1);
  if (auto err = weight_job(xd[1], w, layer.typed_data()[0], y->typed_data(), jobs[0]); !err.success()) return err;
  return run_jobs(pool, x.typed_data(), xd[0], xd[1], jobs, isa);
}

// Several weights of one x (q, k, v; gate, up): args x, layer, then the weights; one result per weight.
ffi::Error MatmulF32Multi(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                          ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t isa) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || args.size() != rets.size())
    return ffi::Error::InvalidArgument("matmul_f32_multi: x [M, K], layer, then one weight per result");
  std::vector<Job> jobs(rets.size());
  for (size_t j = 0; j < jobs.size(); ++j) {
    auto w = args.get<ffi::Buffer<ffi::F32>>(j);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(j);
    if (!w.has_value() || !y.has_value()) return ffi::Error::InvalidArgument("matmul_f32_multi: f32 buffers only");
    if (auto err = weight_job(xd[1], *w, layer.typed_data()[0], (*y)->typed_data(), jobs[j]); !err.success())
      return err;
  }
  return run_jobs(pool, x.typed_data(), xd[0], xd[1], jobs, isa);
}

}  // namespace
}  // namespace jaxserve_cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulF32, jaxserve_cpu::MatmulF32,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x [M, K]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // w [(L,) K, N]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // layer i32[]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulF32Multi, jaxserve_cpu::MatmulF32Multi,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x [M, K]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // layer i32[]
                                  .RemainingArgs()                         // the weights [(L,) K, N_j]
                                  .RemainingRets()                         // y_j [M, N_j]
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulF32NT, jaxserve_cpu::MatmulF32NT,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x [M, K], M <= 16
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // w [N, K]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // y [M, N] = x . w^T
                                  .Attr<int64_t>("isa"));
