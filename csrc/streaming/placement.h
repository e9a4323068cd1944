// The placement seam: the mechanism core (StreamerCore: HostStore, CopyEngine, statistics) knows no
// policy; a Placement decides, per step, which bytes are copied where and what the step computes on.
// One implementation per policy, each in its own file:
//   RingPlacement        (ring_placement.cpp)         policy full, modes full/sync/uva: whole layers
//                                                     through a ring of layer-sized slots
//   ExpertCachePlacement (expert_cache_placement.cpp) policies on_demand/auto: routed experts through
//                                                     a pool of expert-sized slots (auto: with a
//                                                     CopyCostModel, copy_cost_model.h)
// A new policy is a new Placement, not new branches in these. The Streamer (streamer.cpp) holds the
// lock, checks the op's arguments against the placement kind, and delegates.
#pragma once

#include "streaming/copy_engine.h"
#include "streaming/host_store.h"
#include "streaming/stats.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace moe_swap::streaming {

// The mechanism every placement works over. Owned by the Streamer; used under its lock.
struct StreamerCore {
  StreamerCore(std::unique_ptr<StreamBackend> backend, bool trace) : engine(std::move(backend), stats), trace(trace) {}

  HostStore store;
  std::vector<LayerStats> stats;  // per layer
  CopyEngine engine;              // after `stats`, which it counts into
  const bool trace;
  std::vector<Span> trace_spans;

  int64_t num_layers() const { return store.num_layers(); }
  bool fully_written(int64_t layer) const { return store.bytes_written(layer) >= store.layout(layer).host_bytes(); }
  void check_layer(const char* op, int64_t layer) const;
  // Move finished spans from the backend: waits into the statistics, and with `trace` into the trace.
  void collect_spans(bool block);
};

// One step of one layer, as the op passed it. topk_ids / next_ids: null when the op has none.
struct StepRequest {
  int64_t layer;
  const at::Tensor* topk_ids = nullptr;
  int64_t next_layer = -1;
  const at::Tensor* next_ids = nullptr;
};

// What a step computes on: w13 and w2 (a layer's own [E, ...] views, or a pool's [N, ...]) and, for an
// expert-granular placement, expert_map int32 [E] (expert -> row of w13/w2, -1 not routed here).
struct StepWeights {
  at::Tensor w13, w2, expert_map;
};

class Placement {
 public:
  explicit Placement(StreamerCore& core) : core_(core) {}
  virtual ~Placement() = default;
  Placement(const Placement&) = delete;
  Placement& operator=(const Placement&) = delete;

  // Expert-granular: a step names its routed ids, and gets a pool and an expert map back.
  virtual bool routes_experts() const = 0;

  // ---- layers ----
  // Refuse a layer this placement cannot serve (before its host memory is allocated).
  virtual void check_new_layer(at::IntArrayRef w13_shape, at::IntArrayRef w2_shape, at::ScalarType dtype) const {}
  virtual void layer_added(int64_t layer) = 0;
  virtual bool held(int64_t layer) const = 0;
  // The layer's host bytes are about to change: wait for copies reading them, forget device copies.
  virtual void forget_layer(int64_t layer) = 0;

  // ---- the step ----
  // The current stream waits for the step's bytes; the views stay valid until release(layer).
  virtual StepWeights acquire(const StepRequest& step) = 0;
  // The step is over: its slots may be reused once the work queued so far on the current stream is done.
  virtual void release(int64_t layer) = 0;
  // Hints: start copying a layer (ring) or a guess at a layer's routing (cache) ahead.
  virtual void prefetch(int64_t layer) {}
  virtual void predict(int64_t layer, const at::Tensor& expert_ids) = 0;

  // ---- numbers ----
  virtual int64_t device_bytes() const = 0;  // allocated now
  virtual int64_t slot_bytes() const = 0;    // a ring slot (0: no ring)
  // [pool slots, capacity slots, occupied slots, expert bytes, copy overhead ns, copy bytes/s] and the
  // (layer, expert) per pool slot [N, 2] (no pool: zeros and an empty table).
  virtual std::tuple<std::vector<int64_t>, at::Tensor> cache_state() const = 0;
  virtual void set_cache_bytes(int64_t cache_bytes) = 0;

 protected:
  StreamerCore& core_;
};

}  // namespace moe_swap::streaming
