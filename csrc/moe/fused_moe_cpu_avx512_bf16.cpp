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

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

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
// next_rows: the rows read after these (nullptr: none), prefetched a cache line per row per step (each
// step reads one line of each of its rows): rows of 1-6 KB end before the hardware prefetcher ramps up.
template <int kRows, int kTokens>
inline void micro_tile(const float* x, int64_t ld_x, const uint16_t* w, int64_t ld_w, int64_t depth, float* out,
                       int64_t ld_out, const uint16_t* next_rows = nullptr) {
  __m512 acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t h = 0;
  for (; h + kPairLanes <= depth; h += kPairLanes) {
    if (next_rows != nullptr)
      for (int r = 0; r < kRows; ++r) _mm_prefetch(reinterpret_cast<const char*>(next_rows + r * ld_w + h), _MM_HINT_T0);
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
                       int64_t depth, float* out, int64_t ld_out, const uint16_t* next_rows = nullptr) {
  int64_t t = 0;
  for (; t + 4 <= num_tokens; t += 4, next_rows = nullptr)  // the first token group prefetches
    micro_tile<kRows, 4>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out, next_rows);
  switch (num_tokens - t) {
    case 3: micro_tile<kRows, 3>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out, next_rows); break;
    case 2: micro_tile<kRows, 2>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out, next_rows); break;
    case 1: micro_tile<kRows, 1>(x + t * ld_x, ld_x, w, ld_w, depth, out + t * ld_out, ld_out, next_rows); break;
    default: break;
  }
}

// Many tokens: the weights repacked so that one vector holds 16 rows' values at one pair of depths
// (packed[p][r] = (w[r][2p], w[r][2p+1])), each multiplied by one token's pair broadcast into all lanes:
// 16 rows' partial sums per accumulator, no horizontal sums, and each weight vector used by up to
// kGroupTokens tokens from registers. The products are compute-bound from ~8 tokens on; the repacking
// (a 16x16 transpose of 32-bit pairs per 512 weights) costs a few per cent of the products at that size.
constexpr int kPanelRows = 32;    // two vectors of 16 rows
constexpr int kGroupTokens = 12;  // 2 x 12 accumulators + 2 weight vectors of the 32 zmm registers
constexpr int64_t kChunkTokens = 8 * kGroupTokens;  // tokens converted at once (bounds the buffer)

// Rows [0, rows) x pairs [0, pairs) of 32-bit pairs (rows of ld_pairs), zero-filled up to 16 x 16 and
// transposed into dst[p * 16 + r] for p < 16 (dst row stride dst_stride). src rows past `rows`, pairs
// past `pairs` are not read.
inline void transpose_16x16_pairs(const uint32_t* src, int64_t ld_pairs, int64_t rows, int64_t pairs, uint32_t* dst,
                                  int64_t dst_stride) {
  const __mmask16 mask = first_lanes16(pairs);
  __m512i r[16];
  for (int i = 0; i < 16; ++i)
    r[i] = i < rows ? _mm512_maskz_loadu_epi32(mask, src + i * ld_pairs) : _mm512_setzero_si512();
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: (r2i[0] r2i+1[0] r2i[1] r2i+1[1]), (.. [2] .. [3])
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + m], lane j: rows 4g..4g+3 of column 4j + m
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // column 4j + m = lane j of u[m], u[4 + m], u[8 + m], u[12 + m]
    const __m512i v0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x88), v1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xdd);
    _mm512_storeu_si512(dst + (0 + m) * dst_stride, _mm512_shuffle_i32x4(v0, w0, 0x88));
    _mm512_storeu_si512(dst + (4 + m) * dst_stride, _mm512_shuffle_i32x4(v1, w1, 0x88));
    _mm512_storeu_si512(dst + (8 + m) * dst_stride, _mm512_shuffle_i32x4(v0, w0, 0xdd));
    _mm512_storeu_si512(dst + (12 + m) * dst_stride, _mm512_shuffle_i32x4(v1, w1, 0xdd));
  }
}

// kTokens tokens (pairs of row stride ld_xp) against one packed panel of 2 x 16 rows over `pairs`
// pairs; `rows` (<= 32) of the outputs are stored.
template <int kTokens>
inline void panel_tile(const uint32_t* xp, int64_t ld_xp, const uint32_t* panel, int64_t pairs, int64_t rows,
                       float* out, int64_t ld_out) {
  __m512 acc0[kTokens], acc1[kTokens];
  for (int t = 0; t < kTokens; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + p * kPanelRows));
    const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + p * kPanelRows + 16));
    for (int t = 0; t < kTokens; ++t) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xp[t * ld_xp + p])));
      acc0[t] = _mm512_dpbf16_ps(acc0[t], w0, xv);
      acc1[t] = _mm512_dpbf16_ps(acc1[t], w1, xv);
    }
  }
  const __mmask16 m0 = first_lanes16(rows), m1 = first_lanes16(rows - 16);
  for (int t = 0; t < kTokens; ++t) {
    _mm512_mask_storeu_ps(out + t * ld_out, m0, acc0[t]);
    if (m1 != 0) _mm512_mask_storeu_ps(out + t * ld_out + 16, m1, acc1[t]);
  }
}

template <int... kCounts>
inline void panel_tile_n(int n, std::integer_sequence<int, kCounts...>, const uint32_t* xp, int64_t ld_xp,
                         const uint32_t* panel, int64_t pairs, int64_t rows, float* out, int64_t ld_out) {
  ((n == kCounts + 1 ? panel_tile<kCounts + 1>(xp, ld_xp, panel, pairs, rows, out, ld_out) : void()), ...);
}

void rows_times_tokens_packed(const float* x, int64_t num_tokens, int64_t ld_x, const uint16_t* w, int64_t num_rows,
                              int64_t ld_w, int64_t depth, float* out, int64_t ld_out) {
  const int64_t pairs = (depth + 1) / 2;
  const int64_t pairs_padded = (pairs + 15) / 16 * 16;
  const int64_t num_panels = (num_rows + kPanelRows - 1) / kPanelRows;
  // Kept per thread across calls: no allocation once the largest tile has been seen.
  thread_local std::vector<uint32_t> packed, tokens;
  packed.resize(num_panels * pairs_padded * kPanelRows);
  tokens.resize(std::min(num_tokens, kChunkTokens) * pairs_padded);
  // An odd depth: the last pair's second half must read as zero, so odd rows are copied through a
  // zero-padded row (a 32-bit load at the last pair would read one element past the row).
  thread_local std::vector<uint16_t> odd_row;
  const bool odd = depth % 2 != 0 || ld_w % 2 != 0;  // pairs of a row are 32-bit words only when both are even
  for (int64_t panel = 0; panel < num_panels; ++panel) {
    for (int half = 0; half < 2; ++half) {
      const int64_t r0 = panel * kPanelRows + half * 16;
      const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(16, num_rows - r0));
      uint32_t* dst = packed.data() + panel * pairs_padded * kPanelRows + half * 16;
      if (!odd) {
        for (int64_t p0 = 0; p0 < pairs_padded; p0 += 16)
          transpose_16x16_pairs(reinterpret_cast<const uint32_t*>(w + r0 * ld_w) + p0, ld_w / 2, rows,
                                std::max<int64_t>(0, pairs - p0), dst + p0 * kPanelRows, kPanelRows);
      } else {
        odd_row.assign(16 * pairs_padded * 2, 0);
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(odd_row.data() + r * pairs_padded * 2, w + (r0 + r) * ld_w, depth * sizeof(uint16_t));
        for (int64_t p0 = 0; p0 < pairs_padded; p0 += 16)
          transpose_16x16_pairs(reinterpret_cast<const uint32_t*>(odd_row.data()) + p0, pairs_padded, rows,
                                pairs_padded - p0, dst + p0 * kPanelRows, kPanelRows);
      }
    }
  }
  for (int64_t t0 = 0; t0 < num_tokens; t0 += kChunkTokens) {
    const int64_t chunk = std::min(kChunkTokens, num_tokens - t0);
    for (int64_t t = 0; t < chunk; ++t) {
      uint32_t* dst = tokens.data() + t * pairs_padded;
      for (int64_t h = 0; h < 2 * pairs_padded; h += kPairLanes)
        _mm512_storeu_si512(dst + h / 2, reinterpret_cast<__m512i>(
                                             tokens_as_bf16_tail(x + (t0 + t) * ld_x + h, std::max<int64_t>(0, depth - h))));
    }
    for (int64_t panel = 0; panel < num_panels; ++panel) {
      const uint32_t* panel_data = packed.data() + panel * pairs_padded * kPanelRows;
      const int64_t rows = std::min<int64_t>(kPanelRows, num_rows - panel * kPanelRows);
      for (int64_t g = 0; g < chunk; g += kGroupTokens)
        panel_tile_n(static_cast<int>(std::min<int64_t>(kGroupTokens, chunk - g)),
                     std::make_integer_sequence<int, kGroupTokens>{}, tokens.data() + g * pairs_padded, pairs_padded,
                     panel_data, pairs, rows, out + (t0 + g) * ld_out + panel * kPanelRows, ld_out);
    }
  }
}

// From this many tokens the packed products beat the row-times-tokens tiles (which reread the
// tokens and sum across lanes at the end of every row).
constexpr int64_t kPackedFromTokens = 8;

}  // namespace

void rows_times_tokens_avx512_bf16(const float* x, int64_t num_tokens, int64_t ld_x, const void* w,
                                   WeightType w_type, int64_t num_rows, int64_t ld_w, int64_t depth, float* out,
                                   int64_t ld_out) {
  if (w_type != WeightType::kBFloat16)
    return rows_times_tokens_avx512(x, num_tokens, ld_x, w, w_type, num_rows, ld_w, depth, out, ld_out);
  const uint16_t* rows = static_cast<const uint16_t*>(w);
  if (num_tokens >= kPackedFromTokens)
    return rows_times_tokens_packed(x, num_tokens, ld_x, rows, num_rows, ld_w, depth, out, ld_out);
  int64_t r = 0;
  // Prefetch the block about 8 KB ahead (the distance the AVX2 build measured best).
  const int64_t ahead = std::max<int64_t>(1, (8192 + 8 * ld_w - 1) / std::max<int64_t>(1, 8 * ld_w));
  for (; r + 4 <= num_rows; r += 4)
    rows_block<4>(x, num_tokens, ld_x, rows + r * ld_w, ld_w, depth, out + r, ld_out,
                  r + 4 * (ahead + 1) <= num_rows ? rows + (r + 4 * ahead) * ld_w : nullptr);
  if (r + 2 <= num_rows) {
    rows_block<2>(x, num_tokens, ld_x, rows + r * ld_w, ld_w, depth, out + r, ld_out);
    r += 2;
  }
  if (r < num_rows) rows_block<1>(x, num_tokens, ld_x, rows + r * ld_w, ld_w, depth, out + r, ld_out);
}

}  // namespace moe_swap::cpu

#pragma GCC pop_options

#endif  // MOE_SWAP_HAVE_X86_KERNELS
