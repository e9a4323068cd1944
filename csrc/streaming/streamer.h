// The weight streamer: a mechanism core (StreamerCore: HostStore, CopyEngine, statistics; placement.h)
// and one Placement per policy (the ring: ring_placement.h; the expert cache: expert_cache_placement.h)
// behind the torch ops `moe_swap::streamer_*` (schemas in torch_bindings.cpp). See ARCHITECTURE.md.
//
// State across calls: integer handles into a registry of shared_ptr<Streamer>, not a torch custom
// class. An int is a constant to torch.compile, so every op traces with a plain fake kernel (a
// script object would need register_fake_class and a fake twin of the whole schedule). Lifetime is
// still safe: each op looks its handle up under a lock and holds a shared_ptr for the call, handles
// are never reused, an unknown or destroyed handle is a clear error, and the destructor waits for
// every in-flight copy before memory goes.
#pragma once

#include "streaming/expert_cache.h"
#include "streaming/placement.h"
#include "streaming/ring_placement.h"

#include <ATen/core/Tensor.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace moe_swap::streaming {

// What moves per step: whole layers through the ring, or only the routed experts through the expert
// cache (a pool of expert-sized slots shared by every streamed layer).
enum class Policy {
  kFull,      // acquire(layer): the whole layer (RingPlacement)
  kOnDemand,  // acquire_experts(layer, topk_ids): the distinct routed experts not already cached
  kAuto,      // as on_demand, but a step that misses many experts copies the whole layer in one copy
};

class Streamer {
 public:
  // copy_overhead_us / copy_gb_per_s: policy auto's cost model, set instead of measured (both or neither).
  Streamer(c10::Device device, int64_t slots, int64_t prefetch_depth, Mode mode, bool trace, bool timing,
           Policy policy, int64_t cache_bytes, Eviction eviction, std::optional<double> copy_overhead_us,
           std::optional<double> copy_gb_per_s);
  ~Streamer();  // waits for in-flight copies and pending "free" events, then frees

  // The placement is expert-granular (on_demand/auto): steps go through acquire_experts.
  bool routes_experts() const { return placement_->routes_experts(); }

  int64_t reserve_layer(at::IntArrayRef w13_shape, at::IntArrayRef w2_shape, at::ScalarType dtype);
  void write(int64_t layer, int64_t which, int64_t expert_start, int64_t row_offset, const at::Tensor& src);
  // The layer's host-store weights as tensors on the streamer's device that read host memory
  // directly (CUDA: mapped pinned memory; CPU: the store itself), for expert_cache_pull. No copy.
  std::tuple<at::Tensor, at::Tensor> host_device_views(int64_t layer);
  // The expert cache's byte budget, before its pool is first allocated (the device ids path hands
  // the host path a budget once the layers, hence a layer's size, are known).
  void set_cache_bytes(int64_t cache_bytes);
  // policy full
  std::tuple<at::Tensor, at::Tensor> acquire(int64_t layer);
  void prefetch(int64_t layer);
  void release(int64_t layer);
  void synchronize();
  // policies on_demand/auto: see streamer_acquire_experts in torch_bindings.cpp
  std::tuple<at::Tensor, at::Tensor, at::Tensor> acquire_experts(int64_t layer, const at::Tensor& topk_ids,
                                                                 int64_t next_layer = -1,
                                                                 const std::optional<at::Tensor>& next_ids = {});
  void release_experts(int64_t layer);
  void predict(int64_t layer, const at::Tensor& expert_ids);

  // per-layer [L, kLayerStatsColumns] int64 (columns: stats.h); trace [n, 5] float64 (layer, slot, kind, start_us, end_us)
  std::tuple<at::Tensor, at::Tensor> stats();
  // [num_layers, host_bytes, device_bytes, slot_bytes, slots, prefetch_depth, untimed_spans]
  std::vector<int64_t> info();
  std::tuple<std::vector<int64_t>, at::Tensor> cache_state();

  // ---- test hooks (the moe_swap_testing ops) ----
  void set_test_hooks(int64_t copy_delay_us, int64_t fail_copy_at);
  std::tuple<at::Tensor, at::Tensor> host_copy(int64_t layer);

 private:
  std::mutex mu_;
  const int64_t num_slots_;
  const int64_t prefetch_depth_;
  std::unique_ptr<StreamerCore> core_;
  std::unique_ptr<Placement> placement_;  // after core_: destroyed first
};

// ---- torch op entry points (schemas in csrc/torch_bindings.cpp) ----
int64_t streamer_create(c10::string_view device, int64_t slots, int64_t prefetch_depth, c10::string_view mode,
                        bool trace, bool timing, c10::string_view policy, int64_t cache_bytes,
                        c10::string_view eviction, std::optional<double> copy_overhead_us,
                        std::optional<double> copy_gb_per_s);
void streamer_destroy(int64_t handle);
int64_t streamer_reserve_layer(int64_t handle, at::IntArrayRef w13_shape, at::IntArrayRef w2_shape,
                               at::ScalarType dtype);
void streamer_write(int64_t handle, int64_t layer, int64_t which, int64_t expert_start, int64_t row_offset,
                    const at::Tensor& src);
int64_t streamer_add_layer(int64_t handle, const at::Tensor& w13, const at::Tensor& w2);
std::tuple<at::Tensor, at::Tensor> streamer_host_device_views(int64_t handle, int64_t layer);
void streamer_set_cache_bytes(int64_t handle, int64_t cache_bytes);
std::tuple<at::Tensor, at::Tensor> streamer_acquire(int64_t handle, int64_t layer, at::TensorList after);
void streamer_prefetch(int64_t handle, int64_t layer);
void streamer_release(int64_t handle, int64_t layer, at::TensorList after);
void streamer_synchronize(int64_t handle);
std::tuple<at::Tensor, at::Tensor> streamer_stats(int64_t handle);
std::vector<std::string> streamer_stats_columns();
std::vector<int64_t> streamer_info(int64_t handle);
std::tuple<at::Tensor, at::Tensor, at::Tensor> streamer_acquire_experts(int64_t handle, int64_t layer,
                                                                      const at::Tensor& topk_ids, int64_t next_layer,
                                                                      const std::optional<at::Tensor>& next_ids);
void streamer_release_experts(int64_t handle, int64_t layer, at::TensorList after);
at::Tensor streamer_moe(int64_t handle, int64_t layer, const at::Tensor& hidden_states, const at::Tensor& topk_weights,
                        const at::Tensor& topk_ids, c10::string_view activation, int64_t next_layer,
                        const std::optional<at::Tensor>& next_ids, const std::optional<at::Tensor>& w13_bias,
                        const std::optional<at::Tensor>& w2_bias, bool gated, double swiglu_alpha,
                        double swiglu_limit);
void streamer_predict(int64_t handle, int64_t layer, const at::Tensor& expert_ids);
std::tuple<std::vector<int64_t>, at::Tensor> streamer_cache_state(int64_t handle);

// ---- test hooks (the moe_swap_testing library) ----
void testing_set_hooks(int64_t handle, int64_t copy_delay_us, int64_t fail_copy_at);
std::tuple<at::Tensor, at::Tensor> testing_host_copy(int64_t handle, int64_t layer);
// [live streamers, live host-store bytes, live host-store blocks] across the process (leak tests)
std::vector<int64_t> testing_live_counts();

}  // namespace moe_swap::streaming
