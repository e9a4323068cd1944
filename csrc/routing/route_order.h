// The order in which topk_route ranks experts and groups, shared by the CPU and CUDA kernels so
// both pick exactly the same experts: higher selection score first, NaN below everything (even
// -inf), ties broken by the lower index. Encoded as one unsigned 64-bit key, so "best" is a plain
// max and "the next best after x" is the max below x.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace moe_swap::routing {

// A uint32 whose unsigned order is the float order; NaN maps to 0, below -inf (0x007FFFFF).
C10_HOST_DEVICE inline uint32_t ordered_bits(float x) {
  if (x != x) return 0u;
  if (x == 0.f) x = 0.f;  // -0.0 and +0.0 must rank as a tie
  uint32_t bits;
#ifdef __CUDA_ARCH__
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Rank key of item `index` with selection score `score`; never 0, so 0 can mean "none".
C10_HOST_DEVICE inline uint64_t rank_key(float score, uint32_t index) {
  return (static_cast<uint64_t>(ordered_bits(score)) << 32) | static_cast<uint64_t>(~index);
}

C10_HOST_DEVICE inline uint32_t rank_index(uint64_t key) { return ~static_cast<uint32_t>(key); }

// Groups are compared by a NaN-free score: a NaN group score (e.g. inf + -inf) counts as -inf.
C10_HOST_DEVICE inline float nan_to_neg_inf(float x) { return x != x ? -INFINITY : x; }

// Group score from the best and second-best member selection scores (NaN already mapped to -inf):
// the best alone (DeepSeek-V2 and vLLM without a bias), or the sum of the best two when a
// correction bias is given (DeepSeek-V3).
C10_HOST_DEVICE inline float group_score(float best, float second, bool sum_of_top2, int64_t per_group) {
  return nan_to_neg_inf((sum_of_top2 && per_group > 1) ? best + second : best);
}

C10_HOST_DEVICE inline void push_top2(float value, float& best, float& second) {
  if (value > best) {
    second = best;
    best = value;
  } else if (value > second) {
    second = value;
  }
}

// float32 sigmoid as torch computes it; sigmoid(-inf) = 0, sigmoid(inf) = 1, NaN stays NaN.
C10_HOST_DEVICE inline float sigmoid_score(float logit) { return 1.f / (1.f + ::expf(-logit)); }

}  // namespace moe_swap::routing
