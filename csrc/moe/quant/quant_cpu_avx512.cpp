// AVX-512 build of the fused_moe_quant CPU inner loops (see quant_cpu_kernels.h): each step decodes 16
// consecutive weights of a row into one zmm (fp8 through float16 bits, e2m1 through a 16-entry permute,
// nibbles through byte unpacks), scales them, and multiplies them into every token of the tile. Compiled
// for AVX-512 by the target pragma, no torch header; runs only when CPUID has AVX-512.
#include "moe/quant/quant_cpu_kernels.h"

#if defined(MOE_SWAP_HAVE_X86_KERNELS)

#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace moe_swap::cpu {
namespace {

inline __mmask16 first_lanes(int count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// 16 nibbles from the bytes of p in byte_mask, as 16 int32 lanes: byte j's low nibble, then its high one.
inline __m512i nibbles16(const uint8_t* p, __mmask16 byte_mask) {
  const __m128i b = _mm_maskz_loadu_epi8(byte_mask, p);
  const __m128i low = _mm_and_si128(b, _mm_set1_epi8(0x0F));
  const __m128i high = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(low, high));
}

// Group g's int4 scale (float16 through F16C: the portable decoder branches on the exponent).
inline float group_scale(const QuantMatrix& m, const QuantRow& row, int64_t g) {
  if (m.scale_type == WeightType::kFloat16) return _cvtsh_ss(static_cast<const uint16_t*>(row.scale)[g]);
  return scale_value(row.scale, m.scale_type, g);
}

// Weights k .. k + count - 1 of a row (k a multiple of 16, count <= 16) as float32; lanes past count are 0.
template <QFormat F>
inline __m512 load16(const QuantMatrix& m, const QuantRow& row, int64_t k, int count) {
  const __mmask16 mask = first_lanes(count);
  if constexpr (F == QFormat::kFp8Block) {
    // e4m3 S.EEEE.MMM sign-extended to 32 bits, shifted left 20: the sign lands in bit 31, EEEE.MMM in
    // the low exponent bits and the mantissa (bits 20-26), a float32 of 2^-120 times the value (the
    // subnormals too); the exact * 2^120 and the block scale then give the reference's q * s.
    const __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, row.q + k));
    const __m512i bits = _mm512_and_si512(_mm512_slli_epi32(v, 20), _mm512_set1_epi32(static_cast<int>(0x87F00000u)));
    const __m512 value = _mm512_mul_ps(_mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(0x1p120f)),
                                       _mm512_set1_ps(row.scale_f32[k / 128]));
    const __mmask16 nan = _mm512_mask_cmpeq_epi32_mask(mask, _mm512_and_si512(bits, _mm512_set1_epi32(0x07F00000)),
                                                       _mm512_set1_epi32(0x07F00000));
    return _mm512_mask_mov_ps(value, nan, _mm512_set1_ps(float_from_bits(0x7FC00000u)));
  } else if constexpr (F == QFormat::kInt8) {
    const __m128i b = _mm_maskz_loadu_epi8(mask, row.q + k);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(*row.scale_f32));
  } else if constexpr (F == QFormat::kInt4) {
    const __mmask16 bytes = first_lanes((count + 1) / 2);
    const __m512 u = _mm512_cvtepi32_ps(nibbles16(row.q + k / 2, bytes));
    const int64_t g = k / m.group;
    const float z = row.zero != nullptr ? static_cast<float>(row.zero[g]) : 8.0f;
    return _mm512_maskz_mul_ps(mask, _mm512_sub_ps(u, _mm512_set1_ps(z)), _mm512_set1_ps(group_scale(m, row, g)));
  } else {
    const __mmask16 bytes = first_lanes((count + 1) / 2);
    const __m512i codes = nibbles16(row.q + (k / 32) * 16 + (k % 32) / 2, bytes);
    const __m512 v = _mm512_permutexvar_ps(codes, _mm512_loadu_ps(kE2m1Values));
    return _mm512_maskz_mul_ps(mask, v, _mm512_set1_ps(e8m0_value(static_cast<const uint8_t*>(row.scale)[k / 32])));
  }
}

// The byte of a row's weights at weight k, and of its group scale and zero point (prefetch addresses).
template <QFormat F>
inline const uint8_t* weight_byte(const QuantRow& row, int64_t k) {
  return row.q + ((F == QFormat::kFp8Block || F == QFormat::kInt8) ? k : k / 2);
}
inline const void* scale_byte(const QuantMatrix& m, const QuantRow& row, int64_t k) {
  switch (m.format) {
    case QFormat::kFp8Block: return row.scale_f32 + k / 128;
    case QFormat::kMxfp4: return static_cast<const uint8_t*>(row.scale) + k / 32;
    case QFormat::kInt4:
      return static_cast<const char*>(row.scale) + (k / m.group) * (m.scale_type == WeightType::kFloat32 ? 4 : 2);
    case QFormat::kInt8: break;
  }
  return row.scale_f32;
}

// kRows weight rows against kTokens tokens (4 x 4 = 16 zmm accumulators): each decoded weight vector is
// used kTokens times, each token vector kRows times. next (or nullptr): the rows the caller reads after
// these, whose lines are prefetched as this tile reads the same lines of its own rows: a quantized row is
// 0.5-4 KB, too short for the hardware prefetcher to ramp up before it ends.
template <QFormat F, int kRows, int kTokens>
inline void micro_tile(const float* x, int64_t ld_x, const QuantMatrix& m, const QuantRow (&rows)[kRows], float* out,
                       int64_t ld_out, const QuantRow* next) {
  constexpr int64_t kWeightsPerLine = (F == QFormat::kFp8Block || F == QFormat::kInt8) ? 64 : 128;
  __m512 acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t K = m.cols;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (next != nullptr && k % kWeightsPerLine == 0) {
      for (int r = 0; r < kRows; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(weight_byte<F>(next[r], k)), _MM_HINT_T0);
        _mm_prefetch(static_cast<const char*>(scale_byte(m, next[r], k)), _MM_HINT_T0);
        if (next[r].zero != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next[r].zero + k / m.group), _MM_HINT_T0);
      }
    }
    __m512 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = load16<F>(m, rows[r], k, 16);
    for (int t = 0; t < kTokens; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * ld_x + k);
      for (int r = 0; r < kRows; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  if (k < K) {
    const int count = static_cast<int>(K - k);
    __m512 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = load16<F>(m, rows[r], k, count);
    for (int t = 0; t < kTokens; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(first_lanes(count), x + t * ld_x + k);
      for (int r = 0; r < kRows; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int t = 0; t < kTokens; ++t)
    for (int r = 0; r < kRows; ++r) out[t * ld_out + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// The 16 nibble values (int4: u as float; mxfp4: the e2m1 value) of weights k .. k + count - 1 (k a
// multiple of 16), lanes past count 0; unscaled.
template <QFormat F>
inline __m512 nibble_values16(const QuantRow& row, int64_t k, int count) {
  const __m512i codes = nibbles16(row.q + k / 2, first_lanes((count + 1) / 2));
  const __m512 v = F == QFormat::kMxfp4 ? _mm512_permutexvar_ps(codes, _mm512_loadu_ps(kE2m1Values))
                                        : _mm512_cvtepi32_ps(codes);
  return _mm512_maskz_mov_ps(first_lanes(count), v);
}

// int4 and mxfp4, as micro_tile but 32 weights per 16-byte load, summed per group unscaled (u . x,
// e2m1 . x) and scaled once per group; int4's zero points join as z * s * (the group's sum of x), from
// group_x_sums [kTokens rows of ld_sums]. Each weight then costs a few integer ops, a convert and an FMA.
template <QFormat F, int kRows, int kTokens>
inline void micro_tile_nibbles(const float* x, int64_t ld_x, const QuantMatrix& m, const QuantRow (&rows)[kRows],
                               float* out, int64_t ld_out, const QuantRow* next, const float* group_x_sums,
                               int64_t ld_sums) {
  const int64_t K = m.cols;
  const int64_t G = F == QFormat::kMxfp4 ? 32 : m.group;
  const __m512 lut = _mm512_loadu_ps(kE2m1Values);
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  __m512 acc[kRows][kTokens];
  float zero_terms[kRows][kTokens] = {};
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += G) {
    const int64_t k1 = K - k0 < G ? K : k0 + G;
    __m512 part[kRows][kTokens];
    for (int r = 0; r < kRows; ++r)
      for (int t = 0; t < kTokens; ++t) part[r][t] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      if (next != nullptr && k % 128 == 0) {
        for (int r = 0; r < kRows; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(next[r].q + k / 2), _MM_HINT_T0);
          _mm_prefetch(static_cast<const char*>(scale_byte(m, next[r], k)), _MM_HINT_T0);
          if (next[r].zero != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next[r].zero + g), _MM_HINT_T0);
        }
      }
      __m512 w0[kRows], w1[kRows];
      for (int r = 0; r < kRows; ++r) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r].q + k / 2));
        const __m128i lo = _mm_and_si128(b, low_nibbles);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibbles);
        const __m512i c0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
        const __m512i c1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi));
        if constexpr (F == QFormat::kMxfp4) {
          w0[r] = _mm512_permutexvar_ps(c0, lut);
          w1[r] = _mm512_permutexvar_ps(c1, lut);
        } else {
          w0[r] = _mm512_cvtepi32_ps(c0);
          w1[r] = _mm512_cvtepi32_ps(c1);
        }
      }
      for (int t = 0; t < kTokens; ++t) {
        const __m512 x0 = _mm512_loadu_ps(x + t * ld_x + k), x1 = _mm512_loadu_ps(x + t * ld_x + k + 16);
        for (int r = 0; r < kRows; ++r) part[r][t] = _mm512_fmadd_ps(w1[r], x1, _mm512_fmadd_ps(w0[r], x0, part[r][t]));
      }
    }
    for (; k < k1; k += 16) {  // the last group's tail
      const int count = k1 - k < 16 ? static_cast<int>(k1 - k) : 16;
      __m512 w[kRows];
      for (int r = 0; r < kRows; ++r) w[r] = nibble_values16<F>(rows[r], k, count);
      for (int t = 0; t < kTokens; ++t) {
        const __m512 xv = _mm512_maskz_loadu_ps(first_lanes(count), x + t * ld_x + k);
        for (int r = 0; r < kRows; ++r) part[r][t] = _mm512_fmadd_ps(w[r], xv, part[r][t]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const float scale = F == QFormat::kMxfp4 ? e8m0_value(static_cast<const uint8_t*>(rows[r].scale)[g])
                                               : group_scale(m, rows[r], g);
      const __m512 sv = _mm512_set1_ps(scale);
      for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_fmadd_ps(part[r][t], sv, acc[r][t]);
      if constexpr (F == QFormat::kInt4) {
        const float z = rows[r].zero != nullptr ? static_cast<float>(rows[r].zero[g]) : 8.0f;
        for (int t = 0; t < kTokens; ++t) zero_terms[r][t] += z * scale * group_x_sums[t * ld_sums + g];
      }
    }
  }
  for (int t = 0; t < kTokens; ++t)
    for (int r = 0; r < kRows; ++r) out[t * ld_out + r] = _mm512_reduce_add_ps(acc[r][t]) - zero_terms[r][t];
}

// The nibble formats' rows_block: tokens 2 at a time (4 rows x 2 tokens x 2 accumulator sets fill 16
// zmm registers), the first pair prefetching the next rows.
template <QFormat F, int kRows>
inline void nibble_rows_block(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m, int64_t row0,
                              float* out, int64_t ld_out, int64_t next_row0, const float* sums, int64_t ld_sums) {
  QuantRow rows[kRows], next_rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = row_of(m, row0 + r);
  const QuantRow* next = nullptr;
  if (next_row0 >= 0) {
    for (int r = 0; r < kRows; ++r) next_rows[r] = row_of(m, next_row0 + r);
    next = next_rows;
  }
  int64_t t = 0;
  for (; t + 2 <= num_tokens; t += 2, next = nullptr)
    micro_tile_nibbles<F, kRows, 2>(x + t * ld_x, ld_x, m, rows, out + t * ld_out, ld_out, next, sums + t * ld_sums,
                                    ld_sums);
  if (t < num_tokens)
    micro_tile_nibbles<F, kRows, 1>(x + t * ld_x, ld_x, m, rows, out + t * ld_out, ld_out, next, sums + t * ld_sums,
                                    ld_sums);
}

// kRows rows against every token, 4 at a time: the rows stay in L1 across the token groups, so memory
// reads each weight once whatever the token count; the first group prefetches the next rows.
template <QFormat F, int kRows>
inline void rows_block(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m, int64_t row0,
                       float* out, int64_t ld_out, int64_t next_row0) {
  QuantRow rows[kRows], next_rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = row_of(m, row0 + r);
  const QuantRow* next = nullptr;
  if (next_row0 >= 0) {
    for (int r = 0; r < kRows; ++r) next_rows[r] = row_of(m, next_row0 + r);
    next = next_rows;
  }
  int64_t t = 0;
  for (; t + 4 <= num_tokens; t += 4, next = nullptr)
    micro_tile<F, kRows, 4>(x + t * ld_x, ld_x, m, rows, out + t * ld_out, ld_out, next);
  switch (num_tokens - t) {
    case 3: micro_tile<F, kRows, 3>(x + t * ld_x, ld_x, m, rows, out + t * ld_out, ld_out, next); break;
    case 2: micro_tile<F, kRows, 2>(x + t * ld_x, ld_x, m, rows, out + t * ld_out, ld_out, next); break;
    case 1: micro_tile<F, kRows, 1>(x + t * ld_x, ld_x, m, rows, out + t * ld_out, ld_out, next); break;
    default: break;
  }
}

template <QFormat F>
void rows_times_tokens_typed(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m, int64_t row0,
                             int64_t num_rows, float* out, int64_t ld_out) {
  // prefetch about 8 KB ahead (as the float kernels do), in whole 4-row blocks, inside this call's rows
  const int64_t block_bytes = 4 * m.row_bytes;
  const int64_t ahead = block_bytes > 0 ? 4 * ((8192 + block_bytes - 1) / block_bytes) : 4;
  if constexpr (F == QFormat::kInt4 || F == QFormat::kMxfp4) {
    const int64_t G = F == QFormat::kMxfp4 ? 32 : m.group;
    const int64_t groups = (m.cols + G - 1) / G;
    thread_local std::vector<float> sums;  // [token, group]: the zero points' sum of x (int4)
    sums.assign(F == QFormat::kInt4 ? num_tokens * groups : 1, 0.0f);
    if constexpr (F == QFormat::kInt4)
      for (int64_t t = 0; t < num_tokens; ++t)
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t k1 = std::min(m.cols, (g + 1) * G);
          __m512 sum = _mm512_setzero_ps();
          for (int64_t k = g * G; k < k1; k += 16)
            sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(first_lanes(static_cast<int>(k1 - k)), x + t * ld_x + k));
          sums[t * groups + g] = _mm512_reduce_add_ps(sum);
        }
    const int64_t ld_sums = F == QFormat::kInt4 ? groups : 0;
    int64_t r = 0;
    for (; r + 4 <= num_rows; r += 4)
      nibble_rows_block<F, 4>(x, num_tokens, ld_x, m, row0 + r, out + r, ld_out,
                              r + ahead + 4 <= num_rows ? row0 + r + ahead : -1, sums.data(), ld_sums);
    for (; r < num_rows; ++r)
      nibble_rows_block<F, 1>(x, num_tokens, ld_x, m, row0 + r, out + r, ld_out, -1, sums.data(), ld_sums);
    return;
  }
  int64_t r = 0;
  for (; r + 4 <= num_rows; r += 4)
    rows_block<F, 4>(x, num_tokens, ld_x, m, row0 + r, out + r, ld_out, r + ahead + 4 <= num_rows ? row0 + r + ahead : -1);
  if (r + 2 <= num_rows) {
    rows_block<F, 2>(x, num_tokens, ld_x, m, row0 + r, out + r, ld_out, -1);
    r += 2;
  }
  if (r < num_rows) rows_block<F, 1>(x, num_tokens, ld_x, m, row0 + r, out + r, ld_out, -1);
}

template <QFormat F>
void dequant_rows_typed(const QuantMatrix& m, int64_t row0, int64_t num_rows, float* out) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const QuantRow row = row_of(m, row0 + r);
    float* dst = out + r * m.cols;
    int64_t k = 0;
    for (; k + 16 <= m.cols; k += 16) _mm512_storeu_ps(dst + k, load16<F>(m, row, k, 16));
    if (k < m.cols) {
      const int count = static_cast<int>(m.cols - k);
      _mm512_mask_storeu_ps(dst + k, first_lanes(count), load16<F>(m, row, k, count));
    }
  }
}

}  // namespace

void quant_rows_times_tokens_avx512(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m,
                                    int64_t row0, int64_t num_rows, float* out, int64_t ld_out) {
  with_format(m.format, [&](auto f) {
    rows_times_tokens_typed<decltype(f)::value>(x, num_tokens, ld_x, m, row0, num_rows, out, ld_out);
  });
}

void dequant_rows_avx512(const QuantMatrix& m, int64_t row0, int64_t num_rows, float* out) {
  with_format(m.format, [&](auto f) { dequant_rows_typed<decltype(f)::value>(m, row0, num_rows, out); });
}

}  // namespace moe_swap::cpu

#pragma GCC pop_options

#endif  // MOE_SWAP_HAVE_X86_KERNELS
