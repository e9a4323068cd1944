// AVX2 build of the fused_moe_quant CPU inner loops (see quant_cpu_kernels.h): as the AVX-512 build, 8
// weights per step (fp8 through F16C, e2m1 through an 8-entry permute of the magnitudes and the sign
// bit). A row's last partial step goes through a zero-padded copy (AVX2 has no byte-masked loads).
// Compiled for AVX2 + FMA + F16C by the target pragma, no torch header; runs only when CPUID has them.
#include "moe/quant/quant_cpu_kernels.h"

#if defined(MOE_SWAP_HAVE_X86_KERNELS)

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace moe_swap::cpu {
namespace {

inline __m256i nibbles8(uint32_t four_bytes) {
  const __m128i b = _mm_cvtsi32_si128(static_cast<int>(four_bytes));
  const __m128i low = _mm_and_si128(b, _mm_set1_epi8(0x0F));
  const __m128i high = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
  return _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(low, high));
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Weights k .. k + 7 of a row (k a multiple of 8, all 8 inside the row) as float32.
template <QFormat F>
inline __m256 load8(const QuantMatrix& m, const QuantRow& row, int64_t k) {
  if constexpr (F == QFormat::kFp8Block) {
    // float32 bits of 2^-120 times the e4m3 value (see the AVX-512 build), then * 2^120 * the block scale
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row.q + k)));
    const __m256i bits = _mm256_and_si256(_mm256_slli_epi32(v, 20), _mm256_set1_epi32(static_cast<int>(0x87F00000u)));
    const __m256 value = _mm256_mul_ps(_mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0x1p120f)),
                                       _mm256_set1_ps(row.scale_f32[k / 128]));
    const __m256i nan = _mm256_cmpeq_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x07F00000)),
                                           _mm256_set1_epi32(0x07F00000));
    return _mm256_blendv_ps(value, _mm256_set1_ps(float_from_bits(0x7FC00000u)), _mm256_castsi256_ps(nan));
  } else if constexpr (F == QFormat::kInt8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row.q + k));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_set1_ps(*row.scale_f32));
  } else if constexpr (F == QFormat::kInt4) {
    const __m256 u = _mm256_cvtepi32_ps(nibbles8(load_u32(row.q + k / 2)));
    const int64_t g = k / m.group;
    const float z = row.zero != nullptr ? static_cast<float>(row.zero[g]) : 8.0f;
    return _mm256_mul_ps(_mm256_sub_ps(u, _mm256_set1_ps(z)), _mm256_set1_ps(m.scale_type == WeightType::kFloat16 ? _cvtsh_ss(static_cast<const uint16_t*>(row.scale)[g]) : scale_value(row.scale, m.scale_type, g)));
  } else {
    const __m256i codes = nibbles8(load_u32(row.q + (k / 32) * 16 + (k % 32) / 2));
    const __m256 magnitude = _mm256_permutevar8x32_ps(_mm256_loadu_ps(kE2m1Values), _mm256_and_si256(codes, _mm256_set1_epi32(7)));
    const __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(codes, _mm256_set1_epi32(8)), 28));
    return _mm256_mul_ps(_mm256_xor_ps(magnitude, sign),
                         _mm256_set1_ps(e8m0_value(static_cast<const uint8_t*>(row.scale)[k / 32])));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// kRows rows against kTokens tokens (4 x 2 = 8 ymm accumulators of the 16).
template <QFormat F, int kRows, int kTokens>
inline void micro_tile(const float* x, int64_t ld_x, const QuantMatrix& m, const QuantRow (&rows)[kRows],
                       int64_t row0, float* out, int64_t ld_out) {
  __m256 acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t K = m.cols;
  const int64_t main = K / 8 * 8;
  for (int64_t k = 0; k < main; k += 8) {
    __m256 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = load8<F>(m, rows[r], k);
    for (int t = 0; t < kTokens; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * ld_x + k);
      for (int r = 0; r < kRows; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  float tail[kTokens][kRows] = {};
  for (int64_t k = main; k < K; ++k)
    for (int r = 0; r < kRows; ++r) {
      const float w = dequant_value(m, row0 + r, k);
      for (int t = 0; t < kTokens; ++t) tail[t][r] += w * x[t * ld_x + k];
    }
  for (int t = 0; t < kTokens; ++t)
    for (int r = 0; r < kRows; ++r) out[t * ld_out + r] = hsum(acc[r][t]) + tail[t][r];
}

template <QFormat F, int kRows>
inline void rows_block(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m, int64_t row0,
                       float* out, int64_t ld_out) {
  QuantRow rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = row_of(m, row0 + r);
  int64_t t = 0;
  for (; t + 2 <= num_tokens; t += 2)
    micro_tile<F, kRows, 2>(x + t * ld_x, ld_x, m, rows, row0, out + t * ld_out, ld_out);
  if (t < num_tokens) micro_tile<F, kRows, 1>(x + t * ld_x, ld_x, m, rows, row0, out + t * ld_out, ld_out);
}

template <QFormat F>
void rows_times_tokens_typed(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m, int64_t row0,
                             int64_t num_rows, float* out, int64_t ld_out) {
  int64_t r = 0;
  for (; r + 4 <= num_rows; r += 4) rows_block<F, 4>(x, num_tokens, ld_x, m, row0 + r, out + r, ld_out);
  for (; r < num_rows; ++r) rows_block<F, 1>(x, num_tokens, ld_x, m, row0 + r, out + r, ld_out);
}

template <QFormat F>
void dequant_rows_typed(const QuantMatrix& m, int64_t row0, int64_t num_rows, float* out) {
  const int64_t main = m.cols / 8 * 8;
  for (int64_t r = 0; r < num_rows; ++r) {
    const QuantRow row = row_of(m, row0 + r);
    float* dst = out + r * m.cols;
    for (int64_t k = 0; k < main; k += 8) _mm256_storeu_ps(dst + k, load8<F>(m, row, k));
    for (int64_t k = main; k < m.cols; ++k) dst[k] = dequant_value(m, row0 + r, k);
  }
}

}  // namespace

void quant_rows_times_tokens_avx2(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m,
                                  int64_t row0, int64_t num_rows, float* out, int64_t ld_out) {
  with_format(m.format, [&](auto f) {
    rows_times_tokens_typed<decltype(f)::value>(x, num_tokens, ld_x, m, row0, num_rows, out, ld_out);
  });
}

void dequant_rows_avx2(const QuantMatrix& m, int64_t row0, int64_t num_rows, float* out) {
  with_format(m.format, [&](auto f) { dequant_rows_typed<decltype(f)::value>(m, row0, num_rows, out); });
}

}  // namespace moe_swap::cpu

#pragma GCC pop_options

#endif  // MOE_SWAP_HAVE_X86_KERNELS
