// Portable builds of the fused_moe CPU inner loops (see fused_moe_cpu_kernels.h), and the run-time
// choice between them and the AVX-512 builds.
#include "moe/fused_moe_cpu_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace moe_swap::cpu {
namespace {

inline float weight_at(const void* w, WeightType w_type, int64_t index) {
  switch (w_type) {
    case WeightType::kFloat32: return static_cast<const float*>(w)[index];
    case WeightType::kBFloat16: {
      uint16_t bits;
      std::memcpy(&bits, static_cast<const uint16_t*>(w) + index, sizeof(bits));
      return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
    }
    case WeightType::kFloat16: {
      uint16_t bits;
      std::memcpy(&bits, static_cast<const uint16_t*>(w) + index, sizeof(bits));
      return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
    }
  }
  return 0.0f;
}

}  // namespace

void rows_times_tokens_generic(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, WeightType w_type,
                               int64_t num_rows, int64_t ld_w, int64_t depth, float* out, int64_t ld_out) {
  constexpr int64_t kChunk = 256;
  float row[kChunk];
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t t = 0; t < num_tokens; ++t) out[t * ld_out + r] = 0.0f;
    // Convert a chunk of the weight row once, then use it for every token.
    for (int64_t h0 = 0; h0 < depth; h0 += kChunk) {
      const int64_t len = depth - h0 < kChunk ? depth - h0 : kChunk;
      for (int64_t h = 0; h < len; ++h) row[h] = weight_at(w, w_type, r * ld_w + h0 + h);
      for (int64_t t = 0; t < num_tokens; ++t) {
        const float* xt = x + t * ld_x + h0;
        // 16 independent partial sums: the compiler can keep them in vector lanes without -ffast-math.
        float lanes[16] = {};
        int64_t h = 0;
        for (; h + 16 <= len; h += 16)
          for (int l = 0; l < 16; ++l) lanes[l] += row[h + l] * xt[h + l];
        float sum = 0.0f;
        for (; h < len; ++h) sum += row[h] * xt[h];
        for (int l = 0; l < 16; ++l) sum += lanes[l];
        out[t * ld_out + r] += sum;
      }
    }
  }
}

namespace {
// act(x) of the gated (times up) and ungated activations; swiglu_clamp is handled by the caller.
inline float activate(float x, int activation) {
  switch (activation) {
    case 0: return x / (1.0f + std::exp(-x));
    case 1: return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case 2: {
      const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.0f + std::tanh(u));
    }
    default: {
      const float r = x < 0.0f ? 0.0f : x;  // NaN stays NaN, as torch.relu
      return r * r;
    }
  }
}
}  // namespace

void act_and_mul_generic(const float* gate, const float* up, const float* gate_bias, const float* up_bias,
                         float* out, int64_t n, const ActParams& act, WeightType round_to) {
  const float limit = act.swiglu_limit;
  for (int64_t i = 0; i < n; ++i) {
    const float u = up[i] + (up_bias != nullptr ? up_bias[i] : 0.0f);
    float h;
    if (gate == nullptr) {
      h = activate(u, act.activation);
    } else {
      const float g = gate[i] + (gate_bias != nullptr ? gate_bias[i] : 0.0f);
      if (act.activation == 4) {
        // std::min/max keep a NaN first operand, as torch.clamp does
        const float gc = std::min(g, limit);
        const float uc = std::max(std::min(u, limit), -limit);
        h = (uc + 1.0f) * (gc / (1.0f + std::exp(-act.swiglu_alpha * gc)));
      } else {
        h = activate(g, act.activation) * u;
      }
    }
    switch (round_to) {
      case WeightType::kFloat32: out[i] = h; break;
      case WeightType::kBFloat16: out[i] = static_cast<float>(c10::BFloat16(h)); break;
      case WeightType::kFloat16: out[i] = static_cast<float>(c10::Half(h)); break;
    }
  }
}

namespace {
// MOE_SWAP_CPU_KERNELS=generic forces the portable builds (the tests run both).
bool cpu_has_avx512() {
#if defined(MOE_SWAP_HAVE_AVX512_KERNELS)
  const char* forced = std::getenv("MOE_SWAP_CPU_KERNELS");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
}  // namespace

RowsTimesTokensFn rows_times_tokens() {
#if defined(MOE_SWAP_HAVE_AVX512_KERNELS)
  static const RowsTimesTokensFn fn = cpu_has_avx512() ? &rows_times_tokens_avx512 : &rows_times_tokens_generic;
#else
  static const RowsTimesTokensFn fn = &rows_times_tokens_generic;
#endif
  return fn;
}

ActAndMulFn act_and_mul() {
#if defined(MOE_SWAP_HAVE_AVX512_KERNELS)
  static const ActAndMulFn fn = cpu_has_avx512() ? &act_and_mul_avx512 : &act_and_mul_generic;
#else
  static const ActAndMulFn fn = &act_and_mul_generic;
#endif
  return fn;
}

}  // namespace moe_swap::cpu
