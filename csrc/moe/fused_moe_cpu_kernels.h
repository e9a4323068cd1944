// The inner loops of the CPU fused_moe, on raw pointers: a small-batch "rows times tokens" product
// that reads each weight row once for all of an expert's tokens, and the fused activation-and-multiply.
// Two builds of each: AVX-512 (fused_moe_cpu_avx512.cpp, compiled for that ISA and picked at run
// time when the CPU has it) and portable C++ (fused_moe_cpu_generic.cpp).
#pragma once

#include <cstdint>

namespace moe_swap::cpu {

// How the weights are stored; activations are always float.
enum class WeightType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// out[i * ld_out + r] = sum_h x[i * ld_x + h] * w[r * ld_w + h]   for i < num_tokens, r < num_rows.
// Float accumulation. Meant for few tokens (decode): each weight row is read once per call.
using RowsTimesTokensFn = void (*)(const float* x, int64_t num_tokens, int64_t ld_x, const void* w,
                                   WeightType w_type, int64_t num_rows, int64_t ld_w, int64_t depth,
                                   float* out, int64_t ld_out);

// The activation of one expert's intermediate row (see MoeActivation in moe_checks.h): activation
// 0 silu, 1 gelu, 2 gelu_tanh, 3 relu2, 4 swiglu_clamp (gpt-oss, gated only, uses alpha and limit).
struct ActParams {
  int activation;
  float swiglu_alpha;
  float swiglu_limit;
};

// Gated (gate != nullptr): out[i] = round(act(gate[i] + gate_bias[i]) * (up[i] + up_bias[i]));
// swiglu_clamp: round((clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')), g' = min(g, limit).
// Ungated (gate == nullptr): out[i] = round(act(up[i] + up_bias[i])). A null bias is zero. The bias
// is added to the float32 accumulator; round is to `round_to` (the input dtype: float32 keeps the value).
using ActAndMulFn = void (*)(const float* gate, const float* up, const float* gate_bias, const float* up_bias,
                             float* out, int64_t n, const ActParams& act, WeightType round_to);

void rows_times_tokens_generic(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, WeightType w_type,
                               int64_t num_rows, int64_t ld_w, int64_t depth, float* out, int64_t ld_out);
void act_and_mul_generic(const float* gate, const float* up, const float* gate_bias, const float* up_bias,
                         float* out, int64_t n, const ActParams& act, WeightType round_to);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOE_SWAP_HAVE_AVX512_KERNELS 1
void rows_times_tokens_avx512(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, WeightType w_type,
                              int64_t num_rows, int64_t ld_w, int64_t depth, float* out, int64_t ld_out);
void act_and_mul_avx512(const float* gate, const float* up, const float* gate_bias, const float* up_bias,
                        float* out, int64_t n, const ActParams& act, WeightType round_to);
#endif

// The best build for this CPU, chosen once.
RowsTimesTokensFn rows_times_tokens();
ActAndMulFn act_and_mul();

}  // namespace moe_swap::cpu
