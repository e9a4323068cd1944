// AVX-512 builds of the fused_moe CPU inner loops (see fused_moe_cpu_kernels.h). This file is compiled
// for AVX-512 through the target pragma below and includes no torch header, so no inline torch code
// compiled for AVX-512 can leak into the rest of the library; it only runs when the CPU has AVX-512.
#include "moe/fused_moe_cpu_kernels.h"

#if defined(MOE_SWAP_HAVE_X86_KERNELS)

#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

namespace moe_swap::cpu {
namespace {

constexpr int kLanes = 16;

template <WeightType W>
inline __m512 load_weights(const void* base, int64_t index) {
  if constexpr (W == WeightType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + index);
  } else {
    const __m256i bits =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + index));
    if constexpr (W == WeightType::kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    } else {
      return _mm512_cvtph_ps(bits);
    }
  }
}

template <WeightType W>
inline __m512 load_weights_masked(const void* base, int64_t index, __mmask16 mask) {
  if constexpr (W == WeightType::kFloat32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + index);
  } else {
    const __m256i bits = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + index);
    if constexpr (W == WeightType::kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    } else {
      return _mm512_cvtph_ps(bits);
    }
  }
}

inline int64_t element_bytes(WeightType w) { return w == WeightType::kFloat32 ? 4 : 2; }

// kRows weight rows against kTokens tokens: kRows * kTokens accumulators (4 x 4 = 16 of the 32 zmm
// registers), each weight vector loaded once and used kTokens times, each token vector kRows times.
template <WeightType W, int kRows, int kTokens>
inline void micro_tile(const float* x, int64_t ld_x, const void* w, int64_t ld_w, int64_t depth, float* out,
                       int64_t ld_out) {
  __m512 acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_setzero_ps();
  const char* w_bytes = static_cast<const char*>(w);
  const int64_t row_bytes = ld_w * element_bytes(W);
  int64_t h = 0;
  for (; h + kLanes <= depth; h += kLanes) {
    __m512 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = load_weights<W>(w_bytes + r * row_bytes, h);
    for (int t = 0; t < kTokens; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * ld_x + h);
      for (int r = 0; r < kRows; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  if (h < depth) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (depth - h)) - 1u);
    __m512 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = load_weights_masked<W>(w_bytes + r * row_bytes, h, mask);
    for (int t = 0; t < kTokens; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + t * ld_x + h);
      for (int r = 0; r < kRows; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int t = 0; t < kTokens; ++t)
    for (int r = 0; r < kRows; ++r) out[t * ld_out + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <WeightType W, int kRows>
inline void rows_block(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, int64_t ld_w,
                       int64_t depth, float* out, int64_t ld_out) {
  int64_t t = 0;
  for (; t + 4 <= num_tokens; t += 4) micro_tile<W, kRows, 4>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out);
  switch (num_tokens - t) {
    case 3: micro_tile<W, kRows, 3>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out); break;
    case 2: micro_tile<W, kRows, 2>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out); break;
    case 1: micro_tile<W, kRows, 1>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out); break;
    default: break;
  }
}

template <WeightType W>
void rows_times_tokens_typed(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, int64_t num_rows,
                             int64_t ld_w, int64_t depth, float* out, int64_t ld_out) {
  const char* w_bytes = static_cast<const char*>(w);
  const int64_t row_bytes = ld_w * element_bytes(W);
  int64_t r = 0;
  for (; r + 4 <= num_rows; r += 4) rows_block<W, 4>(x, num_tokens, ld_x, w_bytes + r * row_bytes, ld_w, depth, out + r, ld_out);
  if (r + 2 <= num_rows) {
    rows_block<W, 2>(x, num_tokens, ld_x, w_bytes + r * row_bytes, ld_w, depth, out + r, ld_out);
    r += 2;
  }
  if (r < num_rows) rows_block<W, 1>(x, num_tokens, ld_x, w_bytes + r * row_bytes, ld_w, depth, out + r, ld_out);
}

// e^x: round x / ln2 to n, a degree-6 polynomial on the remainder, times 2^n (scalef), ~1 ulp.
inline __m512 exp_ps(__m512 x) {
  // min/max return their second operand when one is NaN, so NaN passes through.
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(88.7f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// x * sigmoid(z) = x / (1 + e^-z)
inline __m512 x_times_sigmoid(__m512 x, __m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(x, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), z))));
}

// x * Phi(x) with erfc from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), so the negative side has
// no cancellation: 1 + erf(x/sqrt2) = erfc(|x|/sqrt2) for x < 0, 2 - erfc(..) for x >= 0.
inline __m512 gelu_erf_ps(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), z, one));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const __m512 erfc = _mm512_mul_ps(poly, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z))));
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one_plus_erf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(2.0f), erfc), erfc);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), one_plus_erf);
}

// 0.5 x (1 + tanh(u)) = x / (1 + e^-2u), u = sqrt(2/pi) (x + 0.044715 x^3)
inline __m512 gelu_tanh_ps(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f),
                                 _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
  return x_times_sigmoid(x, _mm512_add_ps(u, u));
}

// Round to bfloat16 (nearest, ties to even) and back; NaN stays NaN.
inline __m512 round_bf16_ps(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  rounded = _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(is_nan, _mm512_castsi512_ps(rounded), v);
}

inline __m512 round_f16_ps(__m512 v) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline __m512 relu2_ps(__m512 x) {
  const __m512 r = _mm512_max_ps(_mm512_setzero_ps(), x);  // returns x when x is NaN, as torch.relu
  return _mm512_mul_ps(r, r);
}

template <int kActivation>
inline __m512 activate_ps(__m512 x) {
  if constexpr (kActivation == 0) return x_times_sigmoid(x, x);
  if constexpr (kActivation == 1) return gelu_erf_ps(x);
  if constexpr (kActivation == 2) return gelu_tanh_ps(x);
  return relu2_ps(x);
}

inline __m512 load_bias(const float* bias, int64_t i, __mmask16 mask) {
  return bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + i) : _mm512_setzero_ps();
}

template <int kActivation, bool kGated, WeightType kRound>
void act_and_mul_typed(const float* gate, const float* up, const float* gate_bias, const float* up_bias, float* out,
                       int64_t n, const ActParams& act) {
  const __m512 limit = _mm512_set1_ps(act.swiglu_limit);
  const __m512 neg_limit = _mm512_set1_ps(-act.swiglu_limit);
  const __m512 alpha = _mm512_set1_ps(act.swiglu_alpha);
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 mask = n - i >= kLanes ? static_cast<__mmask16>(0xFFFF)
                                           : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 u = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, up + i), load_bias(up_bias, i, mask));
    __m512 h;
    if constexpr (!kGated) {
      h = activate_ps<kActivation>(u);
    } else {
      const __m512 g = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, gate + i), load_bias(gate_bias, i, mask));
      if constexpr (kActivation == 4) {
        // min/max return their second operand when one is NaN: NaN passes through, as torch.clamp
        const __m512 gc = _mm512_min_ps(limit, g);
        const __m512 uc = _mm512_max_ps(neg_limit, _mm512_min_ps(limit, u));
        h = _mm512_mul_ps(_mm512_add_ps(uc, _mm512_set1_ps(1.0f)), x_times_sigmoid(gc, _mm512_mul_ps(alpha, gc)));
      } else if constexpr (kActivation == 5) {  // silu_clamp: the same clamps, silu(g) * u
        const __m512 gc = _mm512_min_ps(limit, g);
        const __m512 uc = _mm512_max_ps(neg_limit, _mm512_min_ps(limit, u));
        h = _mm512_mul_ps(x_times_sigmoid(gc, gc), uc);
      } else {
        h = _mm512_mul_ps(activate_ps<kActivation>(g), u);
      }
    }
    if constexpr (kRound == WeightType::kBFloat16) h = round_bf16_ps(h);
    if constexpr (kRound == WeightType::kFloat16) h = round_f16_ps(h);
    _mm512_mask_storeu_ps(out + i, mask, h);
  }
}

template <int kActivation, bool kGated>
void act_and_mul_round(const float* gate, const float* up, const float* gate_bias, const float* up_bias, float* out,
                       int64_t n, const ActParams& act, WeightType round_to) {
  switch (round_to) {
    case WeightType::kFloat32:
      return act_and_mul_typed<kActivation, kGated, WeightType::kFloat32>(gate, up, gate_bias, up_bias, out, n, act);
    case WeightType::kBFloat16:
      return act_and_mul_typed<kActivation, kGated, WeightType::kBFloat16>(gate, up, gate_bias, up_bias, out, n, act);
    case WeightType::kFloat16:
      return act_and_mul_typed<kActivation, kGated, WeightType::kFloat16>(gate, up, gate_bias, up_bias, out, n, act);
  }
}

template <int kActivation>
void act_and_mul_gated(const float* gate, const float* up, const float* gate_bias, const float* up_bias, float* out,
                       int64_t n, const ActParams& act, WeightType round_to) {
  if (gate != nullptr) return act_and_mul_round<kActivation, true>(gate, up, gate_bias, up_bias, out, n, act, round_to);
  // swiglu_clamp and silu_clamp are gated only (checked before the kernels run); no ungated build of them
  if constexpr (kActivation != 4 && kActivation != 5) act_and_mul_round<kActivation, false>(gate, up, gate_bias, up_bias, out, n, act, round_to);
}

}  // namespace

void rows_times_tokens_avx512(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, WeightType w_type,
                              int64_t num_rows, int64_t ld_w, int64_t depth, float* out, int64_t ld_out) {
  with_weight_type(w_type, [&](auto type) {
    rows_times_tokens_typed<decltype(type)::value>(x, num_tokens, ld_x, w, num_rows, ld_w, depth, out, ld_out);
  });
}

void act_and_mul_avx512(const float* gate, const float* up, const float* gate_bias, const float* up_bias,
                        float* out, int64_t n, const ActParams& act, WeightType round_to) {
  switch (act.activation) {
    case 0: return act_and_mul_gated<0>(gate, up, gate_bias, up_bias, out, n, act, round_to);
    case 1: return act_and_mul_gated<1>(gate, up, gate_bias, up_bias, out, n, act, round_to);
    case 2: return act_and_mul_gated<2>(gate, up, gate_bias, up_bias, out, n, act, round_to);
    case 3: return act_and_mul_gated<3>(gate, up, gate_bias, up_bias, out, n, act, round_to);
    case 4: return act_and_mul_gated<4>(gate, up, gate_bias, up_bias, out, n, act, round_to);
    default: return act_and_mul_gated<5>(gate, up, gate_bias, up_bias, out, n, act, round_to);
  }
}

}  // namespace moe_swap::cpu

#pragma GCC pop_options

#endif  // MOE_SWAP_HAVE_X86_KERNELS
