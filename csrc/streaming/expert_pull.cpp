// expert_cache_pull: input contract and the CPU kernel (see expert_pull.h for the algorithm).
#include "streaming/expert_pull.h"

#include <ATen/ATen.h>

#include <cstring>
#include <vector>

#include "core/checks.h"
#include "ops.h"

namespace moe_swap::streaming {

int64_t check_expert_cache_pull(const at::Tensor& topk_ids, const at::Tensor& host_w13, const at::Tensor& host_w2,
                                const at::Tensor& pool_w13, const at::Tensor& pool_w2, int64_t slot_base,
                                const at::Tensor& slot_expert, const at::Tensor& slot_stamp, const at::Tensor& clock,
                                const at::Tensor& expert_map, const at::Tensor& counters) {
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  MOE_SWAP_CHECK_DIM(host_w13, 3);
  MOE_SWAP_CHECK_DIM(host_w2, 3);
  MOE_SWAP_CHECK_DIM(pool_w13, 3);
  MOE_SWAP_CHECK_DIM(pool_w2, 3);
  const int64_t E = host_w13.size(0);
  TORCH_CHECK(E >= 1 && E <= kMaxPullExperts, "host_w13.size(0) (experts) must be in [1, ", kMaxPullExperts, "], got ", E);
  MOE_SWAP_CHECK_SIZE(host_w2, 0, E, "host_w13.size(0)");
  MOE_SWAP_CHECK_SIZE(pool_w13, 1, host_w13.size(1), "host_w13.size(1)");
  MOE_SWAP_CHECK_SIZE(pool_w13, 2, host_w13.size(2), "host_w13.size(2)");
  MOE_SWAP_CHECK_SIZE(pool_w2, 1, host_w2.size(1), "host_w2.size(1)");
  MOE_SWAP_CHECK_SIZE(pool_w2, 2, host_w2.size(2), "host_w2.size(2)");
  MOE_SWAP_CHECK_SIZE(pool_w2, 0, pool_w13.size(0), "pool_w13.size(0)");
  MOE_SWAP_CHECK_SAME_DTYPE(host_w13, host_w2);
  MOE_SWAP_CHECK_SAME_DTYPE(host_w13, pool_w13);
  MOE_SWAP_CHECK_SAME_DTYPE(host_w13, pool_w2);
  for (const at::Tensor* t : {&host_w13, &host_w2, &pool_w13, &pool_w2}) {
    TORCH_CHECK(t->is_contiguous(), "host_w13, host_w2, pool_w13 and pool_w2 must be contiguous, got shape ",
                shape_str(*t), " with strides ", t->strides());
  }
  MOE_SWAP_CHECK_DIM(slot_expert, 1);
  MOE_SWAP_CHECK_DTYPE(slot_expert, at::kInt);
  MOE_SWAP_CHECK_DTYPE(slot_stamp, at::kLong);
  MOE_SWAP_CHECK_DTYPE(clock, at::kLong);
  MOE_SWAP_CHECK_DTYPE(expert_map, at::kInt);
  MOE_SWAP_CHECK_DTYPE(counters, at::kLong);
  const int64_t C = slot_expert.size(0);
  TORCH_CHECK(slot_stamp.dim() == 1 && slot_stamp.size(0) == C, "slot_stamp must be [", C,
              "] like slot_expert, got shape ", shape_str(slot_stamp));
  TORCH_CHECK(clock.numel() == 1, "clock must hold one element, got shape ", shape_str(clock));
  TORCH_CHECK(expert_map.dim() == 1 && expert_map.size(0) == E, "expert_map must be [", E, "] (one per expert), got ",
              shape_str(expert_map));
  TORCH_CHECK(counters.numel() == 2, "counters must hold 2 elements (hits, misses), got shape ", shape_str(counters));
  // (compared without forming slot_base + C, which overflows for a slot_base near INT64_MAX)
  TORCH_CHECK(slot_base >= 0 && C <= pool_w13.size(0) && slot_base <= pool_w13.size(0) - C, "slot_base must be in [0, ",
              pool_w13.size(0), " - ", C, "] (the region [slot_base, slot_base + ", C, ") must lie in the pool's ",
              pool_w13.size(0), " slots), got ", slot_base);
  const int64_t working_set = std::min<int64_t>(E, topk_ids.numel());
  TORCH_CHECK(C >= working_set, "the region has ", C, " slots but a step may route ", working_set,
              " distinct experts (min(E, topk_ids.numel())); give the layer at least that many slots");
  for (const at::Tensor* t : {&topk_ids, &host_w13, &host_w2, &pool_w2, &slot_expert, &slot_stamp, &clock,
                              &expert_map, &counters}) {
    TORCH_CHECK(t->device() == pool_w13.device(), "every tensor of expert_cache_pull must be on pool_w13's device ",
                pool_w13.device(), " (on CUDA, host weights as a mapped view), got one on ", t->device());
  }
  for (const at::Tensor* t : {&slot_expert, &slot_stamp, &clock, &expert_map, &counters}) {
    TORCH_CHECK(t->is_contiguous(), "slot_expert, slot_stamp, clock, expert_map and counters must be contiguous");
  }
  return E;
}

}  // namespace moe_swap::streaming

namespace moe_swap {

void expert_cache_pull_cpu(const at::Tensor& topk_ids, const at::Tensor& host_w13, const at::Tensor& host_w2,
                           const at::Tensor& pool_w13, const at::Tensor& pool_w2, int64_t slot_base,
                           const at::Tensor& slot_expert, const at::Tensor& slot_stamp, const at::Tensor& clock,
                           const at::Tensor& expert_map, const at::Tensor& counters) {
  const int64_t E = streaming::check_expert_cache_pull(topk_ids, host_w13, host_w2, pool_w13, pool_w2, slot_base,
                                                       slot_expert, slot_stamp, clock, expert_map, counters);
  const at::Tensor ids = topk_ids.contiguous().to(at::kLong);
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<char> needed(E, 0);
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < E, "topk_ids must be expert ids in [0, ", E, "), got ", id[i], " at flat position ", i);
    needed[id[i]] = 1;
  }
  const int64_t C = slot_expert.size(0);
  int32_t* holds = slot_expert.data_ptr<int32_t>();
  int64_t* stamp = slot_stamp.data_ptr<int64_t>();
  int32_t* map = expert_map.data_ptr<int32_t>();
  int64_t* count = counters.data_ptr<int64_t>();
  const int64_t now = ++*clock.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) map[e] = -1;
  for (int64_t s = 0; s < C; ++s) {  // hits
    const int32_t e = holds[s];
    if (e >= 0 && e < E && needed[e]) {
      needed[e] = 2;
      stamp[s] = now;
      map[e] = static_cast<int32_t>(slot_base + s);
      ++count[0];
    }
  }
  const size_t bytes[2] = {static_cast<size_t>(host_w13[0].nbytes()), static_cast<size_t>(host_w2[0].nbytes())};
  const uint8_t* src[2] = {static_cast<const uint8_t*>(host_w13.data_ptr()), static_cast<const uint8_t*>(host_w2.data_ptr())};
  uint8_t* dst[2] = {static_cast<uint8_t*>(pool_w13.data_ptr()), static_cast<uint8_t*>(pool_w2.data_ptr())};
  for (int64_t e = 0; e < E; ++e) {  // misses: the oldest slot not used by this step (empty slots first)
    if (needed[e] != 1) continue;
    int64_t victim = -1;
    for (int64_t s = 0; s < C; ++s) {
      if (stamp[s] == now && holds[s] >= 0) continue;
      if (victim < 0 || (holds[s] < 0 && holds[victim] >= 0) ||
          ((holds[s] < 0) == (holds[victim] < 0) && stamp[s] < stamp[victim])) {
        victim = s;
      }
    }
    TORCH_INTERNAL_ASSERT(victim >= 0, "expert_cache_pull: no slot (the region size was checked)");
    holds[victim] = static_cast<int32_t>(e);
    stamp[victim] = now;
    map[e] = static_cast<int32_t>(slot_base + victim);
    ++count[1];
    for (int w = 0; w < 2; ++w) std::memcpy(dst[w] + (slot_base + victim) * bytes[w], src[w] + e * bytes[w], bytes[w]);
  }
}

}  // namespace moe_swap
