// topk_route on the CPU: tokens in parallel (at::parallel_for), one row at a time per thread.
#include "routing/topk_route.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "core/checks.h"
#include "ops.h"
#include "routing/route_order.h"

namespace moe_swap {
namespace routing {

Scoring check_topk_route_args(const at::Tensor& router_logits, int64_t top_k, c10::string_view scoring,
                              int64_t num_expert_group, int64_t topk_group,
                              const std::optional<at::Tensor>& correction_bias, double routed_scaling_factor) {
  MOE_SWAP_CHECK_DIM(router_logits, 2);
  MOE_SWAP_CHECK_FLOATING(router_logits);
  const int64_t num_experts = router_logits.size(1);
  TORCH_CHECK(num_experts <= std::numeric_limits<int32_t>::max(),
              "router_logits.size(1) (the number of experts) must fit in int32, got ", num_experts);
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "top_k must be in [1, E] with E = router_logits.size(1) = ",
              num_experts, ", got ", top_k);
  Scoring parsed;
  if (scoring == "softmax") {
    parsed = Scoring::kSoftmax;
  } else if (scoring == "sigmoid") {
    parsed = Scoring::kSigmoid;
  } else {
    TORCH_CHECK(false, "scoring must be \"softmax\" or \"sigmoid\", got \"", std::string(scoring), "\"");
  }
  TORCH_CHECK(num_expert_group >= 1 && num_experts % num_expert_group == 0,
              "num_expert_group must be >= 1 and divide E = router_logits.size(1) = ", num_experts, ", got ",
              num_expert_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= num_expert_group,
              "topk_group must be in [1, num_expert_group = ", num_expert_group, "], got ", topk_group);
  const int64_t kept_experts = topk_group * (num_experts / num_expert_group);
  TORCH_CHECK(top_k <= kept_experts, "top_k must be <= topk_group * E / num_expert_group = ", topk_group, " * ",
              num_experts, " / ", num_expert_group, " = ", kept_experts, " (the experts left after the group limit), got ",
              top_k);
  // The kernels scale in float32: a factor that is not finite there would make every weight inf or NaN.
  TORCH_CHECK(std::isfinite(static_cast<float>(routed_scaling_factor)),
              "routed_scaling_factor must be a finite float32 number, got ", routed_scaling_factor);
  if (correction_bias.has_value()) {
    const at::Tensor& bias = *correction_bias;
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == num_experts,
                "correction_bias must be a 1-D tensor of shape [E] = [", num_experts, "], got shape ", shape_str(bias));
    TORCH_CHECK(bias.scalar_type() == at::kFloat || bias.scalar_type() == at::kBFloat16 ||
                    bias.scalar_type() == at::kHalf,
                "correction_bias must be float32, bfloat16 or float16, got ", bias.scalar_type());
    TORCH_CHECK(bias.device() == router_logits.device(),
                "correction_bias must be on the same device as router_logits (", router_logits.device(), "), got ",
                bias.device());
  }
  return parsed;
}

namespace {

template <typename scalar_t>
void route_rows_cpu(const scalar_t* logits, const float* bias, float* weights_out, int32_t* ids_out,
                    int64_t num_tokens, int64_t num_experts, int64_t top_k, Scoring scoring, bool renormalize,
                    int64_t num_expert_group, int64_t topk_group, float scale) {
  const int64_t per_group = num_experts / num_expert_group;
  // About 16k logits per task: enough work to beat the fork overhead, small rows still spread out.
  const int64_t grain = std::max<int64_t>(1, 16384 / num_experts);
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> score(num_experts);
    std::vector<float> choice(num_experts);
    std::vector<uint64_t> group_keys(num_expert_group);
    std::vector<uint64_t> ranked_groups(num_expert_group);
    std::vector<uint64_t> candidates;
    candidates.reserve(num_experts);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = logits + t * num_experts;
      if (scoring == Scoring::kSoftmax) {
        // fmaxf skips NaN; a NaN or +inf logit then makes the sum, and so every score, NaN (as torch does)
        float row_max = -INFINITY;
        for (int64_t e = 0; e < num_experts; ++e) row_max = std::fmax(row_max, static_cast<float>(row[e]));
        float sum = 0.f;
        for (int64_t e = 0; e < num_experts; ++e) {
          score[e] = std::exp(static_cast<float>(row[e]) - row_max);
          sum += score[e];
        }
        const float inverse_sum = 1.f / sum;  // torch's softmax multiplies by the reciprocal too
        for (int64_t e = 0; e < num_experts; ++e) score[e] *= inverse_sum;
      } else {
        for (int64_t e = 0; e < num_experts; ++e) score[e] = sigmoid_score(static_cast<float>(row[e]));
      }
      for (int64_t e = 0; e < num_experts; ++e) choice[e] = bias != nullptr ? score[e] + bias[e] : score[e];

      // Group limit: an expert stays a candidate when its group ranks among the best topk_group.
      uint64_t group_threshold = 0;
      if (num_expert_group > 1) {
        for (int64_t g = 0; g < num_expert_group; ++g) {
          float best = -INFINITY, second = -INFINITY;
          for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
            push_top2(nan_to_neg_inf(choice[e]), best, second);
          }
          group_keys[g] = rank_key(group_score(best, second, bias != nullptr, per_group), static_cast<uint32_t>(g));
        }
        ranked_groups = group_keys;
        std::nth_element(ranked_groups.begin(), ranked_groups.begin() + (topk_group - 1), ranked_groups.end(),
                         std::greater<uint64_t>());
        group_threshold = ranked_groups[topk_group - 1];
      }

      candidates.clear();
      for (int64_t e = 0; e < num_experts; ++e) {
        if (num_expert_group > 1 && group_keys[e / per_group] < group_threshold) continue;
        candidates.push_back(rank_key(choice[e], static_cast<uint32_t>(e)));
      }
      std::partial_sort(candidates.begin(), candidates.begin() + top_k, candidates.end(), std::greater<uint64_t>());

      float* weights = weights_out + t * top_k;
      int32_t* ids = ids_out + t * top_k;
      float sum = 0.f;
      for (int64_t j = 0; j < top_k; ++j) {
        const uint32_t expert = rank_index(candidates[j]);
        ids[j] = static_cast<int32_t>(expert);
        weights[j] = score[expert];
        sum += weights[j];
      }
      const float denominator = sum + kRenormalizeEpsilon;
      for (int64_t j = 0; j < top_k; ++j) {
        if (renormalize) weights[j] /= denominator;
        weights[j] *= scale;
      }
    }
  });
}

}  // namespace
}  // namespace routing

std::tuple<at::Tensor, at::Tensor> topk_route_cpu(const at::Tensor& router_logits, int64_t top_k,
                                                  c10::string_view scoring, bool renormalize,
                                                  int64_t num_expert_group, int64_t topk_group,
                                                  const std::optional<at::Tensor>& correction_bias,
                                                  double routed_scaling_factor) {
  using namespace routing;
  const Scoring parsed =
      check_topk_route_args(router_logits, top_k, scoring, num_expert_group, topk_group, correction_bias,
                            routed_scaling_factor);
  const int64_t num_tokens = router_logits.size(0);
  const int64_t num_experts = router_logits.size(1);
  at::Tensor topk_weights = at::empty({num_tokens, top_k}, router_logits.options().dtype(at::kFloat));
  at::Tensor topk_ids = at::empty({num_tokens, top_k}, router_logits.options().dtype(at::kInt));
  if (num_tokens == 0) return {topk_weights, topk_ids};

  // Non-contiguous logits are handled by copying them contiguous first.
  const at::Tensor logits = router_logits.contiguous();
  at::Tensor bias;
  if (correction_bias.has_value()) bias = correction_bias->to(at::kFloat).contiguous();
  // (double is rejected by the checks above; the dispatch lists it only because the macro does)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_route_cpu", [&] {
    route_rows_cpu<scalar_t>(logits.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                             topk_weights.mutable_data_ptr<float>(), topk_ids.mutable_data_ptr<int32_t>(), num_tokens,
                             num_experts, top_k, parsed, renormalize, num_expert_group, topk_group,
                             static_cast<float>(routed_scaling_factor));
  });
  return {topk_weights, topk_ids};
}

}  // namespace moe_swap
