// AVX-512 build of the fused_moe_quant CPU inner loops (see quant_cpu_kernels.h): each step decodes 16
// consecutive weights of a row into one zmm (fp8 through float16 bits, e2m1 through a 16-entry permute,
// nibbles through byte unpacks), scales them, and multiplies them into every token of the tile. Compiled
// for AVX-512 by the target pragma, no torch header; runs only when CPUID has AVX-512.
#include "moe/quant/quant_cpu_kernels.h"

#if defined(MOE_SWAP_HAVE_X86_KERNELS)

#include <immintrin.h>

#include <type_traits>

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

// Weights k .. k + count - 1 of a row (k a multiple of 16, count <= 16) as float32; lanes past count are 0.
template <QFormat F>
inline __m512 load16(const QuantMatrix& m, const QuantRow& row, int64_t k, int count) {
  const __mmask16 mask = first_lanes(count);
  if constexpr (F == QFormat::kFp8Block) {
    const __m128i b = _mm_maskz_loadu_epi8(mask, row.q + k);
    const __m256i w = _mm256_cvtepu8_epi16(b);
    // sign to bit 15, exponent and mantissa to bits 7..14: a float16 of 2^-8 times the e4m3 value
    // (subnormals too); the 2^8 joins the block scale, so the product is the reference's q * s.
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8),
                                      _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)), 7));
    const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(row.scale_f32[k / 128] * 256.0f));
    const __mmask16 nan = _mm_cmpeq_epi8_mask(_mm_and_si128(b, _mm_set1_epi8(0x7F)), _mm_set1_epi8(0x7F));
    return _mm512_mask_mov_ps(v, static_cast<__mmask16>(nan & mask), _mm512_set1_ps(float_from_bits(0x7FC00000u)));
  } else if constexpr (F == QFormat::kInt8) {
    const __m128i b = _mm_maskz_loadu_epi8(mask, row.q + k);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(*row.scale_f32));
  } else if constexpr (F == QFormat::kInt4) {
    const __mmask16 bytes = first_lanes((count + 1) / 2);
    const __m512 u = _mm512_cvtepi32_ps(nibbles16(row.q + k / 2, bytes));
    const int64_t g = k / m.group;
    const float z = row.zero != nullptr ? static_cast<float>(row.zero[g]) : 8.0f;
    return _mm512_maskz_mul_ps(mask, _mm512_sub_ps(u, _mm512_set1_ps(z)),
                               _mm512_set1_ps(scale_value(row.scale, m.scale_type, g)));
  } else {
    const __mmask16 bytes = first_lanes((count + 1) / 2);
    const __m512i codes = nibbles16(row.q + (k / 32) * 16 + (k % 32) / 2, bytes);
    const __m512 v = _mm512_permutexvar_ps(codes, _mm512_loadu_ps(kE2m1Values));
    return _mm512_maskz_mul_ps(mask, v, _mm512_set1_ps(e8m0_value(static_cast<const uint8_t*>(row.scale)[k / 32])));
  }
}

// kRows weight rows against kTokens tokens (4 x 4 = 16 zmm accumulators): each decoded weight vector is
// used kTokens times, each token vector kRows times.
template <QFormat F, int kRows, int kTokens>
inline void micro_tile(const float* x, int64_t ld_x, const QuantMatrix& m, const QuantRow (&rows)[kRows], float* out,
                       int64_t ld_out) {
  __m512 acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t K = m.cols;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
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

template <QFormat F, int kRows>
inline void rows_block(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m, int64_t row0,
                       float* out, int64_t ld_out) {
  QuantRow rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = row_of(m, row0 + r);
  int64_t t = 0;
  for (; t + 4 <= num_tokens; t += 4) micro_tile<F, kRows, 4>(x + t * ld_x, ld_x, m, rows, out + t * ld_out, ld_out);
  switch (num_tokens - t) {
    case 3: micro_tile<F, kRows, 3>(x + t * ld_x, ld_x, m, rows, out + t * ld_out, ld_out); break;
    case 2: micro_tile<F, kRows, 2>(x + t * ld_x, ld_x, m, rows, out + t * ld_out, ld_out); break;
    case 1: micro_tile<F, kRows, 1>(x + t * ld_x, ld_x, m, rows, out + t * ld_out, ld_out); break;
    default: break;
  }
}

template <QFormat F>
void rows_times_tokens_typed(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m, int64_t row0,
                             int64_t num_rows, float* out, int64_t ld_out) {
  int64_t r = 0;
  for (; r + 4 <= num_rows; r += 4) rows_block<F, 4>(x, num_tokens, ld_x, m, row0 + r, out + r, ld_out);
  if (r + 2 <= num_rows) {
    rows_block<F, 2>(x, num_tokens, ld_x, m, row0 + r, out + r, ld_out);
    r += 2;
  }
  if (r < num_rows) rows_block<F, 1>(x, num_tokens, ld_x, m, row0 + r, out + r, ld_out);
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
