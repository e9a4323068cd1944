// The weight streamer: HostStore (every streamed layer's experts in exact-size host memory) +
// ScratchRing (N device slots with "ready"/"free" events, copies on a dedicated copy engine) +
// the schedule (acquire / prefetch / release, wrapping around to the next forward pass).
//
// Entry points below are the torch ops `moe_swap::streamer_*` (schemas in torch_bindings.cpp).
//
// State across calls: integer handles into a registry of shared_ptr<Streamer>, not a torch custom
// class. An int is a constant to torch.compile, so every op traces with a plain fake kernel (a
// script object would need register_fake_class and a fake twin of the whole schedule). Lifetime is
// still safe: each op looks its handle up under a lock and holds a shared_ptr for the call, handles
// are never reused, an unknown or destroyed handle is a clear error, and the destructor waits for
// every in-flight copy before memory goes.
#pragma once

#include "streaming/backend.h"
#include "streaming/expert_cache.h"
#include "streaming/host_store.h"

#include <ATen/core/Tensor.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace moe_swap::streaming {

enum class Mode {
  kFull,  // the design: copy engine + ring + prefetch, copies overlap compute
  kSync,  // baseline: vLLM's legacy cpu_offload_gb (copy on the compute stream, then compute)
  kUva,   // baseline: vLLM's uva offload (kernels read mapped pinned host memory, no copy)
};

// What moves per step: whole layers through the ScratchRing, or only the routed experts through
// the expert cache (a pool of expert-sized slots shared by every streamed layer).
enum class Policy {
  kFull,      // acquire(layer): the whole layer
  kOnDemand,  // acquire_experts(layer, topk_ids): the distinct routed experts not already cached
  kAuto,      // as on_demand, but a step that misses many experts copies the whole layer in one copy
};

// Per-layer statistics (one row of streamer_stats' table, in this column order).
struct LayerStats {
  int64_t bytes_copied = 0;
  int64_t copies_issued = 0;    // whole-layer copies
  int64_t chunks_issued = 0;    // memcpy calls (per expert, or per run of small experts)
  int64_t acquires = 0;
  int64_t hits = 0;             // acquires that found the layer resident or already copying
  int64_t demand_copies = 0;    // acquires that had to start the copy themselves
  int64_t wait_ns = 0;          // time the compute stream waited on this layer's copies
  int64_t waits_timed = 0;
  // policy on_demand (per step, each distinct routed expert is one lookup)
  int64_t expert_hits = 0;       // already in the cache (or brought in by a prediction)
  int64_t expert_misses = 0;     // copied by this step
  int64_t evictions = 0;         // this layer's experts given up for others (or trimmed to the budget)
  int64_t predicted = 0;         // experts copied ahead by predict()
  int64_t predicted_used = 0;    // of those, routed at the layer's next step (recall's numerator)
  int64_t routed_distinct = 0;   // distinct routed experts over all steps (hits + misses)
  int64_t ids_to_host_ns = 0;    // time to bring topk_ids to the host (a device sync on CUDA)
  int64_t layer_copies = 0;      // policy auto: steps that copied the whole layer in one copy
};
constexpr int kLayerStatsColumns = 16;

class Streamer {
 public:
  // copy_overhead_us / copy_gb_per_s: policy auto's cost model, set instead of measured (both or neither).
  Streamer(c10::Device device, int64_t slots, int64_t prefetch_depth, Mode mode, bool trace, bool timing,
           int64_t test_copy_delay_us, int64_t test_fail_copy_at, Policy policy, int64_t cache_bytes,
           Eviction eviction, std::optional<double> copy_overhead_us, std::optional<double> copy_gb_per_s);
  ~Streamer();  // waits for in-flight copies and pending "free" events, then frees

  int64_t reserve_layer(at::IntArrayRef w13_shape, at::IntArrayRef w2_shape, at::ScalarType dtype);
  void write(int64_t layer, int64_t which, int64_t expert_start, int64_t row_offset, const at::Tensor& src);
  std::tuple<at::Tensor, at::Tensor> host_copy(int64_t layer);
  // The layer's host-store weights as tensors on the streamer's device that read host memory
  // directly (CUDA: mapped pinned memory; CPU: the store itself), for expert_cache_pull. No copy.
  std::tuple<at::Tensor, at::Tensor> host_device_views(int64_t layer);
  // The expert cache's byte budget, before its pool is first allocated (the device ids path hands
  // the host path a budget once the layers, hence a layer's size, are known).
  void set_cache_bytes(int64_t cache_bytes);
  std::tuple<at::Tensor, at::Tensor> acquire(int64_t layer);
  void prefetch(int64_t layer);
  void release(int64_t layer);
  void synchronize();

  // ---- policy on_demand ----
  // Copy the distinct experts in `topk_ids` that are not cached into the pool; the current stream
  // waits for them. Returns the pool (w13 [N, 2I, H], w2 [N, H, I]) and expert_map int32 [E]
  // (expert -> pool slot, -1 not routed this step), for fused_moe. Valid until release_experts; one
  // step at a time (another layer's step must be released first).
  // `next_ids` (with `next_layer`): a guess at that layer's routing, predicted as by predict() but
  // issued after this step's own copies, so that the copy engine works on it under this step's
  // compute instead of delaying this step (one copy engine runs copies in issue order).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> acquire_experts(int64_t layer, const at::Tensor& topk_ids,
                                                                 int64_t next_layer = -1,
                                                                 const std::optional<at::Tensor>& next_ids = {});
  // The step is over: its slots may be reused once the work queued so far on the current stream is done.
  void release_experts(int64_t layer);
  // Start copying the experts in `expert_ids` (any shape, the predicted routing of `layer`'s next
  // step) that are not cached, on the copy engine; a hint, never waited for here.
  void predict(int64_t layer, const at::Tensor& expert_ids);

  // per-layer [L, kLayerStatsColumns] int64; trace [n, 5] float64 (layer, slot, kind, start_us, end_us)
  std::tuple<at::Tensor, at::Tensor> stats();
  // [num_layers, host_bytes, device_bytes, slot_bytes, slots, prefetch_depth, untimed_spans]
  std::vector<int64_t> info();
  std::tuple<std::vector<int64_t>, at::Tensor> cache_state();

 private:
  struct Slot {
    int64_t layer = -1;      // the layer it holds or is receiving; -1 empty
    bool held = false;       // acquired and not yet released
    std::string issue_error; // a prefetch copy that could not be issued; raised at acquire
  };

  void check_layer(const char* op, int64_t layer) const;
  void ensure_slots();
  bool slots_fit() const;
  bool try_fit_slots();
  int find_slot(int64_t layer) const;
  int64_t distance(int64_t from, int64_t to) const;
  int pick_victim(int64_t cursor, int64_t limit) const;
  CopyPlan plan_copy(int64_t layer, int slot);
  void issue_into(int slot, int64_t layer, bool demand);
  void prefetch_window();
  std::tuple<at::Tensor, at::Tensor> slot_views(int slot, int64_t layer);
  void collect_spans(bool block);
  // on_demand
  // The distinct ids in first-seen order (a reference to distinct_: valid until the next call).
  const std::vector<int64_t>& distinct_ids_on_host(const char* op, int64_t layer, const at::Tensor& ids,
                                                   const char* arg);
  void ensure_pool(int64_t slots_needed);
  void add_expert_chunks(CopyPlan& plan, int64_t layer, int64_t expert, int64_t slot) const;
  void issue_expert_plan(CopyPlan& plan, int channel);
  // predict()'s body, under mu_: the distinct guessed experts of `layer` not cached take free or
  // evictable slots (never this step's nor other guesses') and are copied on the predict channel.
  void predict_distinct(int64_t layer, const std::vector<int64_t>& distinct);
  void issue_prediction(CopyPlan& plan, const std::vector<int64_t>& slots);
  void calibrate_copy_cost();
  bool whole_layer_is_cheaper(int64_t layer, int64_t misses, int64_t base) const;
  bool whole_layer_costs_no_more(int64_t layer, int64_t misses) const;
  void place_whole_layer(int64_t target, int64_t base, bool predicted, CopyPlan& plan,
                         std::vector<int64_t>& assigned);

  std::mutex mu_;
  const Mode mode_;
  const int64_t num_slots_;
  const int64_t prefetch_depth_;
  const bool trace_;
  const int64_t test_fail_copy_at_;
  std::unique_ptr<StreamBackend> backend_;
  HostStore store_;
  // ScratchRing
  // Per slot a w13 area and a w2 area (separate allocations, so acquire's two outputs never share a
  // storage), sized for the largest layer; allocated at the first acquire/prefetch, re-sized if a
  // larger layer is added later.
  std::vector<std::array<at::Tensor, 2>> slot_memory_;
  size_t slot_area_bytes_[2] = {0, 0};
  size_t slot_bytes() const { return slot_area_bytes_[0] + slot_area_bytes_[1]; }
  std::vector<Slot> slots_;
  std::vector<int> held_slot_;  // per layer: the slot it holds while acquired, or -1 (uva: 0 when held)
  int64_t cursor_ = -1;         // the last acquired layer: prefetch looks ahead from here
  int64_t copies_issued_total_ = 0;
  // expert cache (policy on_demand): a pool of expert-sized slots, w13 and w2 areas, for all layers
  const Policy policy_;
  int64_t cache_bytes_;
  ExpertCache cache_;
  std::array<at::Tensor, 2> pool_memory_;
  std::vector<int64_t> pool_w13_shape_, pool_w2_shape_;  // per-expert [2I, H] and [H, I]
  std::array<int64_t, 2> pool_expert_bytes_ = {0, 0};     // bytes of one expert's w13 and w2
  std::array<at::Tensor, 2> pool_views_;                  // the pool as [N, 2I, H] and [N, H, I] of pool_dtype_
  int64_t max_layer_experts_ = 0;                         // one layer region of the pool (policy auto)
  int64_t total_experts_ = 0;                             // every layer's experts: the most the cache can hold
  at::ScalarType pool_dtype_ = at::kFloat;
  int64_t clock_ = 0;               // one tick per acquire_experts: the cache's notion of time
  std::vector<int64_t> predicted_pending_;  // slots whose predicted copy nobody has waited for yet
  // per-step scratch, kept so that a step's bookkeeping allocates nothing (all under mu_)
  std::vector<char> routed_seen_;           // [E], all zero between calls: distinct_ids_on_host's marks
  std::vector<int64_t> distinct_, step_misses_, step_assigned_, evicted_layers_, ahead_slots_;
  std::vector<int64_t> next_distinct_, predict_assigned_;  // acquire_experts' guess at the next layer
  // policy auto's cost model, measured on this machine when the pool is first allocated (unless the
  // creator set it): a copy of b bytes costs copy_overhead_s_ + b / copy_bytes_per_s_
  double copy_overhead_s_ = -1.0;
  double copy_bytes_per_s_ = -1.0;
  // statistics
  std::vector<LayerStats> layer_stats_;
  std::vector<Span> trace_spans_;
};

// ---- torch op entry points (schemas in csrc/torch_bindings.cpp) ----
int64_t streamer_create(c10::string_view device, int64_t slots, int64_t prefetch_depth, c10::string_view mode,
                        bool trace, bool timing, int64_t test_copy_delay_us, int64_t test_fail_copy_at,
                        c10::string_view policy, int64_t cache_bytes, c10::string_view eviction,
                        std::optional<double> copy_overhead_us, std::optional<double> copy_gb_per_s);
void streamer_destroy(int64_t handle);
int64_t streamer_reserve_layer(int64_t handle, at::IntArrayRef w13_shape, at::IntArrayRef w2_shape,
                               at::ScalarType dtype);
void streamer_write(int64_t handle, int64_t layer, int64_t which, int64_t expert_start, int64_t row_offset,
                    const at::Tensor& src);
int64_t streamer_add_layer(int64_t handle, const at::Tensor& w13, const at::Tensor& w2);
std::tuple<at::Tensor, at::Tensor> streamer_host_copy(int64_t handle, int64_t layer);
std::tuple<at::Tensor, at::Tensor> streamer_host_device_views(int64_t handle, int64_t layer);
void streamer_set_cache_bytes(int64_t handle, int64_t cache_bytes);
std::tuple<at::Tensor, at::Tensor> streamer_acquire(int64_t handle, int64_t layer, at::TensorList after);
void streamer_prefetch(int64_t handle, int64_t layer);
void streamer_release(int64_t handle, int64_t layer, at::TensorList after);
void streamer_synchronize(int64_t handle);
std::tuple<at::Tensor, at::Tensor> streamer_stats(int64_t handle);
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
// [pool slots, cache capacity slots, occupied slots, expert bytes, copy overhead ns, copy bytes/s] and
// the (layer, expert) per pool slot [N, 2]; the last two are -1 until policy auto has calibrated
std::tuple<std::vector<int64_t>, at::Tensor> streamer_cache_state(int64_t handle);
// [live streamers, live host-store bytes, live host-store blocks] across the process (leak tests)
std::vector<int64_t> streamer_live_counts();

}  // namespace moe_swap::streaming
