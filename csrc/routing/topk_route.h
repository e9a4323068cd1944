// What the CPU and CUDA entry points of topk_route share: argument checking and the parsed options.
// Kept free of torch/all.h so the .cu file compiles quickly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace moe_swap::routing {

enum class Scoring { kSoftmax, kSigmoid };

// Checks every argument of topk_route (each message names the argument, what was expected and what
// came) and returns the parsed scoring function. Does not look at the data, so it never syncs.
Scoring check_topk_route_args(const at::Tensor& router_logits, int64_t top_k, c10::string_view scoring,
                              int64_t num_expert_group, int64_t topk_group,
                              const std::optional<at::Tensor>& correction_bias, double routed_scaling_factor);

// Weights added for the renormalisation denominator, as DeepSeek-V3 does: all-zero sigmoid weights
// stay 0 rather than NaN; a no-op in float32 for softmax weights (their sum is at least 1/E).
constexpr float kRenormalizeEpsilon = 1e-20f;

}  // namespace moe_swap::routing
