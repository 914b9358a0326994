// CPU handler of jvt_qmatmul (quant.h): y = x @ W^T with W in GGML blocks, parallel over
// groups of weight rows on XLA's intra-op thread pool. The loops come in versions chosen at
// run time (function target attributes, so the module builds for and runs on baseline x86-64):
// AVX-512, AVX2 (both with FMA and F16C) and portable scalar code. All accumulate in fp32.
//
// Two loop shapes. Decode (T <= 2 x rows): one pass over each weight row, the block's codes
// converted in registers and multiplied by x at once, its scale applied once per block:
//   sum_j (d q_j + m) x_j = d * sum_j q_j x_j + m * xsum    (xsum: the block's sum of x)
// Prefill (T > 2): 4 weight rows dequantized into an fp32 panel, then a register-tiled dot
// product of the panel with 3 (AVX2) or 6 (AVX-512) x rows at a time, every panel load used
// that many times.
#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_kernels.h"

#if defined(__x86_64__)
// GCC 12's AVX-512 intrinsics trip -Wmaybe-uninitialized on their own _mm512_undefined_*
// placeholders (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace ffi = xla::ffi;

namespace jvt {
namespace {

struct QMatmulParams {
  const float* x;     // [T, K] activations, row-major
  const float* xsum;  // [T, K / 32, 2]: (0, sum of x over block b) per x row (Q4_1 decode)
  const uint8_t* w;   // [N, row_bytes]: row n holds the K / 32 consecutive blocks of W[n, :]
  float* y;           // [T, N] output, row-major
  int64_t T, N, K;    // x rows, weight rows, inner dimension (a multiple of 32)
  int64_t row_bytes;  // K / 32 * block bytes
  QType qtype;        // block format of w
};

constexpr int64_t kRowGroup = 4;    // weight rows of one prefill panel
constexpr int64_t kDecodeRows = 2;  // x rows up to which the decode loops run

// ---- scalar version --------------------------------------------------------------------

float half_to_float(const uint8_t* p) {
  const uint16_t h = static_cast<uint16_t>(p[0] | (p[1] << 8));
  const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal: exact in float
  } else {
    const uint32_t bits = (exp == 0x1f ? 0x7f800000u : (exp + 112) << 23) | (mant << 13);
    std::memcpy(&f, &bits, 4);
  }
  return (h & 0x8000u) ? -f : f;
}

// The 32 values of one block, with gguf-py's arithmetic (gguf.quants.dequantize).
void dequant_block_scalar(QType q, const uint8_t* b, float* out) {
  const float d = half_to_float(b);
  switch (q) {
    case QType::kQ4_0:
      for (int j = 0; j < 16; ++j) {
        out[j] = d * static_cast<float>((b[2 + j] & 15) - 8);
        out[j + 16] = d * static_cast<float>((b[2 + j] >> 4) - 8);
      }
      break;
    case QType::kQ4_1: {
      const float m = half_to_float(b + 2);
      for (int j = 0; j < 16; ++j) {
        out[j] = d * static_cast<float>(b[4 + j] & 15) + m;
        out[j + 16] = d * static_cast<float>(b[4 + j] >> 4) + m;
      }
      break;
    }
    case QType::kQ8_0:
      for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
      break;
  }
}

// Rows [n0, n1) of y: each weight row is dequantized into a [K] buffer once, then dotted with
// every x row.
void rows_scalar(const QMatmulParams& p, int64_t n0, int64_t n1) {
  thread_local std::vector<float> row;
  row.resize(p.K);
  const int64_t blocks = p.K / kQBlockValues, block_bytes = p.row_bytes / blocks;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = p.w + n * p.row_bytes;
    for (int64_t b = 0; b < blocks; ++b) {
      dequant_block_scalar(p.qtype, wr + b * block_bytes, row.data() + b * kQBlockValues);
    }
    for (int64_t t = 0; t < p.T; ++t) {
      const float* xr = p.x + t * p.K;
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) acc += row[k] * xr[k];
      p.y[t * p.N + n] = acc;
    }
  }
}

// ---- SIMD versions ---------------------------------------------------------------------

#if defined(__x86_64__)
template <QType Q>
constexpr int64_t block_bytes() {
  return qblock_bytes(static_cast<int32_t>(Q));
}

// The decode loops read the weights once, as one stream, with much arithmetic per byte: one
// thread's hardware prefetching kept up with about 4.5 GB/s of it; a software prefetch 2 KiB
// ahead of the block being read raised that to about 7 GB/s (96 MB of SmolLM2 weights).
inline void prefetch_ahead(const uint8_t* block) {
  _mm_prefetch(reinterpret_cast<const char*>(block + 2048), _MM_HINT_T0);
}

// A block's scale d in lane 0 and, for Q4_1, its minimum m in lane 1.
JVT_AVX2 inline __m128 block_scales(const uint8_t* b) {
  uint32_t head;
  std::memcpy(&head, b, 4);  // 4 bytes are inside the block for every format
  return _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(head)));
}

// A block's 32 codes as floats, unscaled (Q4_0: q - 8, Q4_1: q, Q8_0: q), 8 per vector:
// values 8c .. 8c + 7 in q[c].
template <QType Q>
JVT_AVX2 inline void block_codes_avx2(const uint8_t* b, __m256 q[4]) {
  if constexpr (Q == QType::kQ8_0) {
    for (int c = 0; c < 4; ++c) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * c));
      q[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
    }
  } else {
    const uint8_t* qs = b + (Q == QType::kQ4_1 ? 4 : 2);
    const __m256i offset = _mm256_set1_epi32(Q == QType::kQ4_0 ? 8 : 0);
    for (int h = 0; h < 2; ++h) {  // bytes 8h .. 8h + 7: values 8h.. (low), 16 + 8h.. (high)
      const __m256i v = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * h)));
      const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(15));
      const __m256i hi = _mm256_srli_epi32(v, 4);
      q[h] = _mm256_cvtepi32_ps(_mm256_sub_epi32(lo, offset));
      q[2 + h] = _mm256_cvtepi32_ps(_mm256_sub_epi32(hi, offset));
    }
  }
}

// The same with 16 values per vector: values 16c .. 16c + 15 in q[c].
template <QType Q>
JVT_AVX512 inline void block_codes_avx512(const uint8_t* b, __m512 q[2]) {
  if constexpr (Q == QType::kQ8_0) {
    for (int c = 0; c < 2; ++c) {
      const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * c));
      q[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8));
    }
  } else {
    // vpermps reads only the low 4 bits of each index: it turns both nibbles into floats
    // (from a table of the 16 code values) on port 5, sparing port 0's conversions
    // (measured 5-10% faster than and + cvtdq2ps per nibble on one core).
    const uint8_t* qs = b + (Q == QType::kQ4_1 ? 4 : 2);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    const __m512 codes = _mm512_sub_ps(
        _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_ps(Q == QType::kQ4_0 ? 8.0f : 0.0f));
    q[0] = _mm512_permutexvar_ps(v, codes);
    q[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), codes);
  }
}

JVT_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// (0, sum of x over a block) into lanes 0 and 1.
JVT_AVX2 inline __m128 load_xsum(const float* xs) {
  return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xs)));
}

JVT_AVX2 inline float lane1(__m128 v) { return _mm_cvtss_f32(_mm_movehdup_ps(v)); }

// sum_j q_j x_j of one block and x row as a vector of partial sums, for 8- and 16-lane codes.
JVT_AVX2 inline __m256 block_dot(const __m256 q[4], const float* x) {
  __m256 s = _mm256_mul_ps(q[0], _mm256_loadu_ps(x));
  for (int c = 1; c < 4; ++c) s = _mm256_fmadd_ps(q[c], _mm256_loadu_ps(x + 8 * c), s);
  return s;
}

JVT_AVX512 inline __m512 block_dot(const __m512 q[2], const float* x) {
  return _mm512_fmadd_ps(q[1], _mm512_loadu_ps(x + 16), _mm512_mul_ps(q[0], _mm512_loadu_ps(x)));
}

// Decode: rows [n0, n1) of y for T = TR x rows. Per block and x row: one dot product of the
// codes with x, scaled by d into an accumulator, and for Q4_1 m times the block's sum of x
// (lane 1 of the scales times lane 1 of xsum, in a 4-lane accumulator).
template <QType Q, int TR>
JVT_AVX2 void decode_rows_avx2(const QMatmulParams& p, int64_t n0, int64_t n1) {
  const int64_t K = p.K, blocks = K / kQBlockValues, row_bytes = p.row_bytes;
  const uint8_t* wr = p.w + n0 * row_bytes;
  for (int64_t n = n0; n < n1; ++n, wr += row_bytes) {
    __m256 acc[TR];
    __m128 acc_m[TR];
    for (int t = 0; t < TR; ++t) {
      acc[t] = _mm256_setzero_ps();
      acc_m[t] = _mm_setzero_ps();
    }
    const uint8_t* wb = wr;
    const float* xb = p.x;
    for (int64_t b = 0; b < blocks; ++b, wb += block_bytes<Q>(), xb += kQBlockValues) {
      prefetch_ahead(wb);
      const __m128 scales = block_scales(wb);
      const __m256 d = _mm256_broadcastss_ps(scales);
      __m256 q[4];
      block_codes_avx2<Q>(wb, q);
      for (int t = 0; t < TR; ++t) {
        acc[t] = _mm256_fmadd_ps(block_dot(q, xb + t * K), d, acc[t]);
        if constexpr (Q == QType::kQ4_1) {
          acc_m[t] = _mm_fmadd_ps(scales, load_xsum(p.xsum + (t * blocks + b) * 2), acc_m[t]);
        }
      }
    }
    for (int t = 0; t < TR; ++t) p.y[t * p.N + n] = hsum(acc[t]) + lane1(acc_m[t]);
  }
}

// The same with 16-lane vectors.
template <QType Q, int TR>
JVT_AVX512 void decode_rows_avx512(const QMatmulParams& p, int64_t n0, int64_t n1) {
  const int64_t K = p.K, blocks = K / kQBlockValues, row_bytes = p.row_bytes;
  const uint8_t* wr = p.w + n0 * row_bytes;
  for (int64_t n = n0; n < n1; ++n, wr += row_bytes) {
    __m512 acc[TR];
    __m128 acc_m[TR];
    for (int t = 0; t < TR; ++t) {
      acc[t] = _mm512_setzero_ps();
      acc_m[t] = _mm_setzero_ps();
    }
    const uint8_t* wb = wr;
    const float* xb = p.x;
    for (int64_t b = 0; b < blocks; ++b, wb += block_bytes<Q>(), xb += kQBlockValues) {
      prefetch_ahead(wb);
      const __m128 scales = block_scales(wb);
      const __m512 d = _mm512_broadcastss_ps(scales);
      __m512 q[2];
      block_codes_avx512<Q>(wb, q);
      for (int t = 0; t < TR; ++t) {
        acc[t] = _mm512_fmadd_ps(block_dot(q, xb + t * K), d, acc[t]);
        if constexpr (Q == QType::kQ4_1) {
          acc_m[t] = _mm_fmadd_ps(scales, load_xsum(p.xsum + (t * blocks + b) * 2), acc_m[t]);
        }
      }
    }
    for (int t = 0; t < TR; ++t) p.y[t * p.N + n] = _mm512_reduce_add_ps(acc[t]) + lane1(acc_m[t]);
  }
}

// Prefill: weight rows [n0, n0 + 4) as fp32 into panel [4, K]; rows past N are zeros.
template <QType Q>
JVT_AVX2 void dequant_panel(const QMatmulParams& p, int64_t n0, float* panel) {
  const int64_t blocks = p.K / kQBlockValues;
  for (int64_t r = 0; r < kRowGroup; ++r) {
    float* out = panel + r * p.K;
    if (n0 + r >= p.N) {
      std::fill(out, out + p.K, 0.0f);
      continue;
    }
    const uint8_t* wb = p.w + (n0 + r) * p.row_bytes;
    for (int64_t b = 0; b < blocks; ++b, wb += block_bytes<Q>(), out += kQBlockValues) {
      const __m128 scales = block_scales(wb);
      const __m256 d = _mm256_broadcastss_ps(scales);
      const __m256 m = _mm256_broadcastss_ps(_mm_movehdup_ps(scales));
      __m256 q[4];
      block_codes_avx2<Q>(wb, q);
      for (int c = 0; c < 4; ++c) {
        const __m256 w = Q == QType::kQ4_1 ? _mm256_fmadd_ps(q[c], d, m) : _mm256_mul_ps(q[c], d);
        _mm256_storeu_ps(out + 8 * c, w);
      }
    }
  }
}

// y[t0 .. t0 + TR, n0 .. n0 + 4) (only the first `rows` columns stored) from a panel:
// 4 x TR dot products over K, 8 lanes at a time, every x load used by 4 weight rows.
template <int TR>
JVT_AVX2 void panel_tile(const QMatmulParams& p, const float* panel, int64_t n0, int64_t t0,
                         int64_t rows) {
  __m256 acc[kRowGroup][TR];
  for (auto& a : acc) {
    for (auto& v : a) v = _mm256_setzero_ps();
  }
  const float* x = p.x + t0 * p.K;
  for (int64_t k = 0; k < p.K; k += 8) {
    __m256 xv[TR];
    for (int t = 0; t < TR; ++t) xv[t] = _mm256_loadu_ps(x + t * p.K + k);
    for (int64_t r = 0; r < kRowGroup; ++r) {
      const __m256 wv = _mm256_loadu_ps(panel + r * p.K + k);
      for (int t = 0; t < TR; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int t = 0; t < TR; ++t) p.y[(t0 + t) * p.N + n0 + r] = hsum(acc[r][t]);
  }
}

template <QType Q>
JVT_AVX2 void prefill_rows(const QMatmulParams& p, int64_t n0, int64_t n1) {
  constexpr int kTile = 3;  // x rows per tile: 12 accumulators + 3 x vectors + 1 weight vector
  thread_local std::vector<float> panel;
  panel.resize(kRowGroup * p.K);
  for (int64_t n = n0; n < n1; n += kRowGroup) {
    dequant_panel<Q>(p, n, panel.data());
    const int64_t rows = std::min(kRowGroup, n1 - n);
    int64_t t = 0;
    for (; t + kTile <= p.T; t += kTile) panel_tile<kTile>(p, panel.data(), n, t, rows);
    if (p.T - t == 2) panel_tile<2>(p, panel.data(), n, t, rows);
    if (p.T - t == 1) panel_tile<1>(p, panel.data(), n, t, rows);
  }
}

template <QType Q>
void rows_avx2(const QMatmulParams& p, int64_t n0, int64_t n1) {
  if (p.T == 1) return decode_rows_avx2<Q, 1>(p, n0, n1);
  if (p.T == 2) return decode_rows_avx2<Q, 2>(p, n0, n1);
  prefill_rows<Q>(p, n0, n1);
}

// panel_tile with 16-lane vectors: 24 accumulators + 6 x vectors + 1 weight vector of the 32
// registers.
template <int TR>
JVT_AVX512 void panel_tile_avx512(const QMatmulParams& p, const float* panel, int64_t n0,
                                  int64_t t0, int64_t rows) {
  __m512 acc[kRowGroup][TR];
  for (auto& a : acc) {
    for (auto& v : a) v = _mm512_setzero_ps();
  }
  const float* x = p.x + t0 * p.K;
  for (int64_t k = 0; k < p.K; k += 16) {
    __m512 xv[TR];
    for (int t = 0; t < TR; ++t) xv[t] = _mm512_loadu_ps(x + t * p.K + k);
    for (int64_t r = 0; r < kRowGroup; ++r) {
      const __m512 wv = _mm512_loadu_ps(panel + r * p.K + k);
      for (int t = 0; t < TR; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int t = 0; t < TR; ++t) p.y[(t0 + t) * p.N + n0 + r] = _mm512_reduce_add_ps(acc[r][t]);
  }
}

template <QType Q>
JVT_AVX512 void prefill_rows_avx512(const QMatmulParams& p, int64_t n0, int64_t n1) {
  constexpr int kTile = 6;
  thread_local std::vector<float> panel;
  panel.resize(kRowGroup * p.K);
  for (int64_t n = n0; n < n1; n += kRowGroup) {
    dequant_panel<Q>(p, n, panel.data());
    const int64_t rows = std::min(kRowGroup, n1 - n);
    int64_t t = 0;
    for (; t + kTile <= p.T; t += kTile) panel_tile_avx512<kTile>(p, panel.data(), n, t, rows);
    switch (p.T - t) {
      case 5: panel_tile_avx512<5>(p, panel.data(), n, t, rows); break;
      case 4: panel_tile_avx512<4>(p, panel.data(), n, t, rows); break;
      case 3: panel_tile_avx512<3>(p, panel.data(), n, t, rows); break;
      case 2: panel_tile_avx512<2>(p, panel.data(), n, t, rows); break;
      case 1: panel_tile_avx512<1>(p, panel.data(), n, t, rows); break;
    }
  }
}

template <QType Q>
void rows_avx512(const QMatmulParams& p, int64_t n0, int64_t n1) {
  if (p.T == 1) return decode_rows_avx512<Q, 1>(p, n0, n1);
  if (p.T == 2) return decode_rows_avx512<Q, 2>(p, n0, n1);
  prefill_rows_avx512<Q>(p, n0, n1);
}

void rows_avx2_any(const QMatmulParams& p, int64_t n0, int64_t n1) {
  switch (p.qtype) {
    case QType::kQ4_0: return rows_avx2<QType::kQ4_0>(p, n0, n1);
    case QType::kQ4_1: return rows_avx2<QType::kQ4_1>(p, n0, n1);
    case QType::kQ8_0: return rows_avx2<QType::kQ8_0>(p, n0, n1);
  }
}

void rows_avx512_any(const QMatmulParams& p, int64_t n0, int64_t n1) {
  switch (p.qtype) {
    case QType::kQ4_0: return rows_avx512<QType::kQ4_0>(p, n0, n1);
    case QType::kQ4_1: return rows_avx512<QType::kQ4_1>(p, n0, n1);
    case QType::kQ8_0: return rows_avx512<QType::kQ8_0>(p, n0, n1);
  }
}

#endif  // __x86_64__

using RowsFn = void (*)(const QMatmulParams&, int64_t, int64_t);

RowsFn rows_fn(CpuIsa isa) {
#if defined(__x86_64__)
  if (isa == CpuIsa::kAvx512) return rows_avx512_any;
  if (isa == CpuIsa::kAvx2) return rows_avx2_any;
#endif
  return rows_scalar;
}

HelperPolicy g_helpers;

// Weight bytes times x rows below which a call never asks for helpers: waking a pool thread
// takes a few microseconds, decoding 128 KiB of Q4_1 about 20 on one core.
constexpr int64_t kHelperWork = 128 << 10;

ffi::Error qmatmul_cpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                       ffi::Result<ffi::AnyBuffer> y, int32_t qtype) {
  auto fail = [](const std::string& what) {
    return ffi::Error::InvalidArgument("jvt_qmatmul: " + what);
  };
  const int64_t block_bytes = qblock_bytes(qtype);
  if (block_bytes == 0) {
    return fail("qtype " + std::to_string(qtype) +
                " is not supported; supported GGML types: 2 (Q4_0), 3 (Q4_1), 8 (Q8_0)");
  }
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (x.element_type() != ffi::DataType::F32 || xd.size() != 2) {
    return fail("x must be a float32 [T, K] matrix");
  }
  if (w.element_type() != ffi::DataType::U8 || wd.size() != 2) {
    return fail("w must be a uint8 [N, K / 32 * block_bytes] matrix of GGML blocks");
  }
  if (y->element_type() != ffi::DataType::F32 || yd.size() != 2) {
    return fail("y must be a float32 [T, N] matrix");
  }
  const int64_t T = xd[0], K = xd[1], N = wd[0];
  if (K % kQBlockValues != 0) {
    return fail("K = " + std::to_string(K) + " must be a multiple of 32 (the block size)");
  }
  if (wd[1] != K / kQBlockValues * block_bytes) {
    return fail("w has " + std::to_string(wd[1]) + " bytes per row; K = " + std::to_string(K) +
                " needs " + std::to_string(K / kQBlockValues * block_bytes));
  }
  if (yd[0] != T || yd[1] != N) return fail("y must be [T, N] for x [T, K] and w [N, ...]");
  if (T == 0 || N == 0) return ffi::Error::Success();
  float* out = static_cast<float*>(y->untyped_data());
  if (K == 0) {
    std::fill(out, out + T * N, 0.0f);
    return ffi::Error::Success();
  }
  const float* xp = static_cast<const float*>(x.untyped_data());
  // Q4_1 decode: (0, sum of x) per block and x row, shared by all N weight rows.
  thread_local std::vector<float> xsum;
  if (static_cast<QType>(qtype) == QType::kQ4_1 && T <= kDecodeRows) {
    xsum.assign(T * K / kQBlockValues * 2, 0.0f);
    for (int64_t i = 0; i < T * K / kQBlockValues; ++i) {
      float s = 0.0f;
      for (int64_t j = 0; j < kQBlockValues; ++j) s += xp[i * kQBlockValues + j];
      xsum[2 * i + 1] = s;
    }
  }
  const QMatmulParams p{xp, xsum.data(), static_cast<const uint8_t*>(w.untyped_data()), out,
                        T, N, K, wd[1], static_cast<QType>(qtype)};
  const RowsFn rows = rows_fn(cpu_isa());
  // About 8 items per thread so that a late or slow thread delays the call little.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t groups = (N + kRowGroup - 1) / kRowGroup;
  const int64_t item_groups = std::max<int64_t>(1, groups / (8 * threads));
  const int64_t items = (groups + item_groups - 1) / item_groups;
  const int64_t work = N * p.row_bytes * T;
  const int64_t wanted = work >= kHelperWork ? std::min(threads - 1, items - 1) : 0;
  g_helpers.run(pool, items, wanted, work, [&](int64_t i) {
    const int64_t n0 = i * item_groups * kRowGroup;
    rows(p, n0, std::min(N, n0 + item_groups * kRowGroup));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kQMatmulCpuHandler, qmatmul_cpu,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::ThreadPool>()    // XLA's intra-op pool (row groups)
                           .Arg<ffi::AnyBuffer>()     // x f32 [T, K]
                           .Arg<ffi::AnyBuffer>()     // w u8 [N, K / 32 * block bytes]
                           .Ret<ffi::AnyBuffer>()     // y f32 [T, N]
                           .Attr<int32_t>("qtype"));  // GGML type id of w's blocks

XLA_FFI_Handler* const kJvtQMatmulCpu = kQMatmulCpuHandler;

}  // namespace jvt
