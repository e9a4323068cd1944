// AVX2/FMA builds of the fused_moe CPU matrix loop (see fused_moe_cpu_kernels.h), with F16C for float16
// weights. Compiled for that ISA through the target pragma below, includes no torch header (so no inline
// torch code compiled for AVX2 leaks into the rest of the library), and only runs when CPUID has them.
#include "moe/fused_moe_cpu_kernels.h"

#if defined(MOE_SWAP_HAVE_X86_KERNELS)

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <utility>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace moe_swap::cpu {
namespace {

constexpr int kLanes = 8;

template <WeightType W>
inline __m256 widen(__m128i bits) {
  if constexpr (W == WeightType::kBFloat16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  } else {
    return _mm256_cvtph_ps(bits);
  }
}

template <WeightType W>
inline __m256 load_weights(const char* row, int64_t h) {
  if constexpr (W == WeightType::kFloat32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + h);
  } else {
    return widen<W>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(row) + h)));
  }
}

// The last depth % 8 elements: AVX2 has no masked 16-bit load, so copy them into a zeroed vector.
template <WeightType W>
inline __m256 load_weights_tail(const char* row, int64_t h, int64_t len) {
  if constexpr (W == WeightType::kFloat32) {
    float buf[kLanes] = {};
    std::memcpy(buf, reinterpret_cast<const float*>(row) + h, len * sizeof(float));
    return _mm256_loadu_ps(buf);
  } else {
    uint16_t buf[kLanes] = {};
    std::memcpy(buf, reinterpret_cast<const uint16_t*>(row) + h, len * sizeof(uint16_t));
    return widen<W>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(buf)));
  }
}

inline __m256 load_tokens_tail(const float* x, int64_t len) {
  float buf[kLanes] = {};
  std::memcpy(buf, x, len * sizeof(float));
  return _mm256_loadu_ps(buf);
}

inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int64_t element_bytes(WeightType w) { return w == WeightType::kFloat32 ? 4 : 2; }

// kRows weight rows against kTokens tokens in kRows * kTokens accumulators. The 16 ymm registers hold
// the accumulators, kRows weight vectors (each widened once, used kTokens times) and one token vector.
// next_rows: the rows the caller reads after these (nullptr: none), prefetched a cache line per row as
// this tile reads the same line of its own rows. Rows are short (2-6 KB), too short for the hardware
// prefetcher to ramp up before each one ends; this keeps the next block's lines in flight.
template <WeightType W, int kRows, int kTokens>
inline void micro_tile(const float* x, int64_t ld_x, const char* w, int64_t row_bytes, int64_t depth, float* out,
                       int64_t ld_out, const char* next_rows) {
  constexpr int64_t kLineElements = 64 / element_bytes(W);
  __m256 acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm256_setzero_ps();
  int64_t h = 0;
  for (; h + kLanes <= depth; h += kLanes) {
    if (next_rows != nullptr && h % kLineElements == 0)
      for (int r = 0; r < kRows; ++r)
        _mm_prefetch(next_rows + r * row_bytes + h * element_bytes(W), _MM_HINT_T0);
    __m256 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = load_weights<W>(w + r * row_bytes, h);
    for (int t = 0; t < kTokens; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * ld_x + h);
      for (int r = 0; r < kRows; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  if (h < depth) {
    const int64_t len = depth - h;
    __m256 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = load_weights_tail<W>(w + r * row_bytes, h, len);
    for (int t = 0; t < kTokens; ++t) {
      const __m256 xv = load_tokens_tail(x + t * ld_x + h, len);
      for (int r = 0; r < kRows; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int t = 0; t < kTokens; ++t)
    for (int r = 0; r < kRows; ++r) out[t * ld_out + r] = sum_lanes(acc[r][t]);
}

// kRows rows against every token, kMaxTokens at a time; the rows stay in L1 across the token groups,
// so memory reads each weight once whatever the token count.
template <WeightType W, int kRows, int kMaxTokens>
inline void rows_block(const float* x, int64_t num_tokens, int64_t ld_x, const char* w, int64_t row_bytes,
                       int64_t depth, float* out, int64_t ld_out, const char* next_rows) {
  int64_t t = 0;
  for (; t + kMaxTokens <= num_tokens; t += kMaxTokens, next_rows = nullptr)  // the first group prefetches
    micro_tile<W, kRows, kMaxTokens>(x + t * ld_x, ld_x, w, row_bytes, depth, out + t * ld_out, ld_out, next_rows);
  const int64_t rest = num_tokens - t;
  if constexpr (kMaxTokens > 1) {
    if (rest > 0) {
      // The remainder, one template instance per count below kMaxTokens.
      [&]<int... kCounts>(std::integer_sequence<int, kCounts...>) {
        ((rest == kCounts + 1 ? micro_tile<W, kRows, kCounts + 1>(x + t * ld_x, ld_x, w, row_bytes, depth,
                                                                  out + t * ld_out, ld_out, next_rows)
                              : void()),
         ...);
      }(std::make_integer_sequence<int, kMaxTokens - 1>{});
    }
  }
}

// How many blocks ahead to prefetch: about 8 KB, which measured best among 4-32 KB on Zen 3 (the
// hardware prefetchers cover the rest).
inline int64_t prefetch_blocks_ahead(int64_t block_bytes) {
  constexpr int64_t kPrefetchBytes = 8192;
  return block_bytes > 0 ? (kPrefetchBytes + block_bytes - 1) / block_bytes : 1;  // 0: depth 0, nothing to read
}

// Rows in blocks of kRows (then 2, then 1), each against all tokens.
template <WeightType W, int kRows, int kMaxTokens>
void rows_times_tokens_blocked(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, int64_t num_rows,
                               int64_t ld_w, int64_t depth, float* out, int64_t ld_out) {
  const char* w_bytes = static_cast<const char*>(w);
  const int64_t row_bytes = ld_w * element_bytes(W);
  int64_t r = 0;
  for (; r + kRows <= num_rows; r += kRows) {
    const char* rows = w_bytes + r * row_bytes;
    const int64_t ahead = prefetch_blocks_ahead(kRows * row_bytes);
    const char* next_rows = r + (ahead + 1) * kRows <= num_rows ? rows + ahead * kRows * row_bytes : nullptr;
    rows_block<W, kRows, kMaxTokens>(x, num_tokens, ld_x, rows, row_bytes, depth, out + r, ld_out, next_rows);
  }
  if constexpr (kRows > 2) {
    if (r + 2 <= num_rows) {
      rows_block<W, 2, kMaxTokens>(x, num_tokens, ld_x, w_bytes + r * row_bytes, row_bytes, depth, out + r, ld_out,
                                   nullptr);
      r += 2;
    }
  }
  if (r < num_rows)
    rows_block<W, 1, kMaxTokens>(x, num_tokens, ld_x, w_bytes + r * row_bytes, row_bytes, depth, out + r, ld_out,
                                 nullptr);
}

template <WeightType W>
void rows_times_tokens_typed(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, int64_t num_rows,
                             int64_t ld_w, int64_t depth, float* out, int64_t ld_out) {
  // Decode (1-2 tokens) is bound by memory: 4 rows in flight per thread. More tokens are bound by the
  // FMA ports: 2 rows x 6 tokens is 12 FMAs per 8 loads and fits the registers (12 + 2 + 1).
  if (num_tokens <= 2)
    rows_times_tokens_blocked<W, 4, 2>(x, num_tokens, ld_x, w, num_rows, ld_w, depth, out, ld_out);
  else
    rows_times_tokens_blocked<W, 2, 6>(x, num_tokens, ld_x, w, num_rows, ld_w, depth, out, ld_out);
}

}  // namespace

void rows_times_tokens_avx2(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, WeightType w_type,
                            int64_t num_rows, int64_t ld_w, int64_t depth, float* out, int64_t ld_out) {
  with_weight_type(w_type, [&](auto type) {
    rows_times_tokens_typed<decltype(type)::value>(x, num_tokens, ld_x, w, num_rows, ld_w, depth, out, ld_out);
  });
}

}  // namespace moe_swap::cpu

#pragma GCC pop_options

#endif  // MOE_SWAP_HAVE_X86_KERNELS
