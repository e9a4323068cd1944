// RingPlacement (policy full): whole layers through a ScratchRing of N layer-sized device slots, each
// slot its own copy channel ("ready": its copy landed; "free": the compute that read it is done).
// acquire(l) waits for l's slot (copying it first if it was never prefetched) and prefetches the next
// layers into the slots needed furthest ahead (Belady: the cyclic order is known); the schedule wraps
// around to the next forward pass. Modes: full (the design), and the baselines sync (vLLM's legacy
// cpu_offload_gb: copy on the compute stream, then compute) and uva (kernels read mapped pinned memory).
#pragma once

#include "streaming/device_pool.h"
#include "streaming/placement.h"

#include <string>
#include <vector>

namespace moe_swap::streaming {

enum class Mode {
  kFull,  // the design: copy engine + ring + prefetch, copies overlap compute
  kSync,  // baseline: vLLM's legacy cpu_offload_gb (copy on the compute stream, then compute)
  kUva,   // baseline: vLLM's uva offload (kernels read mapped pinned host memory, no copy)
};

class RingPlacement final : public Placement {
 public:
  RingPlacement(StreamerCore& core, Mode mode, int64_t slots, int64_t prefetch_depth);

  bool routes_experts() const override { return false; }
  void layer_added(int64_t layer) override { held_slot_.push_back(kNotHeld); }
  bool held(int64_t layer) const override { return held_slot_[layer] != kNotHeld; }
  void forget_layer(int64_t layer) override;
  StepWeights acquire(const StepRequest& step) override;
  void release(int64_t layer) override;
  void prefetch(int64_t layer) override;
  void predict(int64_t layer, const at::Tensor& expert_ids) override;
  int64_t device_bytes() const override { return static_cast<int64_t>(ring_.bytes()); }
  int64_t slot_bytes() const override { return static_cast<int64_t>(ring_.slot_bytes()); }
  std::tuple<std::vector<int64_t>, at::Tensor> cache_state() const override;
  void set_cache_bytes(int64_t cache_bytes) override;

 private:
  static constexpr int kNotHeld = -1;
  static constexpr int kHeldWithoutSlot = -2;  // uva: the layer is held, its views read host memory directly

  struct Slot {
    int64_t layer = -1;      // the layer it holds or is receiving; -1 empty
    bool held = false;       // acquired and not yet released
    std::string issue_error; // a prefetch copy that could not be issued; raised at acquire
  };

  void ensure_slots();
  bool slots_fit() const;
  bool try_fit_slots();
  int find_slot(int64_t layer) const;
  int64_t distance(int64_t from, int64_t to) const;
  int pick_victim(int64_t cursor, int64_t limit) const;
  CopyPlan plan_copy(int64_t layer, int slot) const;
  void issue_into(int slot, int64_t layer, bool demand);
  void prefetch_window();
  std::string held_layers() const;

  const Mode mode_;
  const int64_t num_slots_;
  const int64_t prefetch_depth_;
  // Sized for the largest layer; allocated at the first acquire/prefetch, re-sized if a larger layer
  // is added later.
  DevicePool ring_{DevicePool::Layout::kAllocationPerSlot};
  std::vector<Slot> slots_;
  std::vector<int> held_slot_;  // per layer: the slot it holds while acquired, or kNotHeld / kHeldWithoutSlot
  int64_t cursor_ = -1;         // the last acquired layer: prefetch looks ahead from here
};

}  // namespace moe_swap::streaming
