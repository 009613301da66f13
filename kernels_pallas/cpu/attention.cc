// Ragged paged attention for XLA:CPU (AVX2 + FMA; AVX-512 where the CPU has it), called through XLA FFI: the
// signature and semantics of kernels_pallas/ragged_paged_attention.py's reference (its oracle in tests).
//
//   q            f32[T, H, D]        query rows of S sequences, flattened (sequence i owns rows qsl[i]:qsl[i+1])
//   k/v_pages    f32[N, P, Kh, D]    the paged cache, this step's K/V already written, or
//                s8[N, P, Kh, D + 4] int8 rows with their f32 scale in the last 4 bytes (kernels_pallas/kv_quant.py),
//                dequantized as they are read
//   kv_lens      i32[S]              cached tokens per sequence (this step's included)
//   block_tables i32[S, W]           page ids of each sequence
//   qsl          i32[S + 1]          query_start_loc
//   num_seqs     i32[1]
//   -> out       f32[T, H, D]        rows past qsl[num_seqs] are 0
//
// Row t of sequence i sits at position p = kv_lens[i] - (qsl[i+1] - t) and sees cache positions
// [max(0, p - window + 1), p]. Work units are (sequence, KV heads, block of up to 16 rows): each reads its
// sequence's pages once per block of positions for all its rows and the H / Kh query heads sharing each KV head,
// with an online softmax (flash attention's recurrence) over blocks of up to 16 positions within a page. A unit
// takes every KV head when there are enough units to go round (a page's rows are then read contiguously), else
// one. Units are spread over XLA's intra-op pool.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxserve_cpu::exp256;
using jaxserve_cpu::exp512;
using jaxserve_cpu::hmax;
using jaxserve_cpu::hsum;
using jaxserve_cpu::parallel_chunks;
using jaxserve_cpu::use_avx512;

constexpr int kRows = 16;  // rows per unit
constexpr int kBlock = 16;  // positions per softmax block

struct Unit {
  int32_t seq, kh0, kh1, row0, row1;  // KV heads [kh0, kh1) of rows [row0, row1)
};

struct Problem {
  const float* q;
  const void *k, *v;  // float or int8 rows (Q8)
  const int32_t *kv_lens, *tables, *qsl;
  float* out;
  int64_t H, D, Kh, P, N, W;
  float scale, soft_cap;
  int64_t window;  // 0: none
};

// Prefetch `bytes` of K and of V at byte offset `at` of the pages.
inline void prefetch_row(const Problem& pb, int64_t at, int64_t bytes) {
  for (const void* base : {pb.k, pb.v}) {
    const char* row = static_cast<const char*>(base) + at;
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
    if (bytes % 64) _mm_prefetch(row + bytes - 1, _MM_HINT_T0);
  }
}

// Prefetch the K and V rows of KV heads [kh0, kh0 + nh) of the block of positions at `start` (up to kBlock,
// within its page) at once: a unit's first block. The rows of a sequence are strided and its pages scattered,
// so the hardware prefetcher cannot run ahead; later blocks are prefetched a position at a time during the
// current block's work (a burst of a whole block stalls on the core's few outstanding misses: 1.6-2x slower
// from memory here).
inline void prefetch_block(const Problem& pb, const int32_t* table, int64_t kh0, int64_t nh, int64_t start,
                           int64_t last, int64_t row_bytes) {
  if (start > last) return;
  const int64_t page = table[start / pb.P], off = start % pb.P;
  const int64_t n = std::min<int64_t>({kBlock, pb.P - off, last - start + 1}), stride = pb.Kh * row_bytes;
  const int64_t at = ((page * pb.P + off) * pb.Kh + kh0) * row_bytes;
  for (int64_t j = 0; j < n; ++j) prefetch_row(pb, at + j * stride, nh * row_bytes);
}

// The block after the one of n positions at `start`: its length (0 past `last`) and the byte offset of its
// first position's row of KV head kh0.
inline int64_t next_block(const Problem& pb, const int32_t* table, int64_t start, int64_t n, int64_t last,
                          int64_t kh0, int64_t row_bytes, int* len) {
  const int64_t s = start + n;
  *len = s > last ? 0 : int(std::min<int64_t>({kBlock, pb.P - s % pb.P, last - s + 1}));
  return *len ? ((table[s / pb.P] * pb.P + s % pb.P) * pb.Kh + kh0) * row_bytes : 0;
}

// One cache row (position, KV head) as f32 or int8 + scale: q . row, and acc += p * row.
template <bool Q8>
struct Rows {
  const uint8_t* base;
  int64_t D, stride;  // stride: bytes from one position to the next in a page

  const uint8_t* at(int64_t page, int64_t off, int64_t P, int64_t Kh, int64_t kh) const {
    return base + ((page * P + off) * Kh + kh) * (Q8 ? D + 4 : D * 4);
  }
  float scale(const uint8_t* row) const {
    float sc = 1.0f;
    if (Q8) std::memcpy(&sc, row + D, sizeof(float));
    return sc;
  }
  float dot(const float* q, const uint8_t* row) const {  // the scale is 1 for float rows
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(row, d), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(row, d + 8), s1);
    }
    for (; d < D; d += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(row, d), s0);
    const float r = hsum(_mm256_add_ps(s0, s1));
    return Q8 ? r * scale(row) : r;
  }
  __m256 load8(const uint8_t* row, int64_t d) const {
    return Q8 ? widen(reinterpret_cast<const int8_t*>(row) + d) : _mm256_loadu_ps(reinterpret_cast<const float*>(row) + d);
  }
  static __m256 widen(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

template <bool Q8>
void run_head(const Problem& pb, const Unit& u, int64_t kv_head) {
  const Rows<Q8> krows{static_cast<const uint8_t*>(pb.k), pb.D, pb.Kh * (Q8 ? pb.D + 4 : pb.D * 4)};
  const Rows<Q8> vrows{static_cast<const uint8_t*>(pb.v), pb.D, krows.stride};
  const int64_t G = pb.H / pb.Kh, D = pb.D, R = u.row1 - u.row0, pairs = R * G;
  const int64_t kv_len = pb.kv_lens[u.seq], q_end = pb.qsl[u.seq + 1];
  const int32_t* table = pb.tables + int64_t(u.seq) * pb.W;
  thread_local std::vector<float> buf;
  buf.resize(size_t(pairs * (2 * D + kBlock + 2)));
  float* qs = buf.data();              // [pairs, D] scaled queries
  float* acc = qs + pairs * D;         // [pairs, D]
  float* sc = acc + pairs * D;         // [pairs, kBlock] scores, then probabilities
  float* m = sc + pairs * kBlock;      // [pairs] running max
  float* l = m + pairs;                // [pairs] running sum
  int64_t lo[kRows], hi[kRows];
  for (int64_t r = 0; r < R; ++r) {
    const int64_t pos = kv_len - (q_end - (u.row0 + r));
    hi[r] = pos;
    lo[r] = pb.window > 0 ? std::max<int64_t>(0, pos - pb.window + 1) : 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t pr = r * G + g, head = kv_head * G + g;
      const float* src = pb.q + ((u.row0 + r) * pb.H + head) * D;
      for (int64_t d = 0; d < D; ++d) qs[pr * D + d] = src[d] * pb.scale;
      m[pr] = -std::numeric_limits<float>::infinity();
      l[pr] = 0.0f;
    }
  }
  std::fill(acc, acc + pairs * D, 0.0f);
  const int64_t first = *std::min_element(lo, lo + R), last = *std::max_element(hi, hi + R);
  const int64_t row_bytes = Q8 ? D + 4 : D * 4;
  prefetch_block(pb, table, kv_head, 1, first, last, row_bytes);
  for (int64_t start = first; start <= last;) {
    const int64_t page = table[start / pb.P], off = start % pb.P;
    const int64_t n = std::min<int64_t>({kBlock, pb.P - off, last - start + 1});
    int nn;  // the next block, prefetched a position at a time in the first pair's scores
    const int64_t nat = next_block(pb, table, start, n, last, kv_head, row_bytes, &nn);
    const uint8_t* kb = krows.at(page, off, pb.P, pb.Kh, kv_head);
    const uint8_t* vb = vrows.at(page, off, pb.P, pb.Kh, kv_head);
    float vscale[kBlock];
    for (int64_t j = 0; j < n; ++j) vscale[j] = vrows.scale(vb + j * vrows.stride);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t a = std::max<int64_t>(lo[r] - start, 0), b = std::min<int64_t>(hi[r] - start + 1, n);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t pr = r * G + g;
        float* s = sc + pr * kBlock;
        if (a >= b) {  // this row sees nothing of this block
          std::fill(s, s + kBlock, 0.0f);
          continue;
        }
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < kBlock; ++j) {
          if (pr == 0 && j < nn) prefetch_row(pb, nat + j * krows.stride, row_bytes);
          float x = -std::numeric_limits<float>::infinity();
          if (j >= a && j < b) {
            x = krows.dot(qs + pr * D, kb + j * krows.stride);
            if (pb.soft_cap > 0.0f) x = pb.soft_cap * std::tanh(x / pb.soft_cap);
            mx = std::max(mx, x);
          }
          s[j] = x;
        }
        const float m_new = std::max(m[pr], mx);
        const float corr = std::exp(m[pr] - m_new);  // 0 when nothing was seen before (m = -inf)
        const __m256 mv = _mm256_set1_ps(m_new);
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < kBlock; j += 8) {
          const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));  // -inf -> exactly 0
          _mm256_storeu_ps(s + j, p);
          sum = _mm256_add_ps(sum, p);
        }
        l[pr] = l[pr] * corr + hsum(sum);
        m[pr] = m_new;
        float* ac = acc + pr * D;
        if (corr != 1.0f) {
          const __m256 cv = _mm256_set1_ps(corr);
          for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(ac + d, _mm256_mul_ps(_mm256_loadu_ps(ac + d), cv));
        }
        if (Q8)
          for (int64_t j = a; j < b; ++j) s[j] *= vscale[j];  // p * the row's scale, once per row
        for (int64_t d = 0; d < D; d += 8) {
          __m256 o = _mm256_loadu_ps(ac + d);
          for (int64_t j = a; j < b; ++j)
            o = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), vrows.load8(vb + j * vrows.stride, d), o);
          _mm256_storeu_ps(ac + d, o);
        }
      }
    }
    start += n;
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t pr = r * G + g, head = kv_head * G + g;
      float* dst = pb.out + ((u.row0 + r) * pb.H + head) * D;
      const float inv = l[pr] > 0.0f ? 1.0f / l[pr] : 0.0f;
      for (int64_t d = 0; d < D; ++d) dst[d] = acc[pr * D + d] * inv;
    }
}

template <bool Q8>
void run_unit(const Problem& pb, const Unit& u) {
  for (int64_t kh = u.kh0; kh < u.kh1; ++kh) run_head<Q8>(pb, u, kh);
}

// ---- AVX-512 (picked at run time where the CPU has it; head_dim = 16 * DV, DV <= 8) -------------------------
//
// The same units and recurrence, restructured so no score needs its own horizontal sum: a block's 16 scores of
// one query head come out of 16 row dots as one vector (a transpose-and-add tree, ~3 ops per score instead of
// ~6), the softmax runs 16 lanes wide, and P . V keeps the head's output row in registers. int8 rows are
// widened once per block into an L1 buffer shared by every query of the unit; their scales multiply the block's
// score vector (K) and probability vector (V) instead of every element.

// Lane j of the result = the sum of v[j]'s 16 lanes.
JAXSERVE_AVX512 inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v0 + v2, w0 + w2, v1 + v3, w1 + w3] of v = v[2i], w = v[2i+1]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of v[4i .. 4i+3]
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // lanes (0+1, 2+3) of b[2i] then of b[2i+1]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

template <bool Q8, int DV>
JAXSERVE_AVX512 void run_unit512(const Problem& pb, const Unit& u) {
  constexpr int64_t D = 16 * DV;
  const int64_t G = pb.H / pb.Kh, R = u.row1 - u.row0, nh = u.kh1 - u.kh0, ph = R * G, pairs = nh * ph;
  const int64_t kv_len = pb.kv_lens[u.seq], q_end = pb.qsl[u.seq + 1];
  const int32_t* table = pb.tables + int64_t(u.seq) * pb.W;
  const int64_t row_bytes = Q8 ? D + 4 : D * 4, stride = pb.Kh * row_bytes;  // bytes between positions
  thread_local std::vector<float> buf;
  buf.resize(size_t(pairs * (2 * D + kBlock + 3) + (Q8 ? 2 * kBlock * D : 0) + 16));
  float* pj = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) / 4 % 16) % 16;  // 64-byte aligned
  // Pairs pr = (head of the unit hh, row r, query head g) -> hh * ph + r * G + g.
  // [pairs, kBlock] this block's probabilities
  float* qs = pj + pairs * kBlock;  // [pairs, D] scaled queries
  float* acc = qs + pairs * D;    // [pairs, D]
  float* m = acc + pairs * D;     // [pairs] running max
  float* l = m + pairs;           // [pairs] running sum
  float* corr = l + pairs;        // [pairs] this block's rescaling of acc
  float* kf = corr + pairs;       // int8 only: [kBlock, D] this block's K rows of one head widened (scales apart)
  float* vf = kf + kBlock * D;    //            [kBlock, D] and its V rows
  int64_t lo[kRows], hi[kRows];
  const __m512 scale = _mm512_set1_ps(pb.scale), ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < R; ++r) {
    hi[r] = kv_len - (q_end - (u.row0 + r));
    lo[r] = pb.window > 0 ? std::max<int64_t>(0, hi[r] - pb.window + 1) : 0;
  }
  for (int64_t hh = 0; hh < nh; ++hh)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t pr = hh * ph + r * G + g;
        const float* src = pb.q + ((u.row0 + r) * pb.H + (u.kh0 + hh) * G + g) * D;
        for (int dv = 0; dv < DV; ++dv) {
          _mm512_storeu_ps(qs + pr * D + 16 * dv, _mm512_mul_ps(_mm512_loadu_ps(src + 16 * dv), scale));
          _mm512_storeu_ps(acc + pr * D + 16 * dv, _mm512_setzero_ps());
        }
        m[pr] = -std::numeric_limits<float>::infinity();
        l[pr] = 0.0f;
      }
  const int64_t first = *std::min_element(lo, lo + R), last = *std::max_element(hi, hi + R);
  prefetch_block(pb, table, u.kh0, nh, first, last, row_bytes);
  for (int64_t start = first; start <= last;) {
    const int64_t page = table[start / pb.P], off = start % pb.P;
    const int n = int(std::min<int64_t>({kBlock, pb.P - off, last - start + 1}));
    // The next block (nn positions from byte nat) is prefetched a position at a time inside each head's P . V
    // below, spread over this block's work (see prefetch_block).
    int nn;
    const int64_t nat = next_block(pb, table, start, n, last, u.kh0, row_bytes, &nn);
    for (int64_t hh = 0; hh < nh; ++hh) {
      const int64_t kh = u.kh0 + hh, p_lo = hh * ph;
      const uint8_t* kb = static_cast<const uint8_t*>(pb.k) + ((page * pb.P + off) * pb.Kh + kh) * row_bytes;
      const uint8_t* vb = static_cast<const uint8_t*>(pb.v) + ((page * pb.P + off) * pb.Kh + kh) * row_bytes;
      const float *krow[kBlock], *vrow[kBlock];
      alignas(64) float kscale[kBlock], vscale[kBlock];  // int8: row j's scales (applied to its score and p)
      if (Q8) std::fill(kscale + n, kscale + kBlock, 1.0f), std::fill(vscale + n, vscale + kBlock, 1.0f);
      for (int j = 0; j < n; ++j) {
        if (Q8) {
          std::memcpy(&kscale[j], kb + j * stride + D, sizeof(float));
          std::memcpy(&vscale[j], vb + j * stride + D, sizeof(float));
          for (int t = 0; t < 2; ++t) {
            const uint8_t* src = (t ? vb : kb) + j * stride;
            float* dst = (t ? vf : kf) + j * D;
            for (int dv = 0; dv < DV; ++dv) {
              const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * dv));
              _mm512_storeu_ps(dst + 16 * dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
            }
          }
          krow[j] = kf + j * D, vrow[j] = vf + j * D;
        } else {
          krow[j] = reinterpret_cast<const float*>(kb + j * stride);
          vrow[j] = reinterpret_cast<const float*>(vb + j * stride);
        }
      }
      // Scores and probabilities of this head's (row, query head) pairs: pj[pr] holds p (times V's scale,
      // int8), 0 for positions the row does not see; corr[pr] rescales its accumulator (1 where the row sees
      // nothing here).
      for (int64_t r = 0; r < R; ++r) {
        const int64_t a = std::max<int64_t>(lo[r] - start, 0), b = std::min<int64_t>(hi[r] - start + 1, n);
        if (a >= b) {  // this row sees nothing of this block: its state is unchanged
          for (int64_t g = 0; g < G; ++g) {
            _mm512_store_ps(pj + (p_lo + r * G + g) * kBlock, _mm512_setzero_ps());
            corr[p_lo + r * G + g] = 1.0f;
          }
          continue;
        }
        const __mmask16 seen = __mmask16(((1u << b) - 1) & ~((1u << a) - 1));
        for (int64_t g = 0; g < G; ++g) {
          const int64_t pr = p_lo + r * G + g;
          __m512 qv[DV], dots[kBlock];
          for (int dv = 0; dv < DV; ++dv) qv[dv] = _mm512_loadu_ps(qs + pr * D + 16 * dv);
                    for (int j = 0; j < kBlock; ++j) {
            if (j < n) {
              dots[j] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(krow[j]));
              for (int dv = 1; dv < DV; ++dv)
                dots[j] = _mm512_fmadd_ps(qv[dv], _mm512_loadu_ps(krow[j] + 16 * dv), dots[j]);
            } else {
              dots[j] = _mm512_setzero_ps();
            }
          }
          __m512 sv = sum16(dots);  // lane j: score of position start + j
          if (Q8) sv = _mm512_mul_ps(sv, _mm512_load_ps(kscale));
          sv = _mm512_mask_mov_ps(ninf, seen, sv);
          if (pb.soft_cap > 0.0f) {
            alignas(64) float t[kBlock];
            _mm512_store_ps(t, sv);
            for (int j = int(a); j < b; ++j) t[j] = pb.soft_cap * std::tanh(t[j] / pb.soft_cap);
            sv = _mm512_load_ps(t);
          }
          const float m_new = std::max(m[pr], _mm512_mask_reduce_max_ps(seen, sv));
          corr[pr] = std::exp(m[pr] - m_new);  // 0 when nothing was seen before (m = -inf)
          const __m512 pv = exp512(_mm512_sub_ps(sv, _mm512_set1_ps(m_new)));  // unseen lanes: exactly 0
          l[pr] = l[pr] * corr[pr] + _mm512_reduce_add_ps(pv);
          m[pr] = m_new;
          _mm512_store_ps(pj + pr * kBlock, Q8 ? _mm512_mul_ps(pv, _mm512_load_ps(vscale)) : pv);
        }
      }
      // acc = acc * corr + P . V, kPT pairs at a time: each V row is loaded once for all of them, and their
      // kPT * DV accumulator chains are independent (one pair alone waits on a chain of n FMAs).
      constexpr int kPT = DV >= 8 ? 2 : 4;
      for (int64_t p0 = p_lo; p0 < p_lo + ph; p0 += kPT) {
        const int pt = int(std::min<int64_t>(kPT, p_lo + ph - p0));
        __m512 o[kPT][DV];
        for (int t = 0; t < kPT; ++t) {
          const __m512 cv = _mm512_set1_ps(t < pt ? corr[p0 + t] : 0.0f);
          for (int dv = 0; dv < DV; ++dv)
            o[t][dv] = t < pt ? _mm512_mul_ps(_mm512_loadu_ps(acc + (p0 + t) * D + 16 * dv), cv) : _mm512_setzero_ps();
        }
        const bool pf = p0 == p_lo;
        for (int j = 0; j < std::max(n, pf ? nn : 0); ++j) {
          if (pf && j < nn) prefetch_row(pb, nat + j * stride + hh * row_bytes, row_bytes);
          if (j >= n) continue;
          __m512 vv[DV];
          for (int dv = 0; dv < DV; ++dv) vv[dv] = _mm512_loadu_ps(vrow[j] + 16 * dv);
          for (int t = 0; t < kPT; ++t) {
            if (t >= pt) break;
            const __m512 pv = _mm512_set1_ps(pj[(p0 + t) * kBlock + j]);
            for (int dv = 0; dv < DV; ++dv) o[t][dv] = _mm512_fmadd_ps(pv, vv[dv], o[t][dv]);
          }
        }
        for (int t = 0; t < pt; ++t)
          for (int dv = 0; dv < DV; ++dv) _mm512_storeu_ps(acc + (p0 + t) * D + 16 * dv, o[t][dv]);
      }
    }
    start += n;
  }
  for (int64_t hh = 0; hh < nh; ++hh)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t pr = hh * ph + r * G + g;
        float* dst = pb.out + ((u.row0 + r) * pb.H + (u.kh0 + hh) * G + g) * D;
        const __m512 inv = _mm512_set1_ps(l[pr] > 0.0f ? 1.0f / l[pr] : 0.0f);
        for (int dv = 0; dv < DV; ++dv)
          _mm512_storeu_ps(dst + 16 * dv, _mm512_mul_ps(_mm512_loadu_ps(acc + pr * D + 16 * dv), inv));
      }
}

using UnitFn = void (*)(const Problem&, const Unit&);

template <bool Q8>
UnitFn unit512(int64_t D) {
  switch (D) {
    case 16: return run_unit512<Q8, 1>;
    case 32: return run_unit512<Q8, 2>;
    case 64: return run_unit512<Q8, 4>;
    case 128: return run_unit512<Q8, 8>;
    default: return nullptr;
  }
}

ffi::Error RaggedPagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                                    ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> kv_lens,
                                    ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> query_start_loc,
                                    ffi::Buffer<ffi::S32> num_seqs, ffi::ResultBuffer<ffi::F32> out, float sm_scale,
                                    int64_t sliding_window, float soft_cap, int64_t isa) {
  auto qd = q.dimensions(), kd = k_pages.dimensions(), td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument("ragged_paged_attention: q [T, H, D], pages [N, P, Kh, D], tables [S, W]");
  Problem pb;
  const int64_t T = qd[0];
  pb.H = qd[1], pb.D = qd[2], pb.N = kd[0], pb.P = kd[1], pb.Kh = kd[2], pb.W = td[1];
  const int64_t S = td[0];
  const bool q8 = k_pages.element_type() == ffi::DataType::S8;
  if (k_pages.element_type() != v_pages.element_type() || (!q8 && k_pages.element_type() != ffi::DataType::F32))
    return ffi::Error::InvalidArgument("ragged_paged_attention: pages must both be f32 or both int8");
  if (kd[3] != pb.D + (q8 ? 4 : 0) || pb.D % 8 || pb.H % pb.Kh)
    return ffi::Error::InvalidArgument("ragged_paged_attention: head_dim must agree and be a multiple of 8");
  pb.q = q.typed_data(), pb.k = k_pages.untyped_data(), pb.v = v_pages.untyped_data();
  pb.kv_lens = kv_lens.typed_data(), pb.tables = block_tables.typed_data(), pb.qsl = query_start_loc.typed_data();
  pb.out = out->typed_data();
  pb.scale = sm_scale, pb.soft_cap = soft_cap, pb.window = sliding_window;
  const int64_t ns = std::min<int64_t>(std::max(num_seqs.typed_data()[0], 0), S);

  std::fill(pb.out, pb.out + T * pb.H * pb.D, 0.0f);
  thread_local std::vector<Unit> units;
  units.clear();
  int64_t row_blocks = 0;
  for (int32_t s = 0; s < ns; ++s) row_blocks += (std::max(pb.qsl[s + 1] - pb.qsl[s], 0) + kRows - 1) / kRows;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // A unit takes every KV head of its rows when there are enough units to go round (it then reads each page's
  // rows contiguously, which the hardware prefetcher follows), else one head (more units for few sequences).
  const int32_t hg = row_blocks >= 4 * threads ? int32_t(pb.Kh) : 1;
  for (int32_t s = 0; s < ns; ++s) {
    const int32_t r0 = pb.qsl[s], r1 = pb.qsl[s + 1];
    const int64_t kv_len = pb.kv_lens[s];
    if (r0 < 0 || r1 > T || r1 < r0 || kv_len < r1 - r0 || kv_len > pb.W * pb.P)
      return ffi::Error::InvalidArgument("ragged_paged_attention: query_start_loc / kv_lens out of range");
    for (int64_t p = 0; p < (kv_len + pb.P - 1) / pb.P; ++p) {
      const int32_t page = pb.tables[s * pb.W + p];
      if (page < 0 || page >= pb.N) return ffi::Error::InvalidArgument("ragged_paged_attention: page id out of range");
    }
    for (int32_t r = r0; r < r1; r += kRows)
      for (int32_t kh = 0; kh < pb.Kh; kh += hg) units.push_back({s, kh, kh + hg, r, std::min(r + kRows, r1)});
  }
  const Unit* up = units.data();
  UnitFn fn = q8 ? run_unit<true> : run_unit<false>;  // isa 1: the AVX2 units only (tests of the baseline)
  if (use_avx512(isa)) {
    if (UnitFn wide = q8 ? unit512<true>(pb.D) : unit512<false>(pb.D)) fn = wide;
  }
  parallel_chunks(pool, int64_t(units.size()), units.size() < 2 ? 1 : threads, [pb, up, fn](int64_t c) { fn(pb, up[c]); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveRaggedPagedAttention, RaggedPagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [T, H, D]
                                  .Arg<ffi::AnyBuffer>()         // k_pages f32 [N, P, Kh, D] | s8 [.., D + 4]
                                  .Arg<ffi::AnyBuffer>()         // v_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens [S]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables [S, W]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query_start_loc [S + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs [1]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [T, H, D]
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("isa"));
