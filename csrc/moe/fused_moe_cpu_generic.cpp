// Portable builds of the fused_moe CPU inner loops (see fused_moe_cpu_kernels.h): plain loops the
// compiler vectorises for the baseline ISA, the fallback where no build for a wider ISA runs.
#include "moe/fused_moe_cpu_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace moe_swap::cpu {
namespace {

template <WeightType W>
inline float weight_at(const void* w, int64_t index) {
  if constexpr (W == WeightType::kFloat32) {
    return static_cast<const float*>(w)[index];
  } else {
    uint16_t bits;
    std::memcpy(&bits, static_cast<const uint16_t*>(w) + index, sizeof(bits));
    if constexpr (W == WeightType::kBFloat16) {
      // bfloat16 is the top half of a float32.
      const uint32_t wide = static_cast<uint32_t>(bits) << 16;
      float value;
      std::memcpy(&value, &wide, sizeof(value));
      return value;
    } else {
      return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
    }
  }
}

template <WeightType W>
void rows_times_tokens_typed(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, int64_t num_rows,
                             int64_t ld_w, int64_t depth, float* out, int64_t ld_out) {
  constexpr int64_t kChunk = 256;
  float row[kChunk];
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t t = 0; t < num_tokens; ++t) out[t * ld_out + r] = 0.0f;
    // Convert a chunk of the weight row once, then use it for every token.
    for (int64_t h0 = 0; h0 < depth; h0 += kChunk) {
      const int64_t len = depth - h0 < kChunk ? depth - h0 : kChunk;
      for (int64_t h = 0; h < len; ++h) row[h] = weight_at<W>(w, r * ld_w + h0 + h);
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

}  // namespace

void rows_times_tokens_generic(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, WeightType w_type,
                               int64_t num_rows, int64_t ld_w, int64_t depth, float* out, int64_t ld_out) {
  with_weight_type(w_type, [&](auto type) {
    rows_times_tokens_typed<decltype(type)::value>(x, num_tokens, ld_x, w, num_rows, ld_w, depth, out, ld_out);
  });
}

namespace {
// act(x) of the gated (times up) and ungated activations; swiglu_clamp and silu_clamp are handled by the caller.
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
      } else if (act.activation == 5) {  // silu_clamp: the same clamps, silu(g) * u
        const float gc = std::min(g, limit);
        const float uc = std::max(std::min(u, limit), -limit);
        h = activate(gc, 0) * uc;
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

}  // namespace moe_swap::cpu
