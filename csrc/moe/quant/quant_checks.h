// The input contract of fused_moe_quant (layouts: moe_swap/quant.py), shared by the CPU kernel and the
// CUDA kernel so both reject the same inputs with the same messages. Light includes only (a .cu includes it).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>

#include "moe/moe_checks.h"

namespace moe_swap {

// How an expert matrix W [N, K] is stored (one row of W = one output channel):
//   kFp8Block  float8_e4m3fn [N, K], float32 scale per 128x128 block (a gated w13: per half)
//   kMxfp4     e2m1 nibbles [N, ceil(K/32)*16] bytes, e8m0 scale per 32
//   kInt4      u4 nibbles [N, ceil(K/2)] bytes, scale (f32/f16/bf16) and optional u8 zero per group of K
//   kInt8      int8 [N, K], float32 scale per row
enum class QuantFormat : int { kFp8Block = 0, kMxfp4 = 1, kInt4 = 2, kInt8 = 3 };

constexpr int64_t kFp8BlockSize = 128;
constexpr int64_t kMxfp4BlockSize = 32;

inline QuantFormat parse_quant_format(c10::string_view format) {
  if (format == "fp8_block") return QuantFormat::kFp8Block;
  if (format == "mxfp4") return QuantFormat::kMxfp4;
  if (format == "int4") return QuantFormat::kInt4;
  if (format == "int8") return QuantFormat::kInt8;
  TORCH_CHECK_VALUE(false, "format must be 'fp8_block', 'mxfp4', 'int4' or 'int8', got '", std::string(format), "'");
}

inline const char* quant_format_name(QuantFormat f) {
  switch (f) {
    case QuantFormat::kFp8Block: return "fp8_block";
    case QuantFormat::kMxfp4: return "mxfp4";
    case QuantFormat::kInt4: return "int4";
    case QuantFormat::kInt8: return "int8";
  }
  return "?";
}

struct FusedMoeQuantSizes {
  FusedMoeSizes moe;       // as for fused_moe (num_experts = w13.size(0))
  QuantFormat format;
  int64_t group_size;      // int4: 32/64/128; fp8_block: 128; mxfp4: 32; int8: 0 (per row)
  bool has_w13_zero;
  bool has_w2_zero;
};

namespace quant_detail {
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One matrix's bytes, scales and zero points against the format's shapes for N rows, K columns.
// row_blocks: fp8_block's rows of the scale (a gated w13 blocks its halves separately).
inline void check_matrix(const char* name, const char* scale_name, const char* zero_name, const at::Tensor& q,
                         const at::Tensor& scale, const std::optional<at::Tensor>& zero, QuantFormat f, int64_t E,
                         int64_t N, int64_t K, int64_t group, int64_t row_blocks, const char* dims, c10::Device device) {
  const char* fmt = quant_format_name(f);
  int64_t packed = K, scale_cols = 0;
  at::ScalarType q_dtype = at::kByte;
  switch (f) {
    case QuantFormat::kFp8Block: q_dtype = at::kFloat8_e4m3fn; scale_cols = cdiv(K, kFp8BlockSize); break;
    case QuantFormat::kMxfp4: packed = cdiv(K, kMxfp4BlockSize) * 16; scale_cols = cdiv(K, kMxfp4BlockSize); break;
    case QuantFormat::kInt4: packed = cdiv(K, 2); scale_cols = cdiv(K, group); break;
    case QuantFormat::kInt8: q_dtype = at::kChar; break;
  }
  TORCH_CHECK(q.dim() == 3 && q.size(0) == E && q.size(1) == N && q.size(2) == packed, name, " (", fmt, ") must have shape [",
              E, ", ", N, ", ", packed, "] (", dims, "), got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == q_dtype, name, " (", fmt, ") must have dtype ", q_dtype, ", got ", q.scalar_type());
  TORCH_CHECK(q.device() == device, name, " must be on the device of hidden_states (", device, "), got ", q.device());
  TORCH_CHECK(scale.device() == device, scale_name, " must be on the device of hidden_states (", device, "), got ",
              scale.device());
  if (f == QuantFormat::kInt8) {
    TORCH_CHECK(scale.dim() == 2 && scale.size(0) == E && scale.size(1) == N, scale_name,
                " (int8: one float32 per row) must have shape [", E, ", ", N, "], got ", scale.sizes());
  } else {
    const int64_t rows = f == QuantFormat::kFp8Block ? row_blocks : N;
    TORCH_CHECK(scale.dim() == 3 && scale.size(0) == E && scale.size(1) == rows && scale.size(2) == scale_cols,
                scale_name, " (", fmt,
                f == QuantFormat::kFp8Block ? ": one per 128x128 block" : (f == QuantFormat::kMxfp4 ? ": one e8m0 per 32" : ": one per group"),
                ") must have shape [", E, ", ", rows, ", ", scale_cols, "], got ", scale.sizes());
  }
  if (f == QuantFormat::kInt4) {
    TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf ||
                    scale.scalar_type() == at::kBFloat16,
                scale_name, " (int4) must be float32, float16 or bfloat16, got ", scale.scalar_type());
  } else {
    const at::ScalarType want = f == QuantFormat::kMxfp4 ? at::kByte : at::kFloat;
    TORCH_CHECK(scale.scalar_type() == want, scale_name, " (", fmt, ") must have dtype ", want, ", got ",
                scale.scalar_type());
  }
  if (zero.has_value()) {
    TORCH_CHECK_VALUE(f == QuantFormat::kInt4, zero_name, ": only format 'int4' has zero points, got one for '", fmt,
                      "'");
    TORCH_CHECK(zero->sizes() == scale.sizes(), zero_name, " must have the shape of ", scale_name, " ", scale.sizes(),
                ", got ", zero->sizes());
    TORCH_CHECK(zero->scalar_type() == at::kByte, zero_name, " must be uint8, got ", zero->scalar_type());
    TORCH_CHECK(zero->device() == device, zero_name, " must be on the device of hidden_states (", device, "), got ",
                zero->device());
  }
}
}  // namespace quant_detail

// Checks every argument of fused_moe_quant and returns the sizes (the ids' values are checked as
// fused_moe's are: the CPU kernel while sorting, the CUDA kernel skips invalid pairs).
inline FusedMoeQuantSizes check_fused_moe_quant_args(
    const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w13_scale, const at::Tensor& w2,
    const at::Tensor& w2_scale, const at::Tensor& topk_weights, const at::Tensor& topk_ids, c10::string_view format,
    int64_t group_size, const std::optional<at::Tensor>& w13_zero, const std::optional<at::Tensor>& w2_zero,
    const std::optional<at::Tensor>& expert_map, c10::string_view activation, const std::optional<at::Tensor>& w13_bias,
    const std::optional<at::Tensor>& w2_bias, bool gated, double swiglu_alpha, double swiglu_limit) {
  using quant_detail::cdiv;
  const QuantFormat f = parse_quant_format(format);
  int64_t group = 0;
  switch (f) {
    case QuantFormat::kInt4:
      TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128,
                        "group_size must be 32, 64 or 128 for format 'int4', got ", group_size);
      group = group_size;
      break;
    case QuantFormat::kFp8Block:
      TORCH_CHECK_VALUE(group_size == 0 || group_size == kFp8BlockSize,
                        "group_size must be 0 or 128 for format 'fp8_block' (128x128 blocks), got ", group_size);
      group = kFp8BlockSize;
      break;
    case QuantFormat::kMxfp4:
      TORCH_CHECK_VALUE(group_size == 0 || group_size == kMxfp4BlockSize,
                        "group_size must be 0 or 32 for format 'mxfp4' (blocks of 32), got ", group_size);
      group = kMxfp4BlockSize;
      break;
    case QuantFormat::kInt8:
      TORCH_CHECK_VALUE(group_size == 0, "group_size must be 0 for format 'int8' (one scale per row), got ", group_size);
      break;
  }
  const auto dtype = hidden_states.scalar_type();
  TORCH_CHECK(hidden_states.dim() == 2, "hidden_states must be 2-D [T, H], got ", hidden_states.dim(), "-D with shape ",
              hidden_states.sizes());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hidden_states must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(w13.dim() == 3, "w13 must be 3-D [E, ", gated ? "2I" : "I", ", packed H], got ", w13.dim(),
              "-D with shape ", w13.sizes());
  TORCH_CHECK(w2.dim() == 3, "w2 must be 3-D [E, H, packed I], got ", w2.dim(), "-D with shape ", w2.sizes());
  const int64_t T = hidden_states.size(0), H = hidden_states.size(1), E = w13.size(0), rows13 = w13.size(1);
  TORCH_CHECK(!gated || rows13 % 2 == 0, "w13.size(1) must be even (2I: gate rows then up rows, gated=True), got ",
              rows13, " (w13 shape ", w13.sizes(), ")");
  const int64_t I = gated ? rows13 / 2 : rows13;
  const auto device = hidden_states.device();
  const int64_t blocks13 = gated ? 2 * cdiv(I, kFp8BlockSize) : cdiv(I, kFp8BlockSize);
  quant_detail::check_matrix("w13", "w13_scale", "w13_zero", w13, w13_scale, w13_zero, f, E, rows13, H, group, blocks13,
                             gated ? "[E, 2I, H] packed" : "[E, I, H] packed", device);
  quant_detail::check_matrix("w2", "w2_scale", "w2_zero", w2, w2_scale, w2_zero, f, E, H, I, group, cdiv(H, kFp8BlockSize),
                             "[E, H, I] packed; I from w13", device);

  TORCH_CHECK(w2_scale.scalar_type() == w13_scale.scalar_type(), "w2_scale must have the dtype of w13_scale (",
              w13_scale.scalar_type(), "), got ", w2_scale.scalar_type());
  TORCH_CHECK(topk_weights.dim() == 2 && topk_weights.size(0) == T, "topk_weights must be 2-D [T, k] with T = ", T,
              ", got shape ", topk_weights.sizes());
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat, "topk_weights must be float32, got ", topk_weights.scalar_type());
  TORCH_CHECK(topk_ids.sizes() == topk_weights.sizes(), "topk_ids must have the shape of topk_weights ",
              topk_weights.sizes(), ", got ", topk_ids.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(topk_weights.device() == device && topk_ids.device() == device,
              "topk_weights and topk_ids must be on the device of hidden_states (", device, "), got ",
              topk_weights.device(), " and ", topk_ids.device());
  int64_t num_global = E;
  if (expert_map.has_value()) {
    TORCH_CHECK(expert_map->dim() == 1, "expert_map must be 1-D [E_global], got shape ", expert_map->sizes());
    TORCH_CHECK(expert_map->scalar_type() == at::kInt, "expert_map must be int32, got ", expert_map->scalar_type());
    TORCH_CHECK(expert_map->device() == device, "expert_map must be on the device of hidden_states (", device,
                "), got ", expert_map->device());
    num_global = expert_map->size(0);
  }
  const MoeActivation act = parse_moe_activation(activation);
  TORCH_CHECK_VALUE(gated || (act != MoeActivation::kSwigluClamp && act != MoeActivation::kSiluClamp), "activation '",
                    std::string(activation), "' needs gate rows: it requires gated=True, got gated=False");
  TORCH_CHECK_VALUE(std::isfinite(swiglu_alpha), "swiglu_alpha must be finite, got ", swiglu_alpha);
  TORCH_CHECK_VALUE(std::isfinite(swiglu_limit) && swiglu_limit > 0, "swiglu_limit must be finite and > 0, got ",
                    swiglu_limit);
  if (w13_bias.has_value()) check_moe_bias("w13_bias", *w13_bias, num_global, rows13, gated ? "2I" : "I", dtype, device);
  if (w2_bias.has_value()) check_moe_bias("w2_bias", *w2_bias, num_global, H, "H", dtype, device);
  const FusedMoeSizes moe{T, H, I, E, topk_ids.size(1), num_global, act, gated, rows13, w13_bias.has_value(),
                          w2_bias.has_value(), static_cast<float>(swiglu_alpha), static_cast<float>(swiglu_limit)};
  return FusedMoeQuantSizes{moe, f, group, w13_zero.has_value(), w2_zero.has_value()};
}

}  // namespace moe_swap
