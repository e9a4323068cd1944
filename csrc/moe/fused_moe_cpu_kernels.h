// The inner loops of the CPU fused_moe, on raw pointers: a small-batch "rows times tokens" product
// that reads each weight row once for all of an expert's tokens, and the fused activation-and-multiply.
// Builds, each in its own file compiled for its ISA only (target pragmas, no torch headers) and chosen
// at run time from CPUID (fused_moe_cpu_dispatch.cpp):
//   avx512_bf16  vdpbf16ps on bfloat16 weights (fused_moe_cpu_avx512_bf16.cpp): dot-product tiles below 8
//                tokens, packed weight panels with broadcast tokens from 8 on; else as avx512
//   avx512       AVX-512F/BW/VL/DQ + FMA (fused_moe_cpu_avx512.cpp)
//   avx2         AVX2 + FMA + F16C (fused_moe_cpu_avx2.cpp); act_and_mul is the portable one
//   generic      portable C++, auto-vectorised (fused_moe_cpu_generic.cpp)
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace moe_swap::cpu {

// How the weights are stored; activations are always float.
enum class WeightType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Calls fn(std::integral_constant<WeightType, W>{}) with W the run-time w_type: how each build turns
// the one entry point into its kernel typed for W.
template <typename Fn>
inline void with_weight_type(WeightType w_type, Fn&& fn) {
  switch (w_type) {
    case WeightType::kFloat32: return fn(std::integral_constant<WeightType, WeightType::kFloat32>{});
    case WeightType::kBFloat16: return fn(std::integral_constant<WeightType, WeightType::kBFloat16>{});
    case WeightType::kFloat16: return fn(std::integral_constant<WeightType, WeightType::kFloat16>{});
  }
}

// out[i * ld_out + r] = sum_h x[i * ld_x + h] * w[r * ld_w + h]   for i < num_tokens, r < num_rows.
// Float accumulation. Meant for few tokens (decode): each weight row is read once per call.
using RowsTimesTokensFn = void (*)(const float* x, int64_t num_tokens, int64_t ld_x, const void* w,
                                   WeightType w_type, int64_t num_rows, int64_t ld_w, int64_t depth,
                                   float* out, int64_t ld_out);

// The activation of one expert's intermediate row (see MoeActivation in moe_checks.h): activation
// 0 silu, 1 gelu, 2 gelu_tanh, 3 relu2, 4 swiglu_clamp (gpt-oss, gated only, uses alpha and limit),
// 5 silu_clamp (DeepSeek-V4, gated only, uses limit).
struct ActParams {
  int activation;
  float swiglu_alpha;
  float swiglu_limit;
};

// Gated (gate != nullptr): out[i] = round(act(gate[i] + gate_bias[i]) * (up[i] + up_bias[i]));
// swiglu_clamp: round((clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')), g' = min(g, limit);
// silu_clamp: round(silu(g') * clamp(u, -limit, limit)).
// Ungated (gate == nullptr): out[i] = round(act(up[i] + up_bias[i])). A null bias is zero. The bias
// is added to the float32 accumulator; round is to `round_to` (the input dtype: float32 keeps the value).
using ActAndMulFn = void (*)(const float* gate, const float* up, const float* gate_bias, const float* up_bias,
                             float* out, int64_t n, const ActParams& act, WeightType round_to);

void rows_times_tokens_generic(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, WeightType w_type,
                               int64_t num_rows, int64_t ld_w, int64_t depth, float* out, int64_t ld_out);
void act_and_mul_generic(const float* gate, const float* up, const float* gate_bias, const float* up_bias,
                         float* out, int64_t n, const ActParams& act, WeightType round_to);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOE_SWAP_HAVE_X86_KERNELS 1
void rows_times_tokens_avx2(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, WeightType w_type,
                            int64_t num_rows, int64_t ld_w, int64_t depth, float* out, int64_t ld_out);
void rows_times_tokens_avx512(const float* x, int64_t num_tokens, int64_t ld_x, const void* w, WeightType w_type,
                              int64_t num_rows, int64_t ld_w, int64_t depth, float* out, int64_t ld_out);
void rows_times_tokens_avx512_bf16(const float* x, int64_t num_tokens, int64_t ld_x, const void* w,
                                   WeightType w_type, int64_t num_rows, int64_t ld_w, int64_t depth, float* out,
                                   int64_t ld_out);
void act_and_mul_avx512(const float* gate, const float* up, const float* gate_bias, const float* up_bias,
                        float* out, int64_t n, const ActParams& act, WeightType round_to);
#endif

// One build of the inner loops.
struct KernelBuild {
  const char* name;  // as MOE_SWAP_CPU_KERNELS spells it
  RowsTimesTokensFn rows_times_tokens;
  ActAndMulFn act_and_mul;
  // Experts with at most this many tokens take the tiled path (rows_times_tokens), more take the
  // float32 GEMM; where the tiled kernel stops beating MKL, measured per ISA and weight type (indexed
  // by WeightType; see the definitions).
  int64_t small_batch_limit[3];
};

// The build in use: MOE_SWAP_CPU_KERNELS when set (an error if this CPU cannot run it), else the best
// this CPU runs. Chosen once per process.
const KernelBuild& kernel_build();

// The names of the builds this CPU runs, best first ("generic" is always last).
std::vector<std::string> runnable_kernel_builds();

}  // namespace moe_swap::cpu
