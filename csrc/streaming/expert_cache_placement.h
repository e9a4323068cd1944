// ExpertCachePlacement (policies on_demand and auto): only the distinct routed experts a step misses
// move, into a pool of expert-sized device slots shared by every layer (DevicePool), with the
// bookkeeping of ExpertCache (expert_cache.h: which (layer, expert) each slot holds, the eviction
// policy). The step's misses go on the demand channel; guesses at a later step's routing (predict, or
// acquire's next_ids) and whole next layers go on the ahead channel, behind them. Policy auto adds a
// CopyCostModel: a step whose missing experts cost more as separate copies than the whole layer in one
// copy per bank copies the layer into a region of E slots, and with room for two regions a wide step
// (a prefill) copies the next layer whole into the other region under its compute.
#pragma once

#include "streaming/copy_cost_model.h"
#include "streaming/device_pool.h"
#include "streaming/expert_cache.h"
#include "streaming/placement.h"

#include <optional>
#include <vector>

namespace moe_swap::streaming {

class ExpertCachePlacement final : public Placement {
 public:
  // cost_model: policy auto (its figures set by the creator, or measured when unset); none: on_demand.
  ExpertCachePlacement(StreamerCore& core, int64_t cache_bytes, Eviction eviction,
                       std::optional<CopyCostModel> cost_model);

  bool routes_experts() const override { return true; }
  void check_new_layer(at::IntArrayRef w13_shape, at::IntArrayRef w2_shape, at::ScalarType dtype) const override;
  void layer_added(int64_t layer) override;
  bool held(int64_t layer) const override { return held_[layer]; }
  void forget_layer(int64_t layer) override;
  StepWeights acquire(const StepRequest& step) override;
  void release(int64_t layer) override;
  void predict(int64_t layer, const at::Tensor& expert_ids) override;
  int64_t device_bytes() const override { return static_cast<int64_t>(pool_.bytes()); }
  int64_t slot_bytes() const override { return 0; }
  std::tuple<std::vector<int64_t>, at::Tensor> cache_state() const override;
  void set_cache_bytes(int64_t cache_bytes) override;

 private:
  // The distinct ids in first-seen order (a reference to distinct_: valid until the next call).
  const std::vector<int64_t>& distinct_ids_on_host(const char* op, int64_t layer, const at::Tensor& ids,
                                                   const char* arg);
  void ensure_pool(int64_t slots_needed);
  int64_t expert_bytes() const { return expert_bytes_[kW13Bank] + expert_bytes_[kW2Bank]; }
  void add_expert_chunks(CopyPlan& plan, int64_t layer, int64_t expert, int64_t slot) const;
  // predict()'s body: the distinct guessed experts of `layer` not cached take free or evictable slots
  // (never this step's nor other guesses') and are copied on the ahead channel.
  void predict_distinct(int64_t layer, const std::vector<int64_t>& distinct);
  void issue_ahead(CopyPlan& plan, const std::vector<int64_t>& slots);
  bool whole_layer_is_cheaper(int64_t layer, int64_t misses, int64_t base) const;
  void place_whole_layer(int64_t target, int64_t base, bool predicted, CopyPlan& plan,
                         std::vector<int64_t>& assigned);

  int64_t cache_bytes_;
  ExpertCache cache_;
  std::optional<CopyCostModel> cost_model_;  // policy auto
  DevicePool pool_{DevicePool::Layout::kOneAllocation};
  std::vector<int64_t> w13_expert_shape_, w2_expert_shape_;  // per-expert [2I, H] and [H, I]
  std::array<int64_t, kWeightBanks> expert_bytes_ = {0, 0};  // bytes of one expert's record per bank
  std::array<at::Tensor, kWeightBanks> pool_views_;          // the pool as [N, 2I, H] and [N, H, I] of dtype_
  at::ScalarType dtype_ = at::kFloat;
  int64_t max_layer_experts_ = 0;  // one layer region of the pool (policy auto)
  int64_t total_experts_ = 0;      // every layer's experts: the most the cache can hold
  std::vector<bool> held_;         // per layer: its step is acquired
  int64_t clock_ = 0;              // one tick per step: the cache's notion of time
  std::vector<int64_t> ahead_pending_;  // slots whose copy ahead nobody has waited for yet
  // per-step scratch, kept so that a step's bookkeeping allocates nothing
  std::vector<char> routed_seen_;  // [E], all zero between calls: distinct_ids_on_host's marks
  std::vector<int64_t> distinct_, step_misses_, step_assigned_, evicted_layers_, ahead_slots_;
  std::vector<int64_t> next_distinct_, predict_assigned_;  // acquire's guess at the next layer
};

}  // namespace moe_swap::streaming
