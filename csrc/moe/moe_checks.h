// The input contract of fused_moe, shared by the CPU kernel (fused_moe.cpp) and the CUDA kernel
// (fused_moe.cu), so both reject the same inputs with the same messages. Light includes only, so a
// .cu file can include it without pulling in torch/all.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace moe_swap {

// The activation of an expert: applied to the gate rows before multiplying by the up rows (gated),
// or to the up rows alone (ungated). kSwigluClamp is gpt-oss's clamped SwiGLU, gated only:
// g = min(gate, limit), u = clamp(up, -limit, limit), h = (u + 1) * g * sigmoid(alpha * g).
// kSiluClamp (DeepSeek-V4, HY-V4), gated only: the same clamps, h = silu(g) * u.
enum class MoeActivation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu2 = 3, kSwigluClamp = 4, kSiluClamp = 5 };

// Sizes of one fused_moe call, as validated by check_fused_moe_args.
struct FusedMoeSizes {
  int64_t num_tokens;         // T: rows of hidden_states
  int64_t hidden_size;        // H
  int64_t intermediate_size;  // I: w13 holds 2I rows per expert (gate, then up) when gated, else I (up)
  int64_t num_experts;        // E: experts held in w13/w2 (local experts when expert_map is given)
  int64_t top_k;              // k: columns of topk_ids
  int64_t num_global_experts; // ids range over [0, E_global): expert_map's length, else E
  MoeActivation activation;
  bool gated;                 // w13 holds gate rows then up rows; else up rows only
  int64_t w13_rows;           // rows of w13 per expert: 2I gated, I ungated
  bool has_w13_bias;          // w13_bias [E_global, w13_rows], indexed by global expert id
  bool has_w2_bias;           // w2_bias [E_global, H], indexed by global expert id
  float swiglu_alpha;         // kSwigluClamp only
  float swiglu_limit;         // kSwigluClamp and kSiluClamp only
};

inline MoeActivation parse_moe_activation(c10::string_view activation) {
  if (activation == "silu") return MoeActivation::kSilu;
  if (activation == "gelu") return MoeActivation::kGelu;
  if (activation == "gelu_tanh") return MoeActivation::kGeluTanh;
  if (activation == "relu2") return MoeActivation::kRelu2;
  if (activation == "swiglu_clamp") return MoeActivation::kSwigluClamp;
  if (activation == "silu_clamp") return MoeActivation::kSiluClamp;
  TORCH_CHECK_VALUE(false, "activation must be 'silu', 'gelu', 'gelu_tanh', 'relu2', 'swiglu_clamp' or 'silu_clamp', got '",
                    std::string(activation), "'");
}

// An optional per-expert bias: 2-D [E_global, cols], the weights' dtype and device.
inline void check_moe_bias(const char* name, const at::Tensor& bias, int64_t num_global_experts, int64_t cols,
                           const char* cols_meaning, at::ScalarType dtype, c10::Device device) {
  TORCH_CHECK(bias.dim() == 2, name, " must be 2-D [E_global, ", cols_meaning, "], got ", bias.dim(),
              "-D with shape ", bias.sizes());
  TORCH_CHECK(bias.size(0) == num_global_experts && bias.size(1) == cols, name, " must have shape [",
              num_global_experts, ", ", cols, "] ([E_global, ", cols_meaning,
              "]; E_global = expert_map.size(0) when a map is given, else w13.size(0)), got ", bias.sizes());
  TORCH_CHECK(bias.scalar_type() == dtype, name, " must have the dtype of hidden_states (", dtype, "), got ",
              bias.scalar_type());
  TORCH_CHECK(bias.device() == device, name, " must be on the device of hidden_states (", device, "), got ",
              bias.device());
}

// Checks every argument of fused_moe (ranks, shapes, dtypes, devices, activation, biases, gated,
// swiglu parameters) and returns the sizes. Does not look at the values of topk_ids/expert_map: the CPU kernel checks them while it
// sorts, the CUDA kernel skips invalid pairs (or raises in debug mode) without a host sync.
inline FusedMoeSizes check_fused_moe_args(const at::Tensor& hidden_states, const at::Tensor& w13,
                                          const at::Tensor& w2, const at::Tensor& topk_weights,
                                          const at::Tensor& topk_ids,
                                          const std::optional<at::Tensor>& expert_map,
                                          c10::string_view activation,
                                          const std::optional<at::Tensor>& w13_bias,
                                          const std::optional<at::Tensor>& w2_bias, bool gated,
                                          double swiglu_alpha, double swiglu_limit) {
  const auto dtype = hidden_states.scalar_type();
  TORCH_CHECK(hidden_states.dim() == 2, "hidden_states must be 2-D [T, H], got ", hidden_states.dim(),
              "-D with shape ", hidden_states.sizes());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hidden_states must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(w13.dim() == 3, "w13 must be 3-D [E, ", gated ? "2I" : "I", ", H], got ", w13.dim(), "-D with shape ",
              w13.sizes());
  TORCH_CHECK(w2.dim() == 3, "w2 must be 3-D [E, H, I], got ", w2.dim(), "-D with shape ", w2.sizes());
  TORCH_CHECK(topk_weights.dim() == 2, "topk_weights must be 2-D [T, k], got ", topk_weights.dim(),
              "-D with shape ", topk_weights.sizes());
  TORCH_CHECK(topk_ids.dim() == 2, "topk_ids must be 2-D [T, k], got ", topk_ids.dim(), "-D with shape ",
              topk_ids.sizes());

  const int64_t num_tokens = hidden_states.size(0);
  const int64_t hidden_size = hidden_states.size(1);
  const int64_t num_experts = w13.size(0);
  TORCH_CHECK(w13.size(2) == hidden_size, "w13.size(2) must equal H = hidden_states.size(1) = ", hidden_size,
              ", got ", w13.size(2), " (w13 shape ", w13.sizes(), ")");
  TORCH_CHECK(!gated || w13.size(1) % 2 == 0,
              "w13.size(1) must be even (2I: gate rows then up rows, gated=True), got ", w13.size(1), " (w13 shape ",
              w13.sizes(), ")");
  const int64_t intermediate_size = gated ? w13.size(1) / 2 : w13.size(1);
  TORCH_CHECK(w2.size(0) == num_experts, "w2.size(0) must equal E = w13.size(0) = ", num_experts, ", got ",
              w2.size(0), " (w2 shape ", w2.sizes(), ")");
  TORCH_CHECK(w2.size(1) == hidden_size, "w2.size(1) must equal H = hidden_states.size(1) = ", hidden_size,
              ", got ", w2.size(1), " (w2 shape ", w2.sizes(), ")");
  TORCH_CHECK(w2.size(2) == intermediate_size, "w2.size(2) must equal I = ",
              gated ? "w13.size(1) / 2 (gated=True) = " : "w13.size(1) (gated=False) = ", intermediate_size, ", got ",
              w2.size(2), " (w2 shape ", w2.sizes(), ")");
  TORCH_CHECK(w13.scalar_type() == dtype, "w13 must have the dtype of hidden_states (", dtype, "), got ",
              w13.scalar_type());
  TORCH_CHECK(w2.scalar_type() == dtype, "w2 must have the dtype of hidden_states (", dtype, "), got ",
              w2.scalar_type());

  TORCH_CHECK(topk_weights.size(0) == num_tokens, "topk_weights.size(0) must equal T = hidden_states.size(0) = ",
              num_tokens, ", got ", topk_weights.size(0), " (topk_weights shape ", topk_weights.sizes(), ")");
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat, "topk_weights must be float32, got ",
              topk_weights.scalar_type());
  TORCH_CHECK(topk_ids.sizes() == topk_weights.sizes(), "topk_ids must have the shape of topk_weights ",
              topk_weights.sizes(), ", got ", topk_ids.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  const int64_t top_k = topk_ids.size(1);

  int64_t num_global_experts = num_experts;
  if (expert_map.has_value()) {
    const at::Tensor& map = *expert_map;
    TORCH_CHECK(map.dim() == 1, "expert_map must be 1-D [E_global], got ", map.dim(), "-D with shape ",
                map.sizes());
    TORCH_CHECK(map.scalar_type() == at::kInt, "expert_map must be int32, got ", map.scalar_type());
    num_global_experts = map.size(0);
  }

  const auto device = hidden_states.device();
  TORCH_CHECK(w13.device() == device, "w13 must be on the device of hidden_states (", device, "), got ",
              w13.device());
  TORCH_CHECK(w2.device() == device, "w2 must be on the device of hidden_states (", device, "), got ",
              w2.device());
  TORCH_CHECK(topk_weights.device() == device, "topk_weights must be on the device of hidden_states (", device,
              "), got ", topk_weights.device());
  TORCH_CHECK(topk_ids.device() == device, "topk_ids must be on the device of hidden_states (", device,
              "), got ", topk_ids.device());
  if (expert_map.has_value()) {
    TORCH_CHECK(expert_map->device() == device, "expert_map must be on the device of hidden_states (", device,
                "), got ", expert_map->device());
  }

  const MoeActivation act = parse_moe_activation(activation);
  TORCH_CHECK_VALUE(gated || act != MoeActivation::kSwigluClamp,
                    "activation 'swiglu_clamp' needs gate rows: it requires gated=True, got gated=False");
  TORCH_CHECK_VALUE(gated || act != MoeActivation::kSiluClamp,
                    "activation 'silu_clamp' needs gate rows: it requires gated=True, got gated=False");
  TORCH_CHECK_VALUE(std::isfinite(swiglu_alpha), "swiglu_alpha must be finite, got ", swiglu_alpha);
  TORCH_CHECK_VALUE(std::isfinite(swiglu_limit) && swiglu_limit > 0, "swiglu_limit must be finite and > 0, got ",
                    swiglu_limit);
  const int64_t w13_rows = w13.size(1);
  if (w13_bias.has_value()) {
    check_moe_bias("w13_bias", *w13_bias, num_global_experts, w13_rows, gated ? "2I" : "I", dtype, device);
  }
  if (w2_bias.has_value()) check_moe_bias("w2_bias", *w2_bias, num_global_experts, hidden_size, "H", dtype, device);
  return FusedMoeSizes{num_tokens, hidden_size, intermediate_size, num_experts, top_k, num_global_experts, act,
                       gated, w13_rows, w13_bias.has_value(), w2_bias.has_value(),
                       static_cast<float>(swiglu_alpha), static_cast<float>(swiglu_limit)};
}

}  // namespace moe_swap
