// Shared helpers of jaxserve's CPU kernels: horizontal sums, a vector exp, and work split over XLA's own pool.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxserve_cpu {

namespace ffi = xla::ffi;

inline float hsum(__m256 a) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

inline float hmax(__m256 a) {
  __m128 lo = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// f32 vectors of 8 (AVX2) or 16 (AVX-512) lanes behind one interface, so a kernel is written once as a template
// and instantiated inside a function compiled for each target.
#define JAXSERVE_AVX512 __attribute__((target("avx512f")))

struct V256 {
  using T = __m256;
  using Mask = __m256i;
  static constexpr int kLanes = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static float reduce(T v) { return hsum(v); }
  static Mask mask(int64_t valid) {  // lanes [0, valid) on
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::max<int64_t>(0, std::min<int64_t>(valid, 8)))), idx);
  }
  static T load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, T v, Mask m) { _mm256_maskstore_ps(p, m, v); }
};

struct V512 {
  using T = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  JAXSERVE_AVX512 static T zero() { return _mm512_setzero_ps(); }
  JAXSERVE_AVX512 static T set1(float v) { return _mm512_set1_ps(v); }
  JAXSERVE_AVX512 static T load(const float* p) { return _mm512_loadu_ps(p); }
  JAXSERVE_AVX512 static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  JAXSERVE_AVX512 static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  JAXSERVE_AVX512 static float reduce(T v) { return _mm512_reduce_add_ps(v); }
  static Mask mask(int64_t valid) {
    return valid >= 16 ? Mask(0xFFFF) : valid <= 0 ? Mask(0) : Mask((1u << valid) - 1);
  }
  JAXSERVE_AVX512 static T load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  JAXSERVE_AVX512 static void store(float* p, T v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
};

// The AVX-512 paths, where the CPU has them: isa 0 = auto; 1 pins AVX2 (tests and benchmarks of the baseline).
inline bool use_avx512(int64_t isa) {
  static const bool has = __builtin_cpu_supports("avx512f");
  return isa == 0 && has;
}

// e^x (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp on [-87, 88]), 8 or 16 lanes.
// x <= -88 gives exactly 0 (so -inf scores vanish), x >= 88 saturates.
constexpr float kExpLo = -88.0f, kExpHi = 88.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(kExpLo);
  const __m256 zero_mask = _mm256_cmp_ps(x, lo, _CMP_GT_OQ);  // false for x <= -88 and NaN-free -inf
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(kExpHi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), zero_mask);
}

__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_GT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpLo)), _mm512_set1_ps(kExpHi));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(e));
}

// r[t] <- dword t of every r[c] (a 16 x 16 transpose of 32-bit elements).
__attribute__((target("avx512f"))) inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0 b0 a1 b1], [a2 b2 a3 b3]
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + j], 128-bit lane L: dword 4L + j of rows 4g .. 4g + 3
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // 4 x 4 transpose of 128-bit lanes: r[4L + j] lane g = u[4g + j] lane L
    const __m512i x0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), x1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(x0, y0, 0x88), r[4 + j] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(x1, y1, 0x88), r[12 + j] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// A piece of a matmul driver's work: items [i0, i1) (columns or panels) of job j (one weight of the call).
struct Piece {
  int64_t j, i0, i1;
};

// Items [0, counts[j]) of every job in contiguous runs of `run` (each job's last run shorter), job after job:
// a thread's piece streams one stretch of its weight in order.
inline std::vector<Piece> runs_of(const std::vector<int64_t>& counts, int64_t run) {
  std::vector<Piece> out;
  for (int64_t j = 0; j < int64_t(counts.size()); ++j)
    for (int64_t i = 0; i < counts[j]; i += run) out.push_back({j, i, std::min(counts[j], i + run)});
  return out;
}

// Chunks handed out by an atomic counter to the caller and to tasks on XLA's intra-op pool (ffi::ThreadPool), so
// there is never a second pool fighting XLA's. The state lives in a shared_ptr: a task that starts after the
// caller has finished every chunk finds nothing left and touches no freed memory.
struct ChunkCounter {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename F>
void parallel_chunks(ffi::ThreadPool& pool, int64_t num_chunks, int64_t threads, F body) {
  if (threads <= 1 || num_chunks <= 1) {
    for (int64_t c = 0; c < num_chunks; ++c) body(c);
    return;
  }
  auto st = std::make_shared<ChunkCounter>();
  auto run = [st, num_chunks, body]() {
    for (int64_t c; (c = st->next.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      body(c);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, num_chunks); ++t) pool.Schedule([run] { run(); });
  run();
  for (int spins = 0; st->done.load(std::memory_order_acquire) < num_chunks; ++spins) {
    if (spins < 4096) _mm_pause(); else std::this_thread::yield();
  }
}

}  // namespace jaxserve_cpu
