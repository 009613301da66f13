// GGUF weights to f32 at load time (not an XLA kernel: called through ctypes by models.gguf_loader).
//
// A GGUF matrix is row-major [rows, cols] = [out, in], each row a run of ggml blocks of 32 values; the model
// wants [in, out]. numpy dequantizes (gguf's reference, chunk by chunk) and then transposes with a strided copy:
// ~2.5 s of SmolLM2's start here. This does both in one pass, tile by tile (32 rows x one block of 32 columns,
// dequantized into a small buffer, then written out transposed), with llama.cpp's Q/K row permutation folded in
// (output row r reads source row perm[r]), over a few threads.
//
// Block layouts (ggml): Q8_0 = f16 d, int8 q[32]: x = d*q. Q4_0 = f16 d, u8 q[16]: x[j] = d*((q[j]&15)-8),
// x[j+16] = d*((q[j]>>4)-8). Q4_1 = f16 d, f16 m, u8 q[16]: x[j] = d*(q[j]&15)+m, x[j+16] = d*(q[j]>>4)+m.
// F16 and F32 are plain values.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

enum Kind { kF32 = 0, kF16 = 1, kQ8_0 = 2, kQ4_0 = 3, kQ4_1 = 4 };

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

int64_t BytesPerBlock(int kind) {
  switch (kind) {
    case kF32: return 128;
    case kF16: return 64;
    case kQ8_0: return 34;
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    default: return -1;
  }
}

// One block of 32 values of `kind` at `b` into out[0..32).
inline void Block(int kind, const uint8_t* b, float* out) {
  switch (kind) {
    case kF32:
      std::memcpy(out, b, 128);
      return;
    case kF16:
      for (int j = 0; j < 32; ++j) out[j] = half(b + 2 * j);
      return;
    case kQ8_0: {
      const float d = half(b);
      const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
      for (int j = 0; j < 32; ++j) out[j] = d * q[j];
      return;
    }
    case kQ4_0: {
      const float d = half(b);
      const uint8_t* q = b + 2;
      for (int j = 0; j < 16; ++j) {
        out[j] = d * (static_cast<int>(q[j] & 15) - 8);
        out[j + 16] = d * (static_cast<int>(q[j] >> 4) - 8);
      }
      return;
    }
    case kQ4_1: {
      const float d = half(b), m = half(b + 2);
      const uint8_t* q = b + 4;
      for (int j = 0; j < 16; ++j) {
        out[j] = d * (q[j] & 15) + m;
        out[j + 16] = d * (q[j] >> 4) + m;
      }
      return;
    }
  }
}

void Rows(const uint8_t* src, int kind, int64_t rows, int64_t cols, const int64_t* perm, int transpose, float* out,
          int64_t r_begin, int64_t r_end) {
  const int64_t bpb = BytesPerBlock(kind), blocks = cols / 32, row_bytes = blocks * bpb;
  float tile[32][32];
  for (int64_t r0 = r_begin; r0 < r_end; r0 += 32) {
    const int64_t nr = std::min<int64_t>(32, r_end - r0);
    for (int64_t c = 0; c < blocks; ++c) {
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t src_row = perm ? perm[r0 + i] : r0 + i;
        const uint8_t* b = src + src_row * row_bytes + c * bpb;
        if (transpose) {
          Block(kind, b, tile[i]);
        } else {
          Block(kind, b, out + (r0 + i) * cols + c * 32);
        }
      }
      if (!transpose) continue;
      for (int j = 0; j < 32; ++j) {  // out[c*32 + j][r0 + i]
        float* o = out + (c * 32 + j) * rows + r0;
        for (int64_t i = 0; i < nr; ++i) o[i] = tile[i][j];
      }
    }
  }
}

}  // namespace

// src: the tensor's bytes; rows x cols values (cols a multiple of 32); perm: null or rows source-row indices;
// transpose: write out as [cols, rows] (else [rows, cols]); threads >= 1. Returns 0, or -1 for a bad kind/shape.
extern "C" int jaxserve_dequantize(const uint8_t* src, int kind, int64_t rows, int64_t cols, const int64_t* perm,
                                   int transpose, float* out, int threads) {
  if (BytesPerBlock(kind) < 0 || cols % 32 != 0 || rows < 0 || threads < 1) return -1;
  const int64_t tiles = (rows + 31) / 32;
  const int n = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, tiles)));
  if (n == 1) {
    Rows(src, kind, rows, cols, perm, transpose, out, 0, rows);
    return 0;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < n; ++t) {
    const int64_t a = tiles * t / n * 32, b = std::min<int64_t>(rows, tiles * (t + 1) / n * 32);
    pool.emplace_back(Rows, src, kind, rows, cols, perm, transpose, out, a, b);
  }
  for (auto& th : pool) th.join();
  return 0;
}
