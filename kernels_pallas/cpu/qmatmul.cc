// Quantized matmul for XLA:CPU (AVX2 + FMA + F16C; AVX-512 VNNI where the CPU has it), through XLA FFI.
//
//   y[M, N] = xq[M, K] . w[N, K]^T        w: int8 (W8A8) or 4-bit with a min (W4A8), blocks of 32 along K
//
// Activations are quantized on the fly, per row and per block of 32 (llama.cpp's Q8_0/Q8_1 activations):
//   d = amax * (1 / 127), q = round_half_even(x * (1 / d)), s = d * sum(q)      (s: for the 4-bit mins)
// and the reference (kernels_pallas/quantized_matmul.py) does the same f32 operations, so both see the same q.
//
// Per block b of 32 and weight group g(b) (group_size a multiple of 32):
//   int8:  y += dx[b] * dw[g] * sum_k xq * wq                     (wq in [-127, 127])
//   4-bit: y += dx[b] * dw[g] * sum_k xq * nib + mw[g] * s[b]     (value = nib * dw + mw, nib in [0, 15])
// The integer dot of 32 pairs is one _mm256_maddubs_epi16 (u8 x s8 -> pairs of i16) and one madd with ones:
// 4-bit nibbles are already unsigned; int8 uses llama.cpp's sign trick (|x| times w carrying x's sign).
//
// Weight layout (GGUF's, bit for bit): int8 values [N, K]; 4-bit values [N, K/2] where byte j of a block holds
// element j in its low nibble and element j + 16 in its high nibble. Scales and mins are f16 [N, K/group].
// Values may be stacked over layers ([L, N, ...]); `layer` (i32[]) then picks one without XLA copying a slice.
//
// Work is split over output rows in chunks handed out by an atomic counter to the caller and to tasks on
// XLA's own intra-op pool (ffi::ThreadPool), so there is never a second pool fighting XLA's.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxserve_cpu::hsum;
using jaxserve_cpu::parallel_chunks;
using jaxserve_cpu::Piece;
using jaxserve_cpu::runs_of;
using jaxserve_cpu::transpose16;
using jaxserve_cpu::use_avx512;
using jaxserve_cpu::V256;
using jaxserve_cpu::V512;

constexpr int64_t QK = 32;  // block of K sharing one activation scale
// GEMVs prefetch this far ahead of their weight stream (a tile's rows are interleaved streams, more than the
// hardware prefetcher keeps up with alone: 1.5-2x from memory here).
constexpr int64_t kPrefetch = 12288;

inline void prefetch(const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0); }

inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

// ---- activations ------------------------------------------------------------------------------------------

struct QuantizedActs {
  int8_t* q;    // [M, K] quantized values
  uint8_t* aq;  // [M, K] |q| (int8 path: the unsigned operand of maddubs)
  float* d;     // [M, K/32] scales
  float* s;     // [M, K/32] d * sum(q) (4-bit path: multiplies the weight mins)
  // 4-bit pair path (K/32 even): per pair of blocks (2p, 2p+1), the values in the order one 32-byte load of
  // the two blocks' weights unpacks to (see tile_pair), and 8-lane vectors of their scales.
  int8_t* qp;   // [M, K/64, 64]: x[2p][0:16] x[2p+1][0:16] | x[2p][16:32] x[2p+1][16:32]
  float* dv;    // [M, K/64, 8]: d[2p] x 4, d[2p+1] x 4
  float* sv;    // [M, K/64, 8]: s[2p] / 4 x 4, s[2p+1] / 4 x 4 (four lanes each sum back to s)
};

// The pair layout of one quantized row (from q, d, s of quantize_row).
void pair_layout(const int8_t* q, const float* d, const float* s, int64_t K, int8_t* qp, float* dv, float* sv) {
  for (int64_t p = 0; p < K / (2 * QK); ++p) {
    const int8_t* b0 = q + 2 * p * QK;
    const int8_t* b1 = b0 + QK;
    int8_t* o = qp + p * 2 * QK;
    std::memcpy(o, b0, 16), std::memcpy(o + 16, b1, 16), std::memcpy(o + 32, b0 + 16, 16);
    std::memcpy(o + 48, b1 + 16, 16);
    for (int l = 0; l < 4; ++l) {
      dv[p * 8 + l] = d[2 * p], dv[p * 8 + 4 + l] = d[2 * p + 1];
      sv[p * 8 + l] = 0.25f * s[2 * p], sv[p * 8 + 4 + l] = 0.25f * s[2 * p + 1];
    }
  }
}

// aq: |q| for the AVX2 int8 tile (its maddubs operand), or nullptr where no kernel reads it.
void quantize_row(const float* x, int64_t K, int8_t* q, uint8_t* aq, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
    __m256 v[4];
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4);
    const float db = amax * (1.0f / 127.0f);  // a product, as XLA computes the reference's amax / 127
    const float id = db > 0.0f ? 1.0f / db : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    __m256i qi[4];
    for (int i = 0; i < 4; ++i) {
      __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      qi[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    }
    // i32 x 32 -> i8 x 32 (packs interleave 128-bit lanes; the permute puts them back in order)
    __m256i p01 = _mm256_packs_epi32(qi[0], qi[1]);
    __m256i p23 = _mm256_packs_epi32(qi[2], qi[3]);
    __m256i p = _mm256_packs_epi16(p01, p23);
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), p);
    if (aq) _mm256_storeu_si256(reinterpret_cast<__m256i*>(aq + b * QK), _mm256_sign_epi8(p, p));
    __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    d[b] = db;
    s[b] = db * float(_mm_cvtsi128_si32(s4));
  }
}

// ---- weights ----------------------------------------------------------------------------------------------

struct Weights {
  const uint8_t* values;   // this layer's values: int8 [N, K] or packed 4-bit [N, K/2]
  const uint16_t* scales;  // f16 [N, G]
  const uint16_t* mins;    // f16 [N, G] (4-bit) or nullptr
  int64_t N, K, G;         // G = K / group_size
  bool four_bit;
};

// The 32 weights of block b of row n as bytes: signed values (int8) or nibbles 0..15 (4-bit).
inline __m256i load_block(const Weights& w, int64_t n, int64_t b) {
  if (w.four_bit) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.values + n * (w.K / 2) + b * 16));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(packed, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    return _mm256_set_m128i(hi, lo);
  }
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.values + n * w.K + b * QK));
}

// A chunk of output rows' scales and mins, converted from f16 once per call (not once per block and row).
struct ChunkScales {
  const float* d;   // [rows, G]
  const float* m;   // [rows, G] (4-bit) or nullptr
  bool pairs;       // 4-bit, groups of 32, an even number of blocks: tile_pair
  int64_t n0;       // first row of the chunk
};

// 4-bit weights, a pair of blocks at a time: one 32-byte load holds blocks 2p and 2p+1 (16 bytes each); its low
// nibbles are elements 0-15 of both blocks, its high nibbles elements 16-31, which is the order pair_layout put
// x in. Two maddubs, an add and one madd give 8 i32 lanes: 4 partial sums of block 2p, then 4 of block 2p+1, so
// one 8-lane scale vector (dx * dw per block, 4 lanes each) scales both, and the min term rides in the same
// accumulator (mins x s / 4 per lane). The two blocks' f16 scales (and mins) are adjacent (groups of 32): one
// 4-byte load, one cvtph and one permute make each 8-lane vector. About half the instructions of a block at a
// time.
inline __m256 pair_vector(const uint16_t* two_f16) {
  int32_t bits;
  std::memcpy(&bits, two_f16, sizeof(bits));
  const __m256 d2 = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
  return _mm256_permutevar8x32_ps(d2, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

template <int MR, int NR>
void tile_pair(const Weights& w, const QuantizedActs& a, const ChunkScales& cs, int64_t m0, int64_t n0, float* y,
               int64_t ldy) {
  const int64_t K = w.K, PB = K / (2 * QK);
  const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0f);
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t p = 0; p < PB; ++p) {
    __m256i lo[NR], hi[NR];
    __m256 dw[NR], mw[NR];
    for (int j = 0; j < NR; ++j) {
      const uint8_t* src = w.values + (n0 + j) * (K / 2) + p * 32;
      if (p % 2 == 0) prefetch(src);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      lo[j] = _mm256_and_si256(v, mask);
      hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      dw[j] = pair_vector(w.scales + (n0 + j) * w.G + 2 * p);
      mw[j] = pair_vector(w.mins + (n0 + j) * w.G + 2 * p);
    }
    for (int i = 0; i < MR; ++i) {
      const int64_t at = (m0 + i) * PB + p;
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qp + at * 64));
      const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qp + at * 64 + 32));
      const __m256 dx = _mm256_loadu_ps(a.dv + at * 8), sx = _mm256_loadu_ps(a.sv + at * 8);
      for (int j = 0; j < NR; ++j) {
        const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], xa), _mm256_maddubs_epi16(hi[j], xb));
        const __m256 pf = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc[i][j] = _mm256_fmadd_ps(pf, _mm256_mul_ps(dx, dw[j]), acc[i][j]);
        acc[i][j] = _mm256_fmadd_ps(mw[j], sx, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[(m0 + i) * ldy + n0 + j] = hsum(acc[i][j]);
}

// acc[i][j] (MR x NR tiles) over all blocks; FOUR: the weight layout, compile-time so each loop is branch-free.
// The 4-bit mins contribute sum_b min[g(b)] * s[b] per (row, column), accumulated beside the integer dots.
template <bool FOUR, int MR, int NR>
void tile(const Weights& w, const QuantizedActs& a, const ChunkScales& cs, int64_t m0, int64_t n0, float* y,
          int64_t ldy) {
  const int64_t K = w.K, B = K / QK, G = w.G, per_group = (K / G) / QK;
  const __m256i ones = _mm256_set1_epi16(1);
  const float *dw[NR], *mw[NR];
  for (int j = 0; j < NR; ++j) {
    dw[j] = cs.d + (n0 + j - cs.n0) * G;
    mw[j] = FOUR ? cs.m + (n0 + j - cs.n0) * G : nullptr;
  }
  __m256 acc[MR][NR];
  float msum[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps(), msum[i][j] = 0.0f;
  for (int64_t b = 0, g = 0, in_group = 0; b < B; ++b) {  // g = b / per_group, without a divide per block
    __m256i wb[NR];
    for (int j = 0; j < NR; ++j) {
      if (FOUR ? b % 4 == 0 : b % 2 == 0) prefetch(w.values + (n0 + j) * (FOUR ? K / 2 : K) + b * (FOUR ? 16 : QK));
      wb[j] = load_block(w, n0 + j, b);
    }
    for (int i = 0; i < MR; ++i) {
      const int64_t row = (m0 + i) * K + b * QK;
      const float dx = a.d[(m0 + i) * B + b];
      __m256i xu, xs;
      if (FOUR) {
        xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + row));
      } else {
        xu = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.aq + row));
        xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + row));
      }
      for (int j = 0; j < NR; ++j) {
        __m256i p16 = FOUR ? _mm256_maddubs_epi16(wb[j], xs)
                           : _mm256_maddubs_epi16(xu, _mm256_sign_epi8(wb[j], xs));
        __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc[i][j] = _mm256_fmadd_ps(p, _mm256_set1_ps(dx * dw[j][g]), acc[i][j]);
        if (FOUR) msum[i][j] += mw[j][g] * a.s[(m0 + i) * B + b];  // NR independent chains: latency hidden
      }
    }
    if (++in_group == per_group) in_group = 0, ++g;
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[(m0 + i) * ldy + n0 + j] = hsum(acc[i][j]) + msum[i][j];
}

template <bool FOUR, int NR>
void rows_block(const Weights& w, const QuantizedActs& a, const ChunkScales& cs, int64_t M, int64_t n0, float* y) {
  int64_t m = 0;
  if (FOUR && cs.pairs) {
    for (; m + 4 <= M; m += 4) tile_pair<4, NR>(w, a, cs, m, n0, y, w.N);
    for (; m + 2 <= M; m += 2) tile_pair<2, NR>(w, a, cs, m, n0, y, w.N);
    for (; m < M; ++m) tile_pair<1, NR>(w, a, cs, m, n0, y, w.N);
    return;
  }
  for (; m + 4 <= M; m += 4) tile<FOUR, 4, NR>(w, a, cs, m, n0, y, w.N);
  for (; m + 2 <= M; m += 2) tile<FOUR, 2, NR>(w, a, cs, m, n0, y, w.N);
  for (; m < M; ++m) tile<FOUR, 1, NR>(w, a, cs, m, n0, y, w.N);
}

// Output columns [n0, n1): NR = 4 weight rows at a time for few activation rows (GEMV: more independent
// accumulators), 2 for many (the 4 x 2 tile reuses each weight block over 4 rows).
template <bool FOUR>
void columns(const Weights& w, const QuantizedActs& a, int64_t M, int64_t n0, int64_t n1, float* y) {
  thread_local std::vector<float> conv;
  const int64_t rows = n1 - n0, G = w.G;
  const bool pairs = FOUR && a.qp != nullptr;
  conv.resize(size_t(2 * rows * G));
  if (!pairs)  // tile_pair converts its scales in registers
    for (int64_t r = 0; r < rows * G; ++r) {
      conv[r] = f16_to_f32(w.scales[n0 * G + r]);
      if (FOUR) conv[rows * G + r] = f16_to_f32(w.mins[n0 * G + r]);
    }
  const ChunkScales cs{conv.data(), FOUR ? conv.data() + rows * G : nullptr, pairs, n0};
  int64_t n = n0;
  if (M < 4) {
    for (; n + 4 <= n1; n += 4) rows_block<FOUR, 4>(w, a, cs, M, n, y);
  }
  for (; n + 2 <= n1; n += 2) rows_block<FOUR, 2>(w, a, cs, M, n, y);
  for (; n < n1; ++n) rows_block<FOUR, 1>(w, a, cs, M, n, y);
}

// ---- many rows: weights dequantized to f32 once per panel, then an FMA tile ---------------------------------
//
// Without VNNI an int8 dot costs maddubs + madd + cvt + fmadd per 32 products, more than the 4 FMAs of f32,
// so once a weight row is reused by enough activation rows it pays to dequantize it (into L1, once per call)
// and run f32: x is not quantized on this path (the reference does the same for M >= f32_min_rows). On CPUs with
// AVX-512 the tile runs 16 lanes wide (picked at run time; the `isa` attribute 1 pins the AVX2 tile).

inline void dequantize_row(const Weights& w, int64_t n, float* out) {
  const int64_t per_group = (w.K / w.G) / QK;
  for (int64_t b = 0; b < w.K / QK; ++b) {
    const int64_t g = per_group == 1 ? b : b / per_group;
    const __m256 d = _mm256_set1_ps(f16_to_f32(w.scales[n * w.G + g]));
    const __m256 m = _mm256_set1_ps(w.four_bit ? f16_to_f32(w.mins[n * w.G + g]) : 0.0f);
    const __m256i q = load_block(w, n, b);  // 32 bytes: signed (int8) or nibbles
    for (int i = 0; i < 4; ++i) {
      const __m128i part = i < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
      const __m128i eight = (i & 1) ? _mm_srli_si128(part, 8) : part;
      const __m256i wide = w.four_bit ? _mm256_cvtepu8_epi32(eight) : _mm256_cvtepi8_epi32(eight);
      _mm256_storeu_ps(out + b * QK + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), d, m));
    }
  }
}

// An MR x NR tile of y = x . wrows^T over all of K (a multiple of V's lanes), in V's vector width.
template <class V, int MR, int NR>
inline __attribute__((always_inline)) void tile_f32(const float* x, const float* wrows, int64_t K, int64_t m0,
                                                    int64_t n0, float* y, int64_t ldy) {
  typename V::T acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = V::zero();
  for (int64_t k = 0; k < K; k += V::kLanes) {
    typename V::T wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = V::load(wrows + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const typename V::T xv = V::load(x + (m0 + i) * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = V::fma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[(m0 + i) * ldy + n0 + j] = V::reduce(acc[i][j]);
}

template <class V, int NR>
inline __attribute__((always_inline)) void rows_f32(const float* x, const float* wrows, int64_t M, int64_t K,
                                                    int64_t n0, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_f32<V, 4, NR>(x, wrows, K, m, n0, y, ldy);
  for (; m + 2 <= M; m += 2) tile_f32<V, 2, NR>(x, wrows, K, m, n0, y, ldy);
  for (; m < M; ++m) tile_f32<V, 1, NR>(x, wrows, K, m, n0, y, ldy);
}

// The tile 16 lanes wide for CPUs with AVX-512 (chosen at run time; K is a multiple of 32), else 8.
template <int NR>
JAXSERVE_AVX512 void rows_f32_512(const float* x, const float* wrows, int64_t M, int64_t K, int64_t n0, float* y,
                                  int64_t ldy) {
  rows_f32<V512, NR>(x, wrows, M, K, n0, y, ldy);
}

template <int NR>
void rows_f32_256(const float* x, const float* wrows, int64_t M, int64_t K, int64_t n0, float* y, int64_t ldy) {
  rows_f32<V256, NR>(x, wrows, M, K, n0, y, ldy);
}

void columns_f32(const Weights& w, const float* x, int64_t M, int64_t n0, int64_t n1, float* y, bool wide) {
  thread_local std::vector<float> panel;  // 3 dequantized weight rows (18 KB at K = 1536: stays in L1)
  panel.resize(size_t(3 * w.K));
  int64_t n = n0;
  for (; n + 3 <= n1; n += 3) {
    for (int j = 0; j < 3; ++j) dequantize_row(w, n + j, panel.data() + j * w.K);
    if (wide) rows_f32_512<3>(x, panel.data(), M, w.K, n, y, w.N); else rows_f32_256<3>(x, panel.data(), M, w.K, n, y, w.N);
  }
  for (; n < n1; ++n) {
    dequantize_row(w, n, panel.data());
    if (wide) rows_f32_512<1>(x, panel.data(), M, w.K, n, y, w.N); else rows_f32_256<1>(x, panel.data(), M, w.K, n, y, w.N);
  }
}

// ---- many rows on CPUs with AVX-512 VNNI: 64 integer products per instruction -------------------------------
//
// vpdpbusd multiplies 4 u8 by 4 s8 bytes per 32-bit lane and adds them to the lane's i32, 16 lanes at once.
// Here a lane is an output column: each panel of 32 columns is repacked once per call (into L1/L2) as
// [K/4][32 lanes][4 bytes], the activation row's bytes are broadcast 4 at a time, and each block of 32 ends in one
// convert and one fma by dx[b] * dw[b]: activations stay quantized per block of 32 exactly as on the few-rows
// path, so both give the same numbers (up to f32 summation order) and the reference has one rule.
//   int8:  u8 operand = x_q + 128, s8 = the weights; each lane starts at -128 * (its block's weight sum)
//   4-bit: u8 operand = the nibbles, s8 = x_q; the min term adds mw[g] * s[b] per block
// The repacking (16 x 16 dword transposes) costs ~10% of the dots at 64 rows, and is why few rows run the
// row-dot GEMV below instead.

#define JAXSERVE_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
constexpr int64_t kPanel = 32;  // columns per panel: two vectors of 16 lanes
constexpr int64_t kPackAhead = 8;  // blocks: pack_panel's prefetch distance along each weight row
// Fewer rows: the GEMV kernels (no repacking). Measured here (30 layers of SmolLM2's projections, weights from
// memory): the GEMV beat the GEMM at 8 rows for both widths and at 12 for 4-bit; the GEMM won at 12 for int8.
constexpr int64_t kVnniMinRows4 = 16, kVnniMinRows8 = 12;

struct VnniPanel {
  uint8_t* w;     // [K/4][32][4] bytes (lane c: column n0 + c; zeros past N)
  float* dw;      // [B][32] each block's weight scale
  float* mw;      // [B][32] 4-bit mins, else unused
  int32_t* corr;  // [B][32] int8: -128 * the block's weight sum
};

// Blocks b and b + 1 (nb = 2) or b alone (nb = 1) of row n as 64 bytes in element order: int8 values, or nibbles.
JAXSERVE_VNNI inline __m512i row_bytes64(const Weights& w, int64_t n, int64_t b, int nb) {
  if (w.four_bit) {
    const uint8_t* src = w.values + n * (w.K / 2) + b * 16;
    const __m256i v = nb == 2 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                              : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    const __m256i mask = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // lo(b) lo(b+1) hi(b) hi(b+1)
    return _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));                // lo(b) hi(b) lo(b+1) hi(b+1)
  }
  const uint8_t* src = w.values + n * w.K + b * QK;
  return nb == 2 ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi8(__mmask64(0xFFFFFFFFull), src);
}

JAXSERVE_VNNI void pack_panel(const Weights& w, int64_t n0, const VnniPanel& p) {
  const int64_t B = w.K / QK, per_group = (w.K / w.G) / QK;
  for (int h = 0; h < 2; ++h) {
    for (int64_t b = 0; b < B; b += 2) {
      const int nb = b + 1 < B ? 2 : 1;
      __m512i r[16];
      for (int c = 0; c < 16; ++c) {
        const int64_t n = n0 + 16 * h + c;
        if (n < w.N) {  // 16 row streams at a time, more than the hardware prefetcher follows (-10% at 64 rows, int8)
          const int64_t rb = w.four_bit ? w.K / 2 : w.K, at = (b + kPackAhead) * (w.four_bit ? QK / 2 : QK);
          if (at < rb) _mm_prefetch(reinterpret_cast<const char*>(w.values + n * rb + at), _MM_HINT_T0);
        }
        r[c] = n < w.N ? row_bytes64(w, n, b, nb) : _mm512_setzero_si512();
      }
      transpose16(r);  // r[t]: bytes 4t .. 4t + 3 of the two blocks, for each of the 16 columns
      for (int t = 0; t < 8 * nb; ++t)
        _mm512_storeu_si512(p.w + ((b * 8 + t) * kPanel + 16 * h) * 4, r[t]);
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int c = 0; c < kPanel; ++c) {
      const int64_t n = n0 + c, g = b / per_group;
      p.dw[b * kPanel + c] = n < w.N ? f16_to_f32(w.scales[n * w.G + g]) : 0.0f;
      if (w.four_bit) p.mw[b * kPanel + c] = n < w.N ? f16_to_f32(w.mins[n * w.G + g]) : 0.0f;
    }
    if (!w.four_bit)
      for (int h = 0; h < 2; ++h) {
        __m512i sum = _mm512_setzero_si512();
        for (int t = 0; t < 8; ++t)
          sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1),
                                    _mm512_loadu_si512(p.w + ((b * 8 + t) * kPanel + 16 * h) * 4));
        _mm512_storeu_si512(p.corr + b * kPanel + 16 * h,
                            _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7)));
      }
  }
}

// Rows [m0, m0 + MR) x the panel's 32 columns (n0 ...), stored masked at N. xq: the u8 (int8) / s8 (4-bit) rows.
template <int MR, bool FOUR>
JAXSERVE_VNNI void vnni_tile(const VnniPanel& p, const uint8_t* xq, const float* xd, const float* xs, int64_t K,
                             int64_t m0, float* y, int64_t N, int64_t n0) {
  const int64_t B = K / QK;
  __m512 f[MR][2];
  for (int i = 0; i < MR; ++i) f[i][0] = f[i][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    __m512i acc[MR][2];
    const __m512i c0 = FOUR ? _mm512_setzero_si512() : _mm512_loadu_si512(p.corr + b * kPanel);
    const __m512i c1 = FOUR ? _mm512_setzero_si512() : _mm512_loadu_si512(p.corr + b * kPanel + 16);
    for (int i = 0; i < MR; ++i) acc[i][0] = c0, acc[i][1] = c1;
    const uint8_t* wb = p.w + b * 8 * kPanel * 4;
    const uint8_t* xb = xq + m0 * K + b * QK;
    for (int t = 0; t < 8; ++t) {
      const __m512i w0 = _mm512_loadu_si512(wb + t * 128), w1 = _mm512_loadu_si512(wb + t * 128 + 64);
      for (int i = 0; i < MR; ++i) {
        int32_t four;
        std::memcpy(&four, xb + i * K + 4 * t, sizeof(four));
        const __m512i xv = _mm512_set1_epi32(four);
        if (FOUR) {
          acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], w0, xv);
          acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], w1, xv);
        } else {
          acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], xv, w0);
          acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], xv, w1);
        }
      }
    }
    const __m512 d0 = _mm512_loadu_ps(p.dw + b * kPanel), d1 = _mm512_loadu_ps(p.dw + b * kPanel + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 sx = _mm512_set1_ps(xd[(m0 + i) * B + b]);
      f[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), _mm512_mul_ps(d0, sx), f[i][0]);
      f[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), _mm512_mul_ps(d1, sx), f[i][1]);
      if (FOUR) {
        const __m512 ss = _mm512_set1_ps(xs[(m0 + i) * B + b]);
        f[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(p.mw + b * kPanel), ss, f[i][0]);
        f[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(p.mw + b * kPanel + 16), ss, f[i][1]);
      }
    }
  }
  const int64_t valid = N - n0;
  if (valid >= 32 && N % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0) {
    // Streaming stores: y (the LM head's logits: 12 MB at 64 rows) is not read back by this call, and a normal
    // store would first read each line from memory.
    for (int i = 0; i < MR; ++i) {
      _mm512_stream_ps(y + (m0 + i) * N + n0, f[i][0]);
      _mm512_stream_ps(y + (m0 + i) * N + n0 + 16, f[i][1]);
    }
    return;
  }
  const __mmask16 k0 = valid >= 16 ? 0xFFFF : __mmask16((1u << valid) - 1);
  const __mmask16 k1 = valid >= 32 ? 0xFFFF : valid <= 16 ? 0 : __mmask16((1u << (valid - 16)) - 1);
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(y + (m0 + i) * N + n0, k0, f[i][0]);
    _mm512_mask_storeu_ps(y + (m0 + i) * N + n0 + 16, k1, f[i][1]);
  }
}

template <bool FOUR>
JAXSERVE_VNNI void vnni_rows(const VnniPanel& p, const uint8_t* xq, const float* xd, const float* xs, int64_t K,
                             int64_t m0, int64_t m1, float* y, int64_t N, int64_t n0) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) vnni_tile<4, FOUR>(p, xq, xd, xs, K, m, y, N, n0);
  for (; m + 2 <= m1; m += 2) vnni_tile<2, FOUR>(p, xq, xd, xs, K, m, y, N, n0);
  for (; m < m1; ++m) vnni_tile<1, FOUR>(p, xq, xd, xs, K, m, y, N, n0);
}

// Columns [n0, n0 + 32) for rows [m0, m1): repack the panel into this thread's scratch, then the tiles.
JAXSERVE_VNNI void vnni_chunk(const Weights& w, const uint8_t* xq, const float* xd, const float* xs, int64_t m0,
                              int64_t m1, int64_t n0, float* y) {
  const int64_t B = w.K / QK;
  thread_local std::vector<uint8_t> scratch;
  scratch.resize(size_t(w.K * kPanel + 3 * B * kPanel * 4 + 64));
  uint8_t* base = scratch.data();
  const VnniPanel p{base, reinterpret_cast<float*>(base + w.K * kPanel),
                    reinterpret_cast<float*>(base + w.K * kPanel) + B * kPanel,
                    reinterpret_cast<int32_t*>(base + w.K * kPanel) + 2 * B * kPanel};
  pack_panel(w, n0, p);
  if (w.four_bit) vnni_rows<true>(p, xq, xd, xs, w.K, m0, m1, y, w.N, n0);
  else vnni_rows<false>(p, xq, xd, xs, w.K, m0, m1, y, w.N, n0);
}

// ---- few rows on CPUs with AVX-512 VNNI: row dots, 64 bytes of weights per vpdpbusd -----------------------
//
// A GEMV streams each weight row once, so it must run at memory speed: ~7 bytes per cycle per core here. One
// 64-byte load of a row is a "group": 4 blocks of 4-bit (their low nibbles are elements 0-15 of each block, the
// high ones 16-31) or 2 blocks of int8. The row's group dots with x's group in 16 i32 lanes (4 or 8 lanes per
// block), are converted once and scaled by a 16-lane vector of dx * dw (the block scales, f16 -> f32 in
// registers), so no block needs its own horizontal sum; each row ends in one reduce.
//   4-bit: u8 operand = the nibbles, s8 = x_q; the min term adds mw * s/4 in each of the block's 4 lanes
//   int8:  u8 operand = w ^ 0x80 = w + 128, s8 = x_q; each lane starts at -128 * (its 4 x_q's sum), which
//          depends on x alone (prepared once per call)
// Loads of whole groups are plain (a masked load does not train the hardware prefetcher: 2x slower from memory
// here); only a row's last, partial group is masked.

struct VnniX {   // x [M, K] quantized, per row m and group g (ng groups, the last one zero-padded)
  int8_t* lo;    // [M, ng, 64]: 4-bit: x[4g + L][0:16] in 16-byte lane L; int8: x's 64 bytes of the group
  int8_t* hi;    // [M, ng, 64]: 4-bit: x[4g + L][16:32]; int8: unused
  float* dx;     // [M, ng, 16]: the lane's block's activation scale
  float* sx;     // [M, ng, 16]: 4-bit: s[b] / 4; int8: unused
  int32_t* c;    // [M, ng, 16]: int8: -128 * the sum of the lane's 4 x_q; 4-bit: unused
  int64_t ng;
};

inline int64_t vnni_groups(int64_t K, bool four_bit) { return (K / QK + (four_bit ? 3 : 1)) / (four_bit ? 4 : 2); }

// Row m of x (quantize_row's q, d, s) into v's layout.
void vnni_gemv_x(const int8_t* q, const float* d, const float* s, int64_t K, bool four_bit, const VnniX& v,
                 int64_t m) {
  const int64_t B = K / QK, ng = v.ng, base = m * ng;
  std::memset(v.lo + base * 64, 0, size_t(ng * 64));
  std::memset(v.dx + base * 16, 0, size_t(ng * 16 * sizeof(float)));
  if (four_bit) {
    std::memset(v.hi + base * 64, 0, size_t(ng * 64));
    std::memset(v.sx + base * 16, 0, size_t(ng * 16 * sizeof(float)));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t at = base + b / 4, lane = 4 * (b % 4);
      std::memcpy(v.lo + at * 64 + 4 * lane, q + b * QK, 16);
      std::memcpy(v.hi + at * 64 + 4 * lane, q + b * QK + 16, 16);
      for (int j = 0; j < 4; ++j) v.dx[at * 16 + lane + j] = d[b], v.sx[at * 16 + lane + j] = 0.25f * s[b];
    }
    return;
  }
  std::memset(v.c + base * 16, 0, size_t(ng * 16 * sizeof(int32_t)));
  std::memcpy(v.lo + base * 64, q, size_t(K));
  for (int64_t l = 0; l < K / 4; ++l)
    v.c[base * 16 + l] = -128 * (int32_t(q[4 * l]) + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
  for (int64_t b = 0; b < B; ++b)
    for (int j = 0; j < 8; ++j) v.dx[base * 16 + 8 * b + j] = d[b];
}

// y[m0 .. m0 + MR, n0 .. n0 + NR) over all groups; weights with one scale per block of 32 (w.G == K / 32).
template <bool FOUR, int MR, int NR>
JAXSERVE_VNNI void vnni_gemv_tile(const Weights& w, const VnniX& v, int64_t m0, int64_t n0, float* y) {
  const int64_t K = w.K, G = w.G, B = K / QK, ng = v.ng, rb = FOUR ? K / 2 : K;  // rb: bytes per row
  const int per = FOUR ? 4 : 2;  // blocks per group
  const __m512i nib = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8(char(0x80));
  // Lane -> block of the group: 4 lanes per block (4-bit), 8 (int8).
  const __m512i idx = FOUR ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                           : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t nb = std::min<int64_t>(per, B - per * g);
    const bool full = nb == per;
    __m512i wv[NR], wh[NR];  // 4-bit: low and high nibbles; int8: w + 128
    __m512 dw[NR], mw[NR];
    for (int j = 0; j < NR; ++j) {
      const uint8_t* row = w.values + (n0 + j) * rb + g * 64;
      const uint16_t* sc = w.scales + (n0 + j) * G + per * g;
      prefetch(row);
      const __m512i raw = full ? _mm512_loadu_si512(row)
                               : _mm512_maskz_loadu_epi8((__mmask64(1) << (nb * (FOUR ? 16 : 32))) - 1, row);
      // (one row of x: unpacked where used, fewer live registers; more: once for all of them)
      if (FOUR && MR > 1) wv[j] = _mm512_and_si512(raw, nib), wh[j] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib);
      else wv[j] = FOUR ? raw : _mm512_xor_si512(raw, flip);
      const __mmask8 ks = __mmask8((1u << nb) - 1);
      // (the scales of a full group: 8 (4-bit) or 4 (int8) bytes, loaded plainly)
      const __m128i s16 = full ? (FOUR ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc))
                                       : _mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(sc)))
                               : _mm_maskz_loadu_epi16(ks, sc);
      dw[j] = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_cvtph_ps(s16)));
      if (FOUR) {
        const uint16_t* mn = w.mins + (n0 + j) * G + per * g;
        const __m128i m16 = full ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn))
                                 : _mm_maskz_loadu_epi16(ks, mn);
        mw[j] = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_cvtph_ps(m16)));
      }
    }
    for (int i = 0; i < MR; ++i) {
      const int64_t at = (m0 + i) * ng + g;
      const __m512i xl = _mm512_loadu_si512(v.lo + at * 64);
      const __m512 dx = _mm512_loadu_ps(v.dx + at * 16);
      if (FOUR) {
        const __m512i xh = _mm512_loadu_si512(v.hi + at * 64);
        const __m512 sx = _mm512_loadu_ps(v.sx + at * 16);
        for (int j = 0; j < NR; ++j) {
          const __m512i lo = MR > 1 ? wv[j] : _mm512_and_si512(wv[j], nib);
          const __m512i hi = MR > 1 ? wh[j] : _mm512_and_si512(_mm512_srli_epi16(wv[j], 4), nib);
          const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(dw[j], dx), acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(mw[j], sx, acc[i][j]);
        }
      } else {
        const __m512i c = _mm512_loadu_si512(v.c + at * 16);
        for (int j = 0; j < NR; ++j) {
          const __m512i d = _mm512_dpbusd_epi32(c, wv[j], xl);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(dw[j], dx), acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[(m0 + i) * w.N + n0 + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <bool FOUR, int NR>
JAXSERVE_VNNI void vnni_gemv_rows(const Weights& w, const VnniX& v, int64_t M, int64_t n, float* y) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) vnni_gemv_tile<FOUR, 4, NR>(w, v, m, n, y);
  for (; m + 2 <= M; m += 2) vnni_gemv_tile<FOUR, 2, NR>(w, v, m, n, y);
  for (; m < M; ++m) vnni_gemv_tile<FOUR, 1, NR>(w, v, m, n, y);
}

// Output columns [n0, n1) for every row of x: 4 weight rows per tile for one row of x, 2 for more.
template <bool FOUR>
JAXSERVE_VNNI void vnni_gemv(const Weights& w, const VnniX& v, int64_t M, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
  if (M == 1)
    for (; n + 4 <= n1; n += 4) vnni_gemv_rows<FOUR, 4>(w, v, M, n, y);
  for (; n + 2 <= n1; n += 2) vnni_gemv_rows<FOUR, 2>(w, v, M, n, y);
  for (; n < n1; ++n) vnni_gemv_rows<FOUR, 1>(w, v, M, n, y);
}

bool use_vnni(int64_t isa) {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return isa == 0 && has;
}

// One weight of a call: its layer's pointers and where its output goes.
struct Job {
  Weights w;
  float* y;
};

// Shapes of one weight against x [M, K]; fills job.w for layer l (stacked values) or the only one.
ffi::Error weight_job(int64_t K, const ffi::AnyBuffer& values, const ffi::AnyBuffer& scales, const void* mins,
                      int64_t l, bool four_bit, Job& job) {
  auto vd = values.dimensions(), sd = scales.dimensions();
  if ((vd.size() != 2 && vd.size() != 3) || sd.size() != vd.size())
    return ffi::Error::InvalidArgument("qmatmul: values must be [(L,) N, Kv] and scales [(L,) N, G]");
  const bool stacked = vd.size() == 3;
  const int64_t L = stacked ? vd[0] : 1, N = vd[vd.size() - 2], Kv = vd[vd.size() - 1];
  const int64_t G = sd[sd.size() - 1];
  if (Kv != (four_bit ? K / 2 : K) || K % QK || G < 1 || K % G || (K / G) % QK || sd[sd.size() - 2] != N)
    return ffi::Error::InvalidArgument("qmatmul: shapes of x, values and scales do not agree");
  if (!stacked) l = 0;
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("qmatmul: layer index out of range");
  Weights& w = job.w;
  w.N = N, w.K = K, w.G = G, w.four_bit = four_bit;
  w.values = static_cast<const uint8_t*>(values.untyped_data()) + l * N * Kv;
  w.scales = static_cast<const uint16_t*>(scales.untyped_data()) + l * N * G;
  w.mins = four_bit ? static_cast<const uint16_t*>(mins) + l * N * G : nullptr;
  return ffi::Error::Success();
}

// Columns (panels: the VNNI GEMM's panels) [i0, i1) of each job in contiguous runs of `unit`-multiples, ~4 runs
// per thread over all jobs together.
std::vector<Piece> pieces(const std::vector<Job>& jobs, int64_t unit, int64_t threads, bool panels) {
  std::vector<int64_t> counts;
  int64_t total = 0;
  for (const Job& job : jobs) total += counts.emplace_back(panels ? (job.w.N + kPanel - 1) / kPanel : job.w.N);
  const int64_t run = std::max<int64_t>(unit, (total + 4 * threads - 1) / (4 * threads) + unit - 1) / unit * unit;
  return runs_of(counts, run);
}

// y_j = x . w_j^T for every job: x is quantized once, the work of all jobs shares one set of chunks.
ffi::Error run_jobs(ffi::ThreadPool& pool, const float* xp, int64_t M, int64_t K, const std::vector<Job>& jobs,
                    bool four_bit, int64_t f32_min_rows, int64_t isa) {
  int64_t sum_n = 0;
  for (const Job& job : jobs) sum_n += job.w.N;
  if (M == 0 || sum_n == 0) return ffi::Error::Success();
  // Threads only when the work pays for a task hand-off (~a few microseconds).
  const int64_t threads = M * sum_n * K < (int64_t(1) << 17) ? 1 : std::max<int64_t>(1, pool.num_threads());
  const Job* jp = jobs.data();
  if (M >= f32_min_rows) {
    const bool wide = use_avx512(isa);
    const std::vector<Piece> ps = pieces(jobs, 16, threads, false);
    const Piece* pp = ps.data();
    parallel_chunks(pool, int64_t(ps.size()), threads, [jp, pp, xp, M, wide](int64_t c) {
      const Job& job = jp[pp[c].j];
      columns_f32(job.w, xp, M, pp[c].i0, pp[c].i1, job.y, wide);
    });
    return ffi::Error::Success();
  }

  // Activation scratch, reused across calls on the calling thread (workers only read it while we wait).
  thread_local std::vector<uint8_t> scratch;
  const int64_t B = K / QK;
  bool pairs = four_bit && B % 2 == 0;  // and groups of 32 (GGUF's Q4_0 / Q4_1) in every weight
  for (const Job& job : jobs) pairs = pairs && job.w.G == B;
  scratch.resize(size_t(M * K * 3 + M * B * 40 + 64));  // q, |q|, qp; d, s; dv, sv (8 floats per pair each)
  QuantizedActs a;
  a.q = reinterpret_cast<int8_t*>(scratch.data());
  a.aq = scratch.data() + M * K;
  a.d = reinterpret_cast<float*>(scratch.data() + 2 * M * K);
  a.s = a.d + M * B;
  a.qp = pairs ? reinterpret_cast<int8_t*>(a.s + M * B) : nullptr;
  a.dv = pairs ? reinterpret_cast<float*>(a.qp + M * K) : nullptr;
  a.sv = pairs ? a.dv + M * B * 4 : nullptr;
  const bool vnni = M >= (four_bit ? kVnniMinRows4 : kVnniMinRows8) && use_vnni(isa);
  bool gemv512 = !vnni && use_vnni(isa);  // and one scale per block of 32 in every weight
  for (const Job& job : jobs) gemv512 = gemv512 && job.w.G == B;
  thread_local std::vector<uint8_t> vscratch;
  VnniX vx{};
  if (gemv512) {
    vx.ng = vnni_groups(K, four_bit);
    const int64_t rows = M * vx.ng;
    vscratch.resize(size_t(rows * (2 * 64 + 3 * 16 * 4) + 64));
    vx.lo = reinterpret_cast<int8_t*>(vscratch.data());
    vx.hi = vx.lo + rows * 64;
    vx.dx = reinterpret_cast<float*>(vx.hi + rows * 64);
    vx.sx = vx.dx + rows * 16;
    vx.c = reinterpret_cast<int32_t*>(vx.sx + rows * 16);
  }
  const bool abs_q = !four_bit && !vnni && !gemv512;  // only the AVX2 int8 tile reads |q|
  for (int64_t m = 0; m < M; ++m) {
    quantize_row(xp + m * K, K, a.q + m * K, abs_q ? a.aq + m * K : nullptr, a.d + m * B, a.s + m * B);
    if (gemv512) vnni_gemv_x(a.q + m * K, a.d + m * B, a.s + m * B, K, four_bit, vx, m);
    else if (pairs && !vnni)
      pair_layout(a.q + m * K, a.d + m * B, a.s + m * B, K, a.qp + m * K, a.dv + m * B * 4, a.sv + m * B * 4);
  }
  if (vnni) {
    uint8_t* xq = reinterpret_cast<uint8_t*>(a.q);
    if (!four_bit)  // int8: the unsigned operand is x_q + 128
      for (int64_t i = 0; i < M * K; ++i) xq[i] ^= 0x80;
    // Runs of contiguous panels (w streamed in order); row blocks (multiples of the 4-row tile) only where too
    // few panels would leave a thread idle.
    const std::vector<Piece> ps = pieces(jobs, 1, threads, true);
    const int64_t want = int64_t(ps.size()) >= 4 * threads ? 1 : (4 * threads + ps.size() - 1) / ps.size();
    const int64_t mb = std::max<int64_t>(4, ((M + want - 1) / want + 3) / 4 * 4), blocks = (M + mb - 1) / mb;
    const Piece* pp = ps.data();
    const int64_t np = int64_t(ps.size());
    const float *xd = a.d, *xs = a.s;
    parallel_chunks(pool, np * blocks, threads, [jp, pp, np, xq, xd, xs, M, mb](int64_t c) {
      const Piece& piece = pp[c % np];
      const Job& job = jp[piece.j];
      const int64_t m0 = (c / np) * mb;
      for (int64_t p = piece.i0; p < piece.i1; ++p)
        vnni_chunk(job.w, xq, xd, xs, m0, std::min(M, m0 + mb), p * kPanel, job.y);
      _mm_sfence();  // this thread's streaming stores are visible before its chunk counts as done
    });
    return ffi::Error::Success();
  }
  // Few rows are bandwidth-bound: each chunk is a contiguous run of rows of w (a few per thread, for balance), so
  // every thread streams its own stretch of memory in order and the hardware prefetchers keep up.
  const std::vector<Piece> ps = pieces(jobs, 16, threads, false);
  const Piece* pp = ps.data();
  if (gemv512) {
    parallel_chunks(pool, int64_t(ps.size()), threads, [jp, pp, vx, M, four_bit](int64_t c) {
      const Job& job = jp[pp[c].j];
      if (four_bit) vnni_gemv<true>(job.w, vx, M, pp[c].i0, pp[c].i1, job.y);
      else vnni_gemv<false>(job.w, vx, M, pp[c].i0, pp[c].i1, job.y);
    });
    return ffi::Error::Success();
  }
  parallel_chunks(pool, int64_t(ps.size()), threads, [jp, pp, a, M](int64_t c) {
    const Job& job = jp[pp[c].j];
    if (job.w.four_bit) columns<true>(job.w, a, M, pp[c].i0, pp[c].i1, job.y);
    else columns<false>(job.w, a, M, pp[c].i0, pp[c].i1, job.y);
  });
  return ffi::Error::Success();
}

ffi::Error qmatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer values, ffi::AnyBuffer scales,
                   const void* mins, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, bool four_bit,
                   int64_t f32_min_rows, int64_t isa) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("qmatmul: x must be [M, K]");
  std::vector<Job> jobs(1);
  if (auto err = weight_job(xd[1], values, scales, mins, layer.typed_data()[0], four_bit, jobs[0]); !err.success())
    return err;
  jobs[0].y = y->typed_data();
  return run_jobs(pool, x.typed_data(), xd[0], xd[1], jobs, four_bit, f32_min_rows, isa);
}

ffi::Error QMatmulInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer values, ffi::AnyBuffer scales,
                       ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int64_t f32_min_rows,
                       int64_t isa) {
  return qmatmul(pool, x, values, scales, nullptr, layer, y, false, f32_min_rows, isa);
}

ffi::Error QMatmulInt4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer values, ffi::AnyBuffer scales,
                       ffi::AnyBuffer mins, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y,
                       int64_t f32_min_rows, int64_t isa) {
  return qmatmul(pool, x, values, scales, mins.untyped_data(), layer, y, true, f32_min_rows, isa);
}

// Several weights of one x (q, k, v; gate, up): args x, layer, then per weight values, scales (, mins for 4-bit);
// one result per weight. One activation quantization, one set of chunks over all of them.
ffi::Error QMatmulMulti(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                        ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t bits, int64_t f32_min_rows,
                        int64_t isa) {
  const bool four_bit = bits == 4;
  const size_t per = four_bit ? 3 : 2;
  auto xd = x.dimensions();
  if (xd.size() != 2 || (bits != 4 && bits != 8) || args.size() % per || args.size() / per != rets.size())
    return ffi::Error::InvalidArgument("qmatmul_multi: x [M, K], layer, then (values, scales[, mins]) per result");
  std::vector<Job> jobs(rets.size());
  for (size_t j = 0; j < jobs.size(); ++j) {
    auto values = args.get<ffi::AnyBuffer>(per * j), scales = args.get<ffi::AnyBuffer>(per * j + 1);
    auto y = rets.get<ffi::AnyBuffer>(j);
    if (!values.has_value() || !scales.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("qmatmul_multi: bad buffers");
    const void* mins = nullptr;
    if (four_bit) {
      auto m = args.get<ffi::AnyBuffer>(per * j + 2);
      if (!m.has_value()) return ffi::Error::InvalidArgument("qmatmul_multi: bad mins");
      mins = m->untyped_data();
    }
    if (auto err = weight_job(xd[1], *values, *scales, mins, layer.typed_data()[0], four_bit, jobs[j]); !err.success())
      return err;
    jobs[j].y = static_cast<float*>((*y)->untyped_data());
  }
  return run_jobs(pool, x.typed_data(), xd[0], xd[1], jobs, four_bit, f32_min_rows, isa);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveQMatmulInt8, QMatmulInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()         // values s8 [(L,) N, K]
                                  .Arg<ffi::AnyBuffer>()         // scales f16 [(L,) N, G]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer i32[]
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("f32_min_rows")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveQMatmulInt4, QMatmulInt4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()         // values u8 [(L,) N, K / 2]
                                  .Arg<ffi::AnyBuffer>()         // scales f16 [(L,) N, G]
                                  .Arg<ffi::AnyBuffer>()         // mins f16 [(L,) N, G]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer i32[]
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("f32_min_rows")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveQMatmulMulti, QMatmulMulti,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer i32[]
                                  .RemainingArgs()               // per weight: values, scales (, mins)
                                  .RemainingRets()               // per weight: y f32 [M, N]
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("f32_min_rows")
                                  .Attr<int64_t>("isa"));
