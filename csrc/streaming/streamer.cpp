// The Streamer: the lock, the argument checks that depend on the placement's kind, and the
// delegation to the mechanism core and the placement; and the handle registry behind the torch ops.
// See streamer.h for the choice of handles over a custom class, ARCHITECTURE.md for the data flow.
#include "streaming/streamer.h"

#include "streaming/expert_cache_placement.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <exception>
#include <unordered_map>

namespace moe_swap::streaming {

namespace {

Policy parse_policy(c10::string_view policy) {
  if (policy == "full") return Policy::kFull;
  if (policy == "on_demand") return Policy::kOnDemand;
  if (policy == "auto") return Policy::kAuto;
  TORCH_CHECK(false, "policy must be \"full\", \"on_demand\" or \"auto\", got \"", std::string(policy), "\"");
}

Mode parse_mode(c10::string_view mode) {
  if (mode == "full") return Mode::kFull;
  if (mode == "sync") return Mode::kSync;
  if (mode == "uva") return Mode::kUva;
  TORCH_CHECK(false, "mode must be \"full\", \"sync\" or \"uva\", got \"", std::string(mode), "\"");
}

}  // namespace

// ---- the mechanism core ----

void StreamerCore::check_layer(const char* op, int64_t layer) const {
  TORCH_CHECK(layer >= 0 && layer < num_layers(), op, "(", layer, "): layer must be in [0, ", num_layers(),
              "), got ", layer);
}

void StreamerCore::collect_spans(bool block) {
  std::vector<Span> spans;
  engine.backend().collect(spans, block);
  for (const Span& sp : spans) {
    if (sp.kind == SpanKind::kWait && sp.layer >= 0 && sp.layer < static_cast<int64_t>(stats.size())) {
      stats[sp.layer].wait_ns += static_cast<int64_t>((sp.end_us - sp.start_us) * 1000.0);
      stats[sp.layer].waits_timed += 1;
    }
    if (trace) trace_spans.push_back(sp);
  }
}

// ---- the Streamer ----

Streamer::Streamer(c10::Device device, int64_t slots, int64_t prefetch_depth, Mode mode, bool trace, bool timing,
                   Policy policy, int64_t cache_bytes, Eviction eviction, std::optional<double> copy_overhead_us,
                   std::optional<double> copy_gb_per_s)
    : num_slots_(slots), prefetch_depth_(prefetch_depth) {
  TORCH_CHECK(slots >= 1 && slots <= 64, "slots must be in [1, 64], got ", slots);
  TORCH_CHECK(cache_bytes >= 0, "cache_bytes must be >= 0, got ", cache_bytes);
  if (policy != Policy::kFull) {
    TORCH_CHECK(mode == Mode::kFull, "policy \"on_demand\"/\"auto\" needs mode \"full\" (the copy engine), got mode \"",
                mode == Mode::kSync ? "sync" : "uva", "\"");
  }
  if (mode == Mode::kFull) {
    TORCH_CHECK(prefetch_depth >= 0 && prefetch_depth <= slots - 1, "prefetch_depth must be in [0, slots - 1] = [0, ",
                slots - 1, "] (one slot is always the layer being computed), got ", prefetch_depth);
  }
  TORCH_CHECK(copy_overhead_us.has_value() == copy_gb_per_s.has_value(),
              "copy_overhead_us and copy_gb_per_s (policy auto's cost model) must be given together or not at all; got ",
              copy_overhead_us.has_value() ? "only copy_overhead_us" : "only copy_gb_per_s");
  std::optional<CopyCostModel> cost_model;
  if (policy == Policy::kAuto) cost_model.emplace();
  if (copy_overhead_us.has_value()) {
    TORCH_CHECK(policy == Policy::kAuto, "copy_overhead_us/copy_gb_per_s set policy auto's cost model; this streamer's "
                "policy is \"", policy == Policy::kFull ? "full" : "on_demand", "\"");
    TORCH_CHECK(std::isfinite(*copy_overhead_us) && *copy_overhead_us >= 0.0,
                "copy_overhead_us must be a finite number >= 0 (microseconds per copy), got ", *copy_overhead_us);
    TORCH_CHECK(std::isfinite(*copy_gb_per_s) && *copy_gb_per_s > 0.0,
                "copy_gb_per_s must be a finite number > 0 (GB/s), got ", *copy_gb_per_s);
    cost_model->set(*copy_overhead_us, *copy_gb_per_s);
  }
  // The ring gives each slot its own channel; the expert cache needs two (demand, ahead), whatever `slots`.
  const int channels = policy == Policy::kFull ? static_cast<int>(slots) : kExpertChannels;
  BackendOptions options{channels, trace, timing || trace};
  std::unique_ptr<StreamBackend> backend;
  if (device.is_cpu()) {
    backend = make_cpu_backend(options);
  } else {
    TORCH_CHECK(device.is_cuda(), "device must be \"cpu\" or \"cuda[:index]\", got \"", device.str(), "\"");
#ifdef MOE_SWAP_WITH_CUDA
    backend = make_cuda_backend(device, options);
#else
    TORCH_CHECK(false, "device \"", device.str(), "\": this build of moe_swap has no CUDA backend (built with MOE_SWAP_CUDA=OFF "
                "or without nvcc)");
#endif
  }
  core_ = std::make_unique<StreamerCore>(std::move(backend), trace);
  if (policy == Policy::kFull) {
    placement_ = std::make_unique<RingPlacement>(*core_, mode, slots, prefetch_depth);
  } else {
    placement_ = std::make_unique<ExpertCachePlacement>(*core_, cache_bytes, eviction, cost_model);
  }
}

Streamer::~Streamer() {
  try {
    core_->engine.drain();
  } catch (const std::exception& e) {
    TORCH_WARN("WeightStreamer: error while waiting for in-flight copies at destruction: ", e.what());
  }
  // The engine goes first (its thread joins / its stream is destroyed); host blocks and device memory
  // are freed after, when nothing can touch them any more (views a caller still holds keep theirs).
  core_->engine.shut_down();
}

int64_t Streamer::reserve_layer(at::IntArrayRef w13_shape, at::IntArrayRef w2_shape, at::ScalarType dtype) {
  std::lock_guard<std::mutex> lock(mu_);
  placement_->check_new_layer(w13_shape, w2_shape, dtype);
  const int64_t layer = core_->store.reserve(core_->engine.backend(), w13_shape, w2_shape, dtype);
  core_->stats.emplace_back();
  placement_->layer_added(layer);
  return layer;
}

void Streamer::set_cache_bytes(int64_t cache_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(cache_bytes >= 0, "set_cache_bytes: cache_bytes must be >= 0, got ", cache_bytes);
  placement_->set_cache_bytes(cache_bytes);
}

void Streamer::write(int64_t layer, int64_t which, int64_t expert_start, int64_t row_offset, const at::Tensor& src) {
  std::lock_guard<std::mutex> lock(mu_);
  core_->check_layer("write", layer);
  TORCH_CHECK(!placement_->held(layer), "write(", layer, "): layer ", layer,
              " is acquired; release it before changing its weights");
  placement_->forget_layer(layer);
  core_->store.write(layer, which, expert_start, row_offset, src);
}

std::tuple<at::Tensor, at::Tensor> Streamer::host_copy(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  core_->check_layer("host_copy", layer);
  return {core_->store.host_view(layer, kW13Bank).clone(), core_->store.host_view(layer, kW2Bank).clone()};
}

std::tuple<at::Tensor, at::Tensor> Streamer::host_device_views(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  core_->check_layer("host_device_views", layer);
  const HostStore& store = core_->store;
  const LayerLayout& l = store.layout(layer);
  TORCH_CHECK(core_->fully_written(layer), "host_device_views(", layer, "): layer ", layer, " has ",
              store.bytes_written(layer), " of its ", l.host_bytes(), " bytes written; fill it first");
  StreamBackend& backend = core_->engine.backend();
  return {backend.uva_view(store.block(layer, kW13Bank), l.w13_shape(), l.dtype),
          backend.uva_view(store.block(layer, kW2Bank), l.w2_shape(), l.dtype)};
}

std::tuple<at::Tensor, at::Tensor> Streamer::acquire(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  core_->check_layer("acquire", layer);
  TORCH_CHECK(!placement_->routes_experts(), "acquire(", layer, "): this streamer has policy on_demand/auto; use "
              "acquire_experts(layer, topk_ids) (or streamer_moe)");
  StepWeights w = placement_->acquire(StepRequest{layer});
  return {w.w13, w.w2};
}

void Streamer::prefetch(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  core_->check_layer("prefetch", layer);
  placement_->prefetch(layer);  // on_demand/auto prefetch by predict()
}

void Streamer::release(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  core_->check_layer("release", layer);
  TORCH_CHECK(!placement_->routes_experts(), "release(", layer, "): this streamer has policy on_demand/auto; use "
              "release_experts(layer)");
  placement_->release(layer);
}

void Streamer::synchronize() {
  std::lock_guard<std::mutex> lock(mu_);
  core_->engine.drain();
}

std::tuple<at::Tensor, at::Tensor> Streamer::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  core_->collect_spans(/*block=*/true);
  const int64_t L = core_->num_layers();
  at::Tensor table = at::empty({L, kLayerStatsColumns}, at::kLong);
  auto t = table.accessor<int64_t, 2>();
  for (int64_t i = 0; i < L; ++i) {
    const LayerStats& s = core_->stats[i];
    int c = 0;
#define MOE_SWAP_STATS_CELL(name, what) t[i][c++] = s.name;
    MOE_SWAP_LAYER_STATS(MOE_SWAP_STATS_CELL)
#undef MOE_SWAP_STATS_CELL
  }
  const std::vector<Span>& spans = core_->trace_spans;
  at::Tensor trace = at::empty({static_cast<int64_t>(spans.size()), 5}, at::kDouble);
  auto r = trace.accessor<double, 2>();
  for (size_t i = 0; i < spans.size(); ++i) {
    const Span& sp = spans[i];
    r[i][0] = static_cast<double>(sp.layer);
    r[i][1] = static_cast<double>(sp.slot);
    r[i][2] = static_cast<double>(static_cast<int64_t>(sp.kind));
    r[i][3] = sp.start_us;
    r[i][4] = sp.end_us;
  }
  return {table, trace};
}

std::vector<int64_t> Streamer::info() {
  std::lock_guard<std::mutex> lock(mu_);
  return {core_->num_layers(),
          static_cast<int64_t>(core_->store.host_bytes()),
          placement_->device_bytes(),
          placement_->slot_bytes(),
          num_slots_,
          prefetch_depth_,
          core_->engine.backend().untimed_spans()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> Streamer::acquire_experts(int64_t layer, const at::Tensor& topk_ids,
                                                                   int64_t next_layer,
                                                                   const std::optional<at::Tensor>& next_ids) {
  std::lock_guard<std::mutex> lock(mu_);
  core_->check_layer("acquire_experts", layer);
  TORCH_CHECK(placement_->routes_experts(), "acquire_experts(", layer,
              "): this streamer has policy full; use acquire(layer) (create it with policy=\"on_demand\" or \"auto\")");
  StepWeights w = placement_->acquire(
      StepRequest{layer, &topk_ids, next_layer, next_ids.has_value() ? &next_ids.value() : nullptr});
  return {w.w13, w.w2, w.expert_map};
}

void Streamer::release_experts(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  core_->check_layer("release_experts", layer);
  TORCH_CHECK(placement_->routes_experts(), "release_experts(", layer, "): layer ", layer,
              " is not acquired by acquire_experts (this streamer has policy full: use release(layer))");
  placement_->release(layer);
}

void Streamer::predict(int64_t layer, const at::Tensor& expert_ids) {
  std::lock_guard<std::mutex> lock(mu_);
  core_->check_layer("predict", layer);
  placement_->predict(layer, expert_ids);
}

std::tuple<std::vector<int64_t>, at::Tensor> Streamer::cache_state() {
  std::lock_guard<std::mutex> lock(mu_);
  return placement_->cache_state();
}

void Streamer::set_test_hooks(int64_t copy_delay_us, int64_t fail_copy_at) {
  std::lock_guard<std::mutex> lock(mu_);
  core_->engine.set_test_hooks(TestHooks{fail_copy_at}, copy_delay_us);
}

// ---- handle registry and op entry points ----

namespace {

struct Registry {
  std::mutex mu;
  std::unordered_map<int64_t, std::shared_ptr<Streamer>> streamers;
  int64_t next_handle = 1;  // never reused, so a stale handle can't reach a newer streamer
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: no teardown-order hazards at exit
  return *r;
}

std::shared_ptr<Streamer> lookup(int64_t handle) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.streamers.find(handle);
  TORCH_CHECK(it != r.streamers.end(), "streamer handle ", handle,
              " is unknown or was destroyed (WeightStreamer used after close()?)");
  return it->second;
}

}  // namespace

int64_t streamer_create(c10::string_view device, int64_t slots, int64_t prefetch_depth, c10::string_view mode,
                        bool trace, bool timing, c10::string_view policy, int64_t cache_bytes,
                        c10::string_view eviction, std::optional<double> copy_overhead_us,
                        std::optional<double> copy_gb_per_s) {
  const Mode m = parse_mode(mode);
  const Policy p = parse_policy(policy);
  const Eviction ev = parse_eviction(std::string(eviction));
  c10::Device dev(c10::kCPU);
  try {
    dev = c10::Device(std::string(device));
  } catch (const std::exception&) {
    TORCH_CHECK(false, "device must be \"cpu\" or \"cuda[:index]\", got \"", std::string(device), "\"");
  }
  auto streamer = std::make_shared<Streamer>(dev, slots, prefetch_depth, m, trace, timing, p, cache_bytes, ev,
                                             copy_overhead_us, copy_gb_per_s);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  const int64_t handle = r.next_handle++;
  r.streamers.emplace(handle, std::move(streamer));
  return handle;
}

void streamer_destroy(int64_t handle) {
  std::shared_ptr<Streamer> streamer;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.streamers.find(handle);
    TORCH_CHECK(it != r.streamers.end(), "streamer handle ", handle, " is unknown or was already destroyed");
    streamer = std::move(it->second);
    r.streamers.erase(it);
  }
  // Dropped outside the registry lock: the destructor waits for in-flight copies (and an op running
  // on another thread keeps its own reference until it returns).
  streamer.reset();
}

int64_t streamer_reserve_layer(int64_t handle, at::IntArrayRef w13_shape, at::IntArrayRef w2_shape,
                               at::ScalarType dtype) {
  return lookup(handle)->reserve_layer(w13_shape, w2_shape, dtype);
}

void streamer_write(int64_t handle, int64_t layer, int64_t which, int64_t expert_start, int64_t row_offset,
                    const at::Tensor& src) {
  lookup(handle)->write(layer, which, expert_start, row_offset, src);
}

int64_t streamer_add_layer(int64_t handle, const at::Tensor& w13, const at::Tensor& w2) {
  TORCH_CHECK(w13.dim() == 3, "w13 must be 3-D [E, 2I, H] (or [E, I, H] ungated), got ", w13.dim(), "-D with shape ",
              w13.sizes());
  TORCH_CHECK(w2.dim() == 3, "w2 must be 3-D [E, H, I], got ", w2.dim(), "-D with shape ", w2.sizes());
  TORCH_CHECK(w13.scalar_type() == w2.scalar_type(), "w13 and w2 must have the same dtype, got ",
              w13.scalar_type(), " and ", w2.scalar_type());
  auto streamer = lookup(handle);
  const int64_t layer = streamer->reserve_layer(w13.sizes(), w2.sizes(), w13.scalar_type());
  streamer->write(layer, 0, 0, 0, w13);
  streamer->write(layer, 1, 0, 0, w2);
  return layer;
}

void streamer_set_cache_bytes(int64_t handle, int64_t cache_bytes) { lookup(handle)->set_cache_bytes(cache_bytes); }

std::tuple<at::Tensor, at::Tensor> streamer_host_device_views(int64_t handle, int64_t layer) {
  return lookup(handle)->host_device_views(layer);
}

std::tuple<at::Tensor, at::Tensor> streamer_acquire(int64_t handle, int64_t layer, at::TensorList /*after*/) {
  return lookup(handle)->acquire(layer);
}

void streamer_prefetch(int64_t handle, int64_t layer) { lookup(handle)->prefetch(layer); }

void streamer_release(int64_t handle, int64_t layer, at::TensorList /*after*/) { lookup(handle)->release(layer); }

void streamer_synchronize(int64_t handle) { lookup(handle)->synchronize(); }

std::tuple<at::Tensor, at::Tensor> streamer_stats(int64_t handle) { return lookup(handle)->stats(); }

std::vector<std::string> streamer_stats_columns() {
#define MOE_SWAP_STATS_NAME(name, what) #name,
  return {MOE_SWAP_LAYER_STATS(MOE_SWAP_STATS_NAME)};
#undef MOE_SWAP_STATS_NAME
}

std::vector<int64_t> streamer_info(int64_t handle) { return lookup(handle)->info(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> streamer_acquire_experts(int64_t handle, int64_t layer,
                                                                      const at::Tensor& topk_ids, int64_t next_layer,
                                                                      const std::optional<at::Tensor>& next_ids) {
  return lookup(handle)->acquire_experts(layer, topk_ids, next_layer, next_ids);
}

void streamer_release_experts(int64_t handle, int64_t layer, at::TensorList /*after*/) {
  lookup(handle)->release_experts(layer);
}

at::Tensor streamer_moe(int64_t handle, int64_t layer, const at::Tensor& hidden_states, const at::Tensor& topk_weights,
                        const at::Tensor& topk_ids, c10::string_view activation, int64_t next_layer,
                        const std::optional<at::Tensor>& next_ids, const std::optional<at::Tensor>& w13_bias,
                        const std::optional<at::Tensor>& w2_bias, bool gated, double swiglu_alpha,
                        double swiglu_limit) {
  auto streamer = lookup(handle);
  static const auto fused_moe =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("moe_swap::fused_moe", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double,
                            double)>();
  const bool experts = streamer->routes_experts();
  at::Tensor w13, w2;
  std::optional<at::Tensor> expert_map;
  if (experts) {
    at::Tensor map;
    std::tie(w13, w2, map) = streamer->acquire_experts(layer, topk_ids, next_layer, next_ids);
    expert_map = std::move(map);
  } else {
    // the ring runs its own schedule ahead (prefetch_depth layers); a guess at routed experts has no use there
    TORCH_CHECK(next_layer == -1 && !(next_ids.has_value() && next_ids->defined()), "streamer_moe(", layer,
                "): next_layer/next_ids guess at a later step's experts; only policies on_demand and auto predict "
                "experts (this streamer has policy full)");
    std::tie(w13, w2) = streamer->acquire(layer);
  }
  auto release = [&] { experts ? streamer->release_experts(layer) : streamer->release(layer); };
  at::Tensor out;
  try {
    // the biases are the caller's, whole and resident: indexed by global id, they never enter the cache
    out = fused_moe.call(hidden_states, w13, w2, topk_weights, topk_ids, expert_map, activation, w13_bias, w2_bias,
                         gated, swiglu_alpha, swiglu_limit);
  } catch (...) {
    release();
    throw;
  }
  release();
  return out;
}

void streamer_predict(int64_t handle, int64_t layer, const at::Tensor& expert_ids) {
  lookup(handle)->predict(layer, expert_ids);
}

std::tuple<std::vector<int64_t>, at::Tensor> streamer_cache_state(int64_t handle) {
  return lookup(handle)->cache_state();
}

void testing_set_hooks(int64_t handle, int64_t copy_delay_us, int64_t fail_copy_at) {
  lookup(handle)->set_test_hooks(copy_delay_us, fail_copy_at);
}

std::tuple<at::Tensor, at::Tensor> testing_host_copy(int64_t handle, int64_t layer) {
  return lookup(handle)->host_copy(layer);
}

std::vector<int64_t> testing_live_counts() {
  int64_t streamers = 0;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    streamers = static_cast<int64_t>(r.streamers.size());
  }
  return {streamers, live_host_bytes(), live_host_blocks()};
}

}  // namespace moe_swap::streaming
