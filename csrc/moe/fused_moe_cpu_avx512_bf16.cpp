// AVX512_BF16 build of the fused_moe CPU matrix loop for bfloat16 weights (see fused_moe_cpu_kernels.h):
// vdpbf16ps multiplies bfloat16 pairs and accumulates in float32. The activations are rounded to
// bfloat16 for it, which loses nothing under fused_moe's rounding contract: with bfloat16 weights the
// hidden states are bfloat16 and the activated intermediate is rounded to bfloat16 before the down
// projection, so every float the kernel receives is a bfloat16 value. float32 and float16 weights
// take the AVX-512 build. Compiled for the ISA through the target pragma, no torch header included;
// only runs when CPUID has avx512_bf16.
#include "moe/fused_moe_cpu_kernels.h"

#if defined(MOE_SWAP_HAVE_X86_KERNELS)

#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

namespace moe_swap::cpu {
namespace {

constexpr int kPairLanes = 32;  // bfloat16 elements per zmm register

inline __mmask16 first_lanes16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? static_cast<__mmask16>(0)
                                                            : static_cast<__mmask16>((1u << n) - 1u);
}

// 32 floats of one token as bfloat16, in order (the conversion is exact for bfloat16 values).
inline __m512bh tokens_as_bf16(const float* x) {
  return _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x));
}

inline __m512bh tokens_as_bf16_tail(const float* x, int64_t len) {
  return _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(first_lanes16(len - 16), x + 16),
                             _mm512_maskz_loadu_ps(first_lanes16(len), x));
}

inline __m512bh weights_bf16(const uint16_t* w) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(w)); }

inline __m512bh weights_bf16_tail(const uint16_t* w, int64_t len) {
  const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << len) - 1u);
  return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, w));
}

// kRows weight rows against kTokens tokens, kRows * kTokens float32 accumulators of 16 lanes, each lane
// the sum of two neighbouring products.
template <int kRows, int kTokens>
inline void micro_tile(const float* x, int64_t ld_x, const uint16_t* w, int64_t ld_w, int64_t depth, float* out,
                       int64_t ld_out) {
  __m512 acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t h = 0;
  for (; h + kPairLanes <= depth; h += kPairLanes) {
    __m512bh wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = weights_bf16(w + r * ld_w + h);
    for (int t = 0; t < kTokens; ++t) {
      const __m512bh xv = tokens_as_bf16(x + t * ld_x + h);
      for (int r = 0; r < kRows; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
    }
  }
  if (h < depth) {
    const int64_t len = depth - h;
    __m512bh wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = weights_bf16_tail(w + r * ld_w + h, len);
    for (int t = 0; t < kTokens; ++t) {
      const __m512bh xv = tokens_as_bf16_tail(x + t * ld_x + h, len);
      for (int r = 0; r < kRows; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
    }
  }
  for (int t = 0; t < kTokens; ++t)
    for (int r = 0; r < kRows; ++r) out[t * ld_out + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int kRows>
inline void rows_block(const float* x, int64_t num_tokens, int64_t ld_x, const uint16_t* w, int64_t ld_w,
                       int64_t depth, float* out, int64_t ld_out) {
  int64_t t = 0;
  for (; t + 4 <= num_tokens; t += 4) micro_tile<kRows, 4>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out);
  switch (num_tokens - t) {
    case 3: micro_tile<kRows, 3>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out); break;
    case 2: micro_tile<kRows, 2>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out); break;
    case 1: micro_tile<kRows, 1>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out); break;
    default: break;
  }
}

}  // namespace

void rows_times_tokens_avx512_bf16(const float* x, int64_t num_tokens, int64_t ld_x, const void* w,
                                   WeightType w_type, int64_t num_rows, int64_t ld_w, int64_t depth, float* out,
                                   int64_t ld_out) {
  if (w_type != WeightType::kBFloat16)
    return rows_times_tokens_avx512(x, num_tokens, ld_x, w, w_type, num_rows, ld_w, depth, out, ld_out);
  const uint16_t* rows = static_cast<const uint16_t*>(w);
  int64_t r = 0;
  for (; r + 4 <= num_rows; r += 4) rows_block<4>(x, num_tokens, ld_x, rows + r * ld_w, ld_w, depth, out + r, ld_out);
  if (r + 2 <= num_rows) {
    rows_block<2>(x, num_tokens, ld_x, rows + r * ld_w, ld_w, depth, out + r, ld_out);
    r += 2;
  }
  if (r < num_rows) rows_block<1>(x, num_tokens, ld_x, rows + r * ld_w, ld_w, depth, out + r, ld_out);
}

}  // namespace moe_swap::cpu

#pragma GCC pop_options

#endif  // MOE_SWAP_HAVE_X86_KERNELS
