// topk_route on CUDA: one warp per token does the whole row in one pass: score, group-limit,
// top-k, renormalise, scale. Nothing is staged in global memory and nothing syncs with the host,
// so the op can be captured in a CUDA graph.
//
// The row is re-read (from L1/L2) instead of cached, so any E works; each of the k picks is "the
// best key below the previous pick" (keys are unique, see route_order.h), so no per-expert
// "taken" flags are needed. Lane j keeps pick j, hence top_k <= 32.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "core/checks.h"
#include "routing/route_order.h"
#include "routing/topk_route.h"

namespace moe_swap {
namespace routing {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxTopKCuda = kWarpSize;
constexpr int kWarpsPerBlock = 4;
// Group keys live in shared memory, one array per warp; stay within the default 48 KiB.
constexpr int64_t kSharedBudgetBytes = 48 * 1024;

__device__ __forceinline__ uint64_t warp_max(uint64_t value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const uint64_t other = __shfl_xor_sync(kFullMask, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// fmaxf skips NaN, as the CPU kernel's row max does.
__device__ __forceinline__ float warp_max(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = fmaxf(value, __shfl_xor_sync(kFullMask, value, offset));
  }
  return value;
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  return value;
}

template <typename scalar_t, bool kSoftmax>
__global__ void topk_route_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ bias,
                                  float* __restrict__ weights_out, int32_t* __restrict__ ids_out,
                                  int64_t num_tokens, int num_experts, int top_k, bool renormalize,
                                  int num_expert_group, int topk_group, float scale) {
  extern __shared__ uint64_t shared_group_keys[];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (token >= num_tokens) return;  // the whole warp leaves together
  const scalar_t* row = logits + token * num_experts;

  // Softmax as torch computes it: exp(x - max) * (1 / sum); a NaN or +inf logit makes every score NaN.
  float row_max = 0.f, inverse_sum = 1.f;
  if constexpr (kSoftmax) {
    float local_max = -INFINITY;
    for (int e = lane; e < num_experts; e += kWarpSize) local_max = fmaxf(local_max, static_cast<float>(row[e]));
    row_max = warp_max(local_max);
    float local_sum = 0.f;
    for (int e = lane; e < num_experts; e += kWarpSize) local_sum += expf(static_cast<float>(row[e]) - row_max);
    inverse_sum = 1.f / warp_sum(local_sum);
  }
  auto score_of = [&](int e) {
    const float x = static_cast<float>(row[e]);
    return kSoftmax ? expf(x - row_max) * inverse_sum : sigmoid_score(x);
  };
  auto choice_of = [&](int e, float score) { return bias != nullptr ? score + bias[e] : score; };

  // Group limit: the topk_group-th best group key is the threshold a group must reach.
  const bool grouped = num_expert_group > 1;
  const int per_group = num_experts / num_expert_group;
  uint64_t* group_keys = shared_group_keys + static_cast<int64_t>(warp) * num_expert_group;
  uint64_t group_threshold = 0;
  if (grouped) {
    for (int g = lane; g < num_expert_group; g += kWarpSize) {
      float best = -INFINITY, second = -INFINITY;
      for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
        push_top2(nan_to_neg_inf(choice_of(e, score_of(e))), best, second);
      }
      group_keys[g] = rank_key(group_score(best, second, bias != nullptr, per_group), static_cast<uint32_t>(g));
    }
    __syncwarp();
    uint64_t previous = UINT64_MAX;
    for (int i = 0; i < topk_group; ++i) {
      uint64_t local = 0;
      for (int g = lane; g < num_expert_group; g += kWarpSize) {
        const uint64_t key = group_keys[g];
        if (key < previous && key > local) local = key;
      }
      previous = warp_max(local);
    }
    group_threshold = previous;
  }

  // Pick j is the best expert ranked below pick j-1; lane j keeps it. Expert e belongs to lane e % 32.
  uint64_t previous = UINT64_MAX;
  float my_weight = 0.f;
  int32_t my_id = 0;
  for (int j = 0; j < top_k; ++j) {
    uint64_t local = 0;
    float local_score = 0.f;
    for (int e = lane; e < num_experts; e += kWarpSize) {
      if (grouped && group_keys[e / per_group] < group_threshold) continue;
      const float score = score_of(e);
      const uint64_t key = rank_key(choice_of(e, score), static_cast<uint32_t>(e));
      if (key < previous && key > local) {
        local = key;
        local_score = score;
      }
    }
    const uint64_t best = warp_max(local);
    // The checks guarantee at least top_k candidates, so `best` is a real expert, never the 0 sentinel.
    const uint32_t expert = rank_index(best);
    const float weight = __shfl_sync(kFullMask, local_score, static_cast<int>(expert % kWarpSize));
    if (lane == j) {
      my_weight = weight;
      my_id = static_cast<int32_t>(expert);
    }
    previous = best;
  }

  const float sum = warp_sum(lane < top_k ? my_weight : 0.f);
  if (lane < top_k) {
    float weight = renormalize ? my_weight / (sum + kRenormalizeEpsilon) : my_weight;
    weights_out[token * top_k + lane] = weight * scale;
    ids_out[token * top_k + lane] = my_id;
  }
}

}  // namespace
}  // namespace routing

std::tuple<at::Tensor, at::Tensor> topk_route_cuda(const at::Tensor& router_logits, int64_t top_k,
                                                   c10::string_view scoring, bool renormalize,
                                                   int64_t num_expert_group, int64_t topk_group,
                                                   const std::optional<at::Tensor>& correction_bias,
                                                   double routed_scaling_factor) {
  using namespace routing;
  const Scoring parsed =
      check_topk_route_args(router_logits, top_k, scoring, num_expert_group, topk_group, correction_bias,
                            routed_scaling_factor);
  TORCH_CHECK(top_k <= kMaxTopKCuda, "top_k must be <= ", kMaxTopKCuda, " on CUDA (one warp lane per pick), got ",
              top_k);
  const int64_t group_bytes_per_warp = num_expert_group > 1 ? num_expert_group * int64_t{sizeof(uint64_t)} : 0;
  TORCH_CHECK(group_bytes_per_warp <= kSharedBudgetBytes, "num_expert_group must be <= ",
              kSharedBudgetBytes / int64_t{sizeof(uint64_t)}, " on CUDA (group scores live in shared memory), got ",
              num_expert_group);

  c10::cuda::OptionalCUDAGuard device_guard(router_logits.device());
  const int64_t num_tokens = router_logits.size(0);
  const int64_t num_experts = router_logits.size(1);
  at::Tensor topk_weights = at::empty({num_tokens, top_k}, router_logits.options().dtype(at::kFloat));
  at::Tensor topk_ids = at::empty({num_tokens, top_k}, router_logits.options().dtype(at::kInt));
  if (num_tokens == 0) return {topk_weights, topk_ids};

  // Non-contiguous logits are handled by copying them contiguous first (on the current stream).
  const at::Tensor logits = router_logits.contiguous();
  at::Tensor bias;
  if (correction_bias.has_value()) bias = correction_bias->to(at::kFloat).contiguous();

  int warps_per_block = kWarpsPerBlock;
  if (group_bytes_per_warp > 0) {
    warps_per_block = static_cast<int>(std::min<int64_t>(kWarpsPerBlock, kSharedBudgetBytes / group_bytes_per_warp));
  }
  const int64_t blocks = (num_tokens + warps_per_block - 1) / warps_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "router_logits has too many tokens for one launch: ",
              num_tokens);
  const size_t shared_bytes = static_cast<size_t>(group_bytes_per_warp * warps_per_block);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_route_cuda", [&] {
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), warps_per_block * kWarpSize, shared_bytes, stream>>>(
          logits.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<float>() : nullptr,
          topk_weights.mutable_data_ptr<float>(), topk_ids.mutable_data_ptr<int32_t>(), num_tokens,
          static_cast<int>(num_experts), static_cast<int>(top_k), renormalize, static_cast<int>(num_expert_group),
          static_cast<int>(topk_group), static_cast<float>(routed_scaling_factor));
      MOE_SWAP_LAUNCH_CHECK();
    };
    if (parsed == Scoring::kSoftmax) {
      launch(topk_route_kernel<scalar_t, true>);
    } else {
      launch(topk_route_kernel<scalar_t, false>);
    }
  });
  return {topk_weights, topk_ids};
}

}  // namespace moe_swap
