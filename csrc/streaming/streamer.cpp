// The schedule of the weight streamer (the same for every backend), and the handle registry behind
// the torch ops. See streamer.h for the design and the choice of handles over a custom class.
#include "streaming/streamer.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <limits>
#include <sstream>
#include <unordered_map>

namespace moe_swap::streaming {

namespace {

constexpr int kNotHeld = -1;
constexpr int kHeldWithoutSlot = -2;  // uva: the layer is held, its views read host memory directly
constexpr int kHeldExperts = -3;      // on_demand: the layer's experts are pinned in the expert cache

// Neighbouring experts are merged into one copy until a chunk reaches this size: per-expert chunks
// let a consumer start on landed experts, and merging keeps 128 tiny experts from costing 256 calls.
constexpr size_t kMinChunkBytes = size_t{1} << 20;

Policy parse_policy(c10::string_view policy) {
  if (policy == "full") return Policy::kFull;
  if (policy == "on_demand") return Policy::kOnDemand;
  if (policy == "auto") return Policy::kAuto;
  TORCH_CHECK(false, "policy must be \"full\", \"on_demand\" or \"auto\", got \"", std::string(policy), "\"");
}

// on_demand copy channels (the backend's per-slot event pairs; the ring is unused under on_demand):
// routed misses on one, predictions on the other. One copy engine runs both in issue order.
constexpr int kDemandChannel = 0;
constexpr int kPredictChannel = 1;

Mode parse_mode(c10::string_view mode) {
  if (mode == "full") return Mode::kFull;
  if (mode == "sync") return Mode::kSync;
  if (mode == "uva") return Mode::kUva;
  TORCH_CHECK(false, "mode must be \"full\", \"sync\" or \"uva\", got \"", std::string(mode), "\"");
}

std::string held_layers_str(const std::vector<int>& held_slot) {
  std::ostringstream os;
  os << "[";
  bool first = true;
  for (size_t l = 0; l < held_slot.size(); ++l) {
    if (held_slot[l] == kNotHeld) continue;
    os << (first ? "" : ", ") << l;
    first = false;
  }
  os << "]";
  return os.str();
}

}  // namespace

Streamer::Streamer(c10::Device device, int64_t slots, int64_t prefetch_depth, Mode mode, bool trace, bool timing,
                   int64_t test_copy_delay_us, int64_t test_fail_copy_at, Policy policy, int64_t cache_bytes,
                   Eviction eviction, std::optional<double> copy_overhead_us, std::optional<double> copy_gb_per_s)
    : mode_(mode), num_slots_(slots), prefetch_depth_(prefetch_depth), trace_(trace),
      test_fail_copy_at_(test_fail_copy_at), policy_(policy), cache_bytes_(cache_bytes), cache_(eviction) {
  TORCH_CHECK(slots >= 1 && slots <= 64, "slots must be in [1, 64], got ", slots);
  TORCH_CHECK(cache_bytes >= 0, "cache_bytes must be >= 0, got ", cache_bytes);
  if (policy != Policy::kFull) {
    TORCH_CHECK(mode == Mode::kFull, "policy \"on_demand\"/\"auto\" needs mode \"full\" (the copy engine), got mode \"",
                mode == Mode::kSync ? "sync" : "uva", "\"");
    TORCH_CHECK(slots >= 2, "policies \"on_demand\" and \"auto\" need slots >= 2 (copy channels for demand and prediction), got ",
                slots);
  }
  if (mode == Mode::kFull) {
    TORCH_CHECK(prefetch_depth >= 0 && prefetch_depth <= slots - 1, "prefetch_depth must be in [0, slots - 1] = [0, ",
                slots - 1, "] (one slot is always the layer being computed), got ", prefetch_depth);
  }
  TORCH_CHECK(test_copy_delay_us >= 0, "test_copy_delay_us must be >= 0, got ", test_copy_delay_us);
  TORCH_CHECK(copy_overhead_us.has_value() == copy_gb_per_s.has_value(),
              "copy_overhead_us and copy_gb_per_s (policy auto's cost model) must be given together or not at all; got ",
              copy_overhead_us.has_value() ? "only copy_overhead_us" : "only copy_gb_per_s");
  if (copy_overhead_us.has_value()) {
    TORCH_CHECK(policy == Policy::kAuto, "copy_overhead_us/copy_gb_per_s set policy auto's cost model; this streamer's "
                "policy is \"", policy == Policy::kFull ? "full" : "on_demand", "\"");
    TORCH_CHECK(std::isfinite(*copy_overhead_us) && *copy_overhead_us >= 0.0,
                "copy_overhead_us must be a finite number >= 0 (microseconds per copy), got ", *copy_overhead_us);
    TORCH_CHECK(std::isfinite(*copy_gb_per_s) && *copy_gb_per_s > 0.0,
                "copy_gb_per_s must be a finite number > 0 (GB/s), got ", *copy_gb_per_s);
    copy_overhead_s_ = *copy_overhead_us * 1e-6;
    copy_bytes_per_s_ = *copy_gb_per_s * 1e9;
  }
  BackendOptions options{static_cast<int>(slots), trace, timing || trace, test_copy_delay_us};
  if (device.is_cpu()) {
    backend_ = make_cpu_backend(options);
  } else {
    TORCH_CHECK(device.is_cuda(), "device must be \"cpu\" or \"cuda[:index]\", got \"", device.str(), "\"");
    TORCH_CHECK(test_copy_delay_us == 0, "test_copy_delay_us is a test knob of the CPU backend; got ",
                test_copy_delay_us, " for device ", device.str());
#ifdef MOE_SWAP_WITH_CUDA
    backend_ = make_cuda_backend(device, options);
#else
    TORCH_CHECK(false, "device \"", device.str(), "\": this build of moe_swap has no CUDA backend (built with MOE_SWAP_CUDA=OFF "
                "or without nvcc)");
#endif
  }
  slots_.resize(slots);
}

Streamer::~Streamer() {
  try {
    backend_->drain();
  } catch (const std::exception& e) {
    TORCH_WARN("WeightStreamer: error while waiting for in-flight copies at destruction: ", e.what());
  }
  // The engine goes first (its thread joins / its stream is destroyed); host blocks and slots are
  // freed after, when nothing can touch them any more (views a caller still holds keep theirs).
  backend_.reset();
}

void Streamer::check_layer(const char* op, int64_t layer) const {
  TORCH_CHECK(layer >= 0 && layer < store_.num_layers(), op, "(", layer, "): layer must be in [0, ",
              store_.num_layers(), "), got ", layer);
}

int64_t Streamer::reserve_layer(at::IntArrayRef w13_shape, at::IntArrayRef w2_shape, at::ScalarType dtype) {
  std::lock_guard<std::mutex> lock(mu_);
  if (policy_ != Policy::kFull && store_.num_layers() > 0) {
    // One pool serves every layer, so every expert must have the same shape and dtype.
    const std::vector<int64_t> w13(w13_shape.begin() + std::min<size_t>(1, w13_shape.size()), w13_shape.end());
    const std::vector<int64_t> w2(w2_shape.begin() + std::min<size_t>(1, w2_shape.size()), w2_shape.end());
    TORCH_CHECK(w13 == pool_w13_shape_ && w2 == pool_w2_shape_ && dtype == pool_dtype_,
                "policy on_demand: every layer's experts must have the same shape and dtype (one expert cache "
                "serves all layers); layer 0 has w13 experts ", c10::IntArrayRef(pool_w13_shape_), ", w2 experts ",
                c10::IntArrayRef(pool_w2_shape_), ", ", pool_dtype_, "; got w13 ", w13_shape, ", w2 ", w2_shape, ", ",
                dtype);
  }
  const int64_t layer = store_.reserve(*backend_, w13_shape, w2_shape, dtype);
  if (layer == 0) {
    const LayerLayout& l = store_.layout(0);
    pool_w13_shape_ = {l.w13_rows, l.hidden};
    pool_w2_shape_ = {l.hidden, l.intermediate};
    pool_dtype_ = l.dtype;
    const int64_t item = static_cast<int64_t>(c10::elementSize(pool_dtype_));
    pool_expert_bytes_ = {pool_w13_shape_[0] * pool_w13_shape_[1] * item, pool_w2_shape_[0] * pool_w2_shape_[1] * item};
    cache_.set_capacity(cache_bytes_ / (pool_expert_bytes_[0] + pool_expert_bytes_[1]));
  }
  const int64_t num_experts = store_.layout(layer).num_experts;
  cache_.add_layer(num_experts);
  max_layer_experts_ = std::max(max_layer_experts_, num_experts);
  total_experts_ += num_experts;
  if (policy_ != Policy::kFull) routed_seen_.resize(max_layer_experts_, 0);
  layer_stats_.emplace_back();
  held_slot_.push_back(kNotHeld);
  return layer;
}

void Streamer::set_cache_bytes(int64_t cache_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(cache_bytes >= 0, "set_cache_bytes: cache_bytes must be >= 0, got ", cache_bytes);
  TORCH_CHECK(policy_ != Policy::kFull, "set_cache_bytes: this streamer has policy full (no expert cache)");
  TORCH_CHECK(!pool_memory_[0].defined(), "set_cache_bytes: the expert cache is already allocated (a step ran); "
              "set the budget before the first step");
  cache_bytes_ = cache_bytes;
  if (store_.num_layers() > 0) cache_.set_capacity(cache_bytes_ / (pool_expert_bytes_[0] + pool_expert_bytes_[1]));
}

void Streamer::write(int64_t layer, int64_t which, int64_t expert_start, int64_t row_offset, const at::Tensor& src) {
  std::lock_guard<std::mutex> lock(mu_);
  check_layer("write", layer);
  TORCH_CHECK(held_slot_[layer] == kNotHeld, "write(", layer, "): layer ", layer,
              " is acquired; release it before changing its weights");
  if (policy_ != Policy::kFull) {
    backend_->drain();
    for (int64_t i = 0; i < cache_.num_slots(); ++i) {
      if (cache_.slot_layer(i) == layer) cache_.drop(i);  // its cached experts are stale now
    }
  }
  const int s = find_slot(layer);
  if (s >= 0) {
    backend_->drain();  // no copy may read the host block while it changes
    slots_[s].layer = -1;
  }
  store_.write(layer, which, expert_start, row_offset, src);
}

std::tuple<at::Tensor, at::Tensor> Streamer::host_copy(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  check_layer("host_copy", layer);
  return {store_.host_view(layer, 0).clone(), store_.host_view(layer, 1).clone()};
}

std::tuple<at::Tensor, at::Tensor> Streamer::host_device_views(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  check_layer("host_device_views", layer);
  const LayerLayout& l = store_.layout(layer);
  TORCH_CHECK(store_.bytes_written(layer) >= l.host_bytes(), "host_device_views(", layer, "): layer ", layer,
              " has ", store_.bytes_written(layer), " of its ", l.host_bytes(), " bytes written; fill it first");
  return {backend_->uva_view(store_.block(layer, 0), l.w13_shape(), l.dtype),
          backend_->uva_view(store_.block(layer, 1), l.w2_shape(), l.dtype)};
}

void Streamer::ensure_slots() {
  TORCH_CHECK(store_.num_layers() > 0, "the streamer has no layers: add_layer first");
  const size_t need[2] = {store_.max_bytes(0), store_.max_bytes(1)};
  if (slots_fit()) return;
  for (const Slot& s : slots_) {
    TORCH_CHECK(!s.held, "a layer larger than the scratch-ring slots (", slot_bytes(), " bytes) was added while layer ",
                s.layer, " is acquired; release every layer before using the larger one (needs ", need[0] + need[1],
                " bytes per slot)");
  }
  backend_->drain();
  slot_memory_.clear();
  for (int64_t i = 0; i < num_slots_; ++i) {
    slot_memory_.push_back({backend_->allocate_slot(need[0]), backend_->allocate_slot(need[1])});
  }
  slot_area_bytes_[0] = need[0];
  slot_area_bytes_[1] = need[1];
  for (Slot& s : slots_) s = Slot{};
}

bool Streamer::slots_fit() const {
  return static_cast<int64_t>(slot_memory_.size()) == num_slots_ && slot_area_bytes_[0] >= store_.max_bytes(0) &&
         slot_area_bytes_[1] >= store_.max_bytes(1);
}

// For prefetches (hints): size the ring if needed and possible. A larger layer was added and the
// ring can only grow while nothing is held; until then, nothing is prefetched.
bool Streamer::try_fit_slots() {
  if (slots_fit()) return true;
  if (std::any_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.held; })) return false;
  ensure_slots();
  return true;
}

int Streamer::find_slot(int64_t layer) const {
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].layer == layer) return static_cast<int>(i);
  }
  return -1;
}

int64_t Streamer::distance(int64_t from, int64_t to) const {
  const int64_t L = store_.num_layers();
  return ((to - from) % L + L) % L;
}

// The unheld slot whose layer is needed furthest in the future (the cyclic order is known, so this
// is Belady's choice), considering only slots whose layer is needed later than `limit` layers ahead.
int Streamer::pick_victim(int64_t cursor, int64_t limit) const {
  const int64_t L = store_.num_layers();
  int best = -1;
  int64_t best_distance = -1;
  for (size_t i = 0; i < slots_.size(); ++i) {
    const Slot& s = slots_[i];
    if (s.held) continue;
    int64_t d = s.layer < 0 ? L + 1 : distance(cursor, s.layer);
    if (d == 0) d = L;  // the released current layer: next needed a whole pass from now
    if (d <= limit) continue;
    if (d > best_distance) {
      best = static_cast<int>(i);
      best_distance = d;
    }
  }
  return best;
}

CopyPlan Streamer::plan_copy(int64_t layer, int slot) {
  const LayerLayout& l = store_.layout(layer);
  // Every path into a copy has sized the ring first; a copy past a slot's end must never happen.
  TORCH_INTERNAL_ASSERT(slot < static_cast<int>(slot_memory_.size()) && l.w13_bytes <= slot_area_bytes_[0] &&
                        l.w2_bytes <= slot_area_bytes_[1], "layer ", layer, " does not fit scratch-ring slot ", slot);
  CopyPlan plan{layer, slot, l.host_bytes(), {}, copies_issued_total_ == test_fail_copy_at_};
  const uint8_t* src[2] = {store_.block(layer, 0)->data, store_.block(layer, 1)->data};
  uint8_t* dst[2] = {slot_memory_[slot][0].data_ptr<uint8_t>(), slot_memory_[slot][1].data_ptr<uint8_t>()};
  const size_t per_expert[2] = {l.w13_bytes / l.num_experts, l.w2_bytes / l.num_experts};
  for (int64_t first = 0; first < l.num_experts;) {
    int64_t n = 1;
    while (first + n < l.num_experts && (per_expert[0] + per_expert[1]) * n < kMinChunkBytes) ++n;
    for (int which = 0; which < 2; ++which) {
      const size_t offset = first * per_expert[which];
      plan.chunks.push_back({src[which] + offset, dst[which] + offset, n * per_expert[which]});
    }
    first += n;
  }
  ++copies_issued_total_;
  LayerStats& st = layer_stats_[layer];
  st.bytes_copied += static_cast<int64_t>(plan.bytes);
  st.copies_issued += 1;
  st.chunks_issued += static_cast<int64_t>(plan.chunks.size());
  return plan;
}

void Streamer::issue_into(int slot, int64_t layer, bool demand) {
  Slot& s = slots_[slot];
  s.layer = layer;
  s.issue_error.clear();
  const CopyPlan plan = plan_copy(layer, slot);
  try {
    backend_->issue_copy(plan);
  } catch (const std::exception& e) {
    if (demand) {
      s.layer = -1;
      throw;
    }
    s.issue_error = e.what();  // a prefetch failed: the acquire of this layer reports it
  }
}

void Streamer::prefetch_window() {
  const int64_t L = store_.num_layers();
  if (mode_ != Mode::kFull || L == 0) return;
  if (!try_fit_slots()) return;
  for (int64_t k = 1; k <= prefetch_depth_; ++k) {
    const int64_t target = ((cursor_ + k) % L + L) % L;
    if (target == cursor_) break;  // fewer layers than the window: all of them are resident
    if (held_slot_[target] != kNotHeld || find_slot(target) >= 0) continue;
    const int s = pick_victim(cursor_, k);
    if (s < 0) break;  // every slot is held or needed sooner; release() tries again
    issue_into(s, target, /*demand=*/false);
  }
}

std::tuple<at::Tensor, at::Tensor> Streamer::slot_views(int slot, int64_t layer) {
  const LayerLayout& l = store_.layout(layer);
  auto view = [&](int which, std::vector<int64_t> shape) {
    return slot_memory_[slot][which].narrow(0, 0, static_cast<int64_t>(l.bytes(which))).view(l.dtype).view(shape);
  };
  return {view(0, l.w13_shape()), view(1, l.w2_shape())};
}

std::tuple<at::Tensor, at::Tensor> Streamer::acquire(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  check_layer("acquire", layer);
  TORCH_CHECK(policy_ == Policy::kFull, "acquire(", layer, "): this streamer has policy on_demand/auto; use "
              "acquire_experts(layer, topk_ids) (or streamer_moe)");
  const LayerLayout& l = store_.layout(layer);
  TORCH_CHECK(store_.bytes_written(layer) >= l.host_bytes(), "acquire(", layer, "): layer ", layer, " has ",
              store_.bytes_written(layer), " of its ", l.host_bytes(), " bytes written; fill it with write() first");
  TORCH_CHECK(held_slot_[layer] == kNotHeld, "acquire(", layer, "): layer ", layer,
              " is already acquired; release it first");
  collect_spans(/*block=*/false);
  layer_stats_[layer].acquires += 1;

  if (mode_ == Mode::kUva) {
    at::Tensor w13 = backend_->uva_view(store_.block(layer, 0), l.w13_shape(), l.dtype);
    at::Tensor w2 = backend_->uva_view(store_.block(layer, 1), l.w2_shape(), l.dtype);
    backend_->begin_hold(layer);
    held_slot_[layer] = kHeldWithoutSlot;
    cursor_ = layer;
    return {w13, w2};
  }

  ensure_slots();
  int s = mode_ == Mode::kFull ? find_slot(layer) : -1;
  if (s >= 0) {
    if (!slots_[s].issue_error.empty()) {
      const std::string error = std::move(slots_[s].issue_error);
      slots_[s] = Slot{};
      TORCH_CHECK(false, "acquire(", layer, "): the prefetch copy of layer ", layer, " failed: ", error);
    }
    layer_stats_[layer].hits += 1;
  } else {
    s = pick_victim(layer, 0);
    TORCH_CHECK(s >= 0, "acquire(", layer, "): the scratch ring is exhausted: all ", num_slots_,
                " slots are held by layers ", held_layers_str(held_slot_),
                "; release a layer first (or create the streamer with more slots)");
    layer_stats_[layer].demand_copies += 1;
    if (mode_ == Mode::kSync) {
      slots_[s].layer = layer;
      const CopyPlan plan = plan_copy(layer, s);
      if (plan.inject_fault) {
        slots_[s] = Slot{};
        TORCH_CHECK(false, "acquire(", layer, "): copy of layer ", layer, " into slot ", s,
                    " failed: injected copy fault (test_fail_copy_at)");
      }
      try {
        backend_->copy_on_current_stream(plan);
      } catch (...) {
        slots_[s] = Slot{};
        throw;
      }
    } else {
      issue_into(s, layer, /*demand=*/true);
    }
  }
  if (mode_ == Mode::kFull) {
    try {
      backend_->wait_ready(s, layer);
    } catch (...) {
      slots_[s] = Slot{};  // the copy failed: the next acquire copies again
      throw;
    }
  }
  slots_[s].held = true;
  held_slot_[layer] = s;
  cursor_ = layer;
  prefetch_window();
  return slot_views(s, layer);
}

void Streamer::prefetch(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  check_layer("prefetch", layer);
  // the baselines have no copy engine to run ahead; on_demand/auto prefetch by predict()
  if (mode_ != Mode::kFull || policy_ != Policy::kFull) return;
  TORCH_CHECK(store_.bytes_written(layer) >= store_.layout(layer).host_bytes(), "prefetch(", layer, "): layer ",
              layer, " is not fully written yet");
  if (held_slot_[layer] != kNotHeld || find_slot(layer) >= 0) return;
  if (!try_fit_slots()) return;
  int64_t k = distance(cursor_, layer);
  if (k == 0) k = store_.num_layers();
  const int s = pick_victim(cursor_, k);
  if (s >= 0) issue_into(s, layer, /*demand=*/false);  // a hint: no free slot, nothing to do
}

void Streamer::release(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  check_layer("release", layer);
  const int s = held_slot_[layer];
  TORCH_CHECK(s != kNotHeld, "release(", layer, "): layer ", layer,
              " is not acquired (release without acquire, or released twice)");
  held_slot_[layer] = kNotHeld;
  if (s == kHeldWithoutSlot) {
    backend_->record_free(-1, layer);
    return;
  }
  slots_[s].held = false;
  backend_->record_free(s, layer);
  prefetch_window();
}

void Streamer::synchronize() {
  std::lock_guard<std::mutex> lock(mu_);
  backend_->drain();
}

void Streamer::collect_spans(bool block) {
  std::vector<Span> spans;
  backend_->collect(spans, block);
  for (const Span& sp : spans) {
    if (sp.kind == SpanKind::kWait && sp.layer >= 0 && sp.layer < static_cast<int64_t>(layer_stats_.size())) {
      layer_stats_[sp.layer].wait_ns += static_cast<int64_t>((sp.end_us - sp.start_us) * 1000.0);
      layer_stats_[sp.layer].waits_timed += 1;
    }
    if (trace_) trace_spans_.push_back(sp);
  }
}

std::tuple<at::Tensor, at::Tensor> Streamer::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  collect_spans(/*block=*/true);
  const int64_t L = store_.num_layers();
  at::Tensor table = at::empty({L, kLayerStatsColumns}, at::kLong);
  auto t = table.accessor<int64_t, 2>();
  for (int64_t i = 0; i < L; ++i) {
    const LayerStats& s = layer_stats_[i];
    const int64_t row[kLayerStatsColumns] = {s.bytes_copied,   s.copies_issued, s.chunks_issued,  s.acquires,
                                             s.hits,           s.demand_copies, s.wait_ns,        s.waits_timed,
                                             s.expert_hits,    s.expert_misses, s.evictions,      s.predicted,
                                             s.predicted_used, s.routed_distinct, s.ids_to_host_ns, s.layer_copies};
    for (int c = 0; c < kLayerStatsColumns; ++c) t[i][c] = row[c];
  }
  at::Tensor trace = at::empty({static_cast<int64_t>(trace_spans_.size()), 5}, at::kDouble);
  auto r = trace.accessor<double, 2>();
  for (size_t i = 0; i < trace_spans_.size(); ++i) {
    const Span& sp = trace_spans_[i];
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
  const int64_t pool_bytes = pool_memory_[0].defined() ? pool_memory_[0].nbytes() + pool_memory_[1].nbytes() : 0;
  return {store_.num_layers(),
          static_cast<int64_t>(store_.host_bytes()),
          static_cast<int64_t>(slot_memory_.size() * slot_bytes()) + pool_bytes,
          static_cast<int64_t>(slot_bytes()),
          num_slots_,
          prefetch_depth_,
          backend_->untimed_spans()};
}

// ---- policy on_demand: the expert cache ----

namespace {

// Appends each id's first occurrence to `distinct`, marking it in `seen` (all zero on entry; the caller
// clears the marks of `distinct` after).
template <typename id_t>
void collect_distinct(const char* op, const char* arg, int64_t layer, const id_t* v, int64_t n, int64_t num_experts,
                      std::vector<char>& seen, std::vector<int64_t>& distinct) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = static_cast<int64_t>(v[i]);
    if (e < 0 || e >= num_experts) {
      for (int64_t d : distinct) seen[d] = 0;  // leave the marks clear for the next call
      TORCH_CHECK(false, op, "(", layer, "): ", arg, " must be expert ids in [0, ", num_experts, ") (layer ", layer,
                  " has ", num_experts, " experts), got ", e, " at flat position ", i);
    }
    if (!seen[e]) {
      seen[e] = 1;
      distinct.push_back(e);
    }
  }
}

}  // namespace

const std::vector<int64_t>& Streamer::distinct_ids_on_host(const char* op, int64_t layer, const at::Tensor& ids,
                                                           const char* arg) {
  TORCH_CHECK(ids.defined(), op, "(", layer, "): ", arg, " is undefined");
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op, "(", layer, "): ", arg,
              " must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.device().is_cpu() || ids.device() == backend_->device(), op, "(", layer, "): ", arg,
              " must be on the CPU or on the streamer's device ", backend_->device(), ", got ", ids.device());
  const auto t0 = std::chrono::steady_clock::now();
  // On CUDA this is the device->host copy that makes the host wait for the router: measured below.
  // Read as they come (int32 or int64): no conversion, no copy on the CPU when already contiguous.
  const at::Tensor host = (ids.device().is_cpu() ? ids : ids.to(at::kCPU)).contiguous();
  const auto t1 = std::chrono::steady_clock::now();
  layer_stats_[layer].ids_to_host_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
  const int64_t E = store_.layout(layer).num_experts;
  distinct_.clear();
  if (host.scalar_type() == at::kInt) {
    collect_distinct(op, arg, layer, host.data_ptr<int32_t>(), host.numel(), E, routed_seen_, distinct_);
  } else {
    collect_distinct(op, arg, layer, host.data_ptr<int64_t>(), host.numel(), E, routed_seen_, distinct_);
  }
  for (int64_t e : distinct_) routed_seen_[e] = 0;
  return distinct_;
}

// The pool holds max(cache capacity, the largest step's distinct experts) slots, the capacity capped
// at what the layers can use: a step never fails for lack of room (a zero-byte cache still works: its
// step's experts live in working-set slots that are emptied when the step ends). Growing re-allocates
// the pool, so it drains the copy engine and forgets what was cached (counted as evictions); it happens
// only when a step needs more than ever before, or a layer added after the first step raised the cap.
void Streamer::ensure_pool(int64_t slots_needed) {
  // The cache never holds more than one slot per (layer, expert), nor (auto) more than two layer
  // regions need: a budget beyond that allocates no pool it could never use.
  const int64_t useful =
      policy_ == Policy::kAuto ? std::max(total_experts_, 2 * max_layer_experts_) : total_experts_;
  const int64_t n = std::max(std::min(cache_.capacity(), useful), slots_needed);
  if (pool_memory_[0].defined() && cache_.num_slots() >= n) return;
  backend_->drain();
  for (int64_t i = 0; i < cache_.num_slots(); ++i) {
    if (cache_.slot_layer(i) != ExpertCache::kEmpty) layer_stats_[cache_.slot_layer(i)].evictions += 1;
  }
  cache_.clear();
  pool_memory_ = {backend_->allocate_slot(static_cast<size_t>(n * pool_expert_bytes_[0])),
                  backend_->allocate_slot(static_cast<size_t>(n * pool_expert_bytes_[1]))};
  cache_.resize(n);
  pool_views_ = {pool_memory_[0].view(pool_dtype_).view({n, pool_w13_shape_[0], pool_w13_shape_[1]}),
                 pool_memory_[1].view(pool_dtype_).view({n, pool_w2_shape_[0], pool_w2_shape_[1]})};
  predicted_pending_.clear();
  if (policy_ == Policy::kAuto && copy_bytes_per_s_ < 0) calibrate_copy_cost();
}

// Time the same bytes as many per-expert copies and as one copy per weight: the difference is the
// per-copy overhead, the rest the bandwidth. Uses the first pool slots while nothing is cached; on
// CUDA it blocks the host (once per streamer).
void Streamer::calibrate_copy_cost() {
  const int64_t n = std::min<int64_t>({cache_.num_slots(), store_.layout(0).num_experts, 8});
  const std::array<int64_t, 2>& per_expert = pool_expert_bytes_;
  const double expert_bytes = static_cast<double>(per_expert[0] + per_expert[1]);
  if (n < 2) {  // nothing to compare: assume copies are all bandwidth (auto then behaves as on_demand)
    copy_overhead_s_ = 0.0;
    copy_bytes_per_s_ = 1e12;
    return;
  }
  CopyPlan many{0, kDemandChannel, 0, {}, false};
  for (int64_t e = 0; e < n; ++e) add_expert_chunks(many, 0, e, e);  // merges: neighbours into neighbours
  CopyPlan separate{0, kDemandChannel, many.bytes, {}, false};
  CopyPlan whole{0, kDemandChannel, many.bytes, {}, false};
  for (int which = 0; which < 2; ++which) {
    const size_t b = static_cast<size_t>(per_expert[which]);
    const uint8_t* src = store_.block(0, which)->data;
    uint8_t* dst = static_cast<uint8_t*>(pool_memory_[which].data_ptr());
    for (int64_t e = 0; e < n; ++e) separate.chunks.push_back({src + e * b, dst + e * b, b});
    whole.chunks.push_back({src, dst, n * b});
  }
  constexpr int kRepeats = 5;
  const double t_separate = backend_->time_copy(separate, kRepeats);
  const double t_whole = backend_->time_copy(whole, kRepeats);
  const double extra_copies = static_cast<double>(separate.chunks.size() - whole.chunks.size());
  copy_overhead_s_ = std::max(0.0, (t_separate - t_whole) / extra_copies);
  const double transfer_s = std::max(t_whole - 2.0 * copy_overhead_s_, 1e-9);
  copy_bytes_per_s_ = static_cast<double>(n) * expert_bytes / transfer_s;
}

// Put every expert of `target` into slots [base, base + E) and add the copies to `plan`: the layer's
// entries elsewhere and every other entry in the region are given up. `predicted`: the copies run
// ahead of the layer's step. O(E): the layer's entries are found by the cache's index.
void Streamer::place_whole_layer(int64_t target, int64_t base, bool predicted, CopyPlan& plan,
                                 std::vector<int64_t>& assigned) {
  const int64_t E = store_.layout(target).num_experts;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t slot = cache_.find(target, e);
    if (slot != ExpertCache::kEmpty) cache_.drop(slot);
  }
  for (int64_t i = base; i < base + E; ++i) {
    const int64_t owner = cache_.slot_layer(i);
    if (owner == ExpertCache::kEmpty) continue;
    layer_stats_[owner].evictions += 1;
    cache_.drop(i);
  }
  for (int64_t e = 0; e < E; ++e) {
    cache_.assign(base + e, target, e, predicted);
    add_expert_chunks(plan, target, e, base + e);  // neighbours merge: one chunk per weight
    assigned.push_back(base + e);
  }
}

// policy auto: one copy of the whole layer (2 copies: w13 and w2) against 2 copies per missing expert.
bool Streamer::whole_layer_is_cheaper(int64_t layer, int64_t misses, int64_t base) const {
  return cache_.num_slots() >= base + store_.layout(layer).num_experts && whole_layer_costs_no_more(layer, misses);
}

// The cost model alone: one copy per weight of all E experts against 2 copies per missing expert. A tie
// (no per-copy overhead, every expert missing: the same bytes either way) goes to the whole layer, whose
// region lets the next layer be copied under this one's compute; on a CPU the measured overhead is often 0.
bool Streamer::whole_layer_costs_no_more(int64_t layer, int64_t misses) const {
  const int64_t E = store_.layout(layer).num_experts;
  if (policy_ != Policy::kAuto || misses == 0 || copy_bytes_per_s_ <= 0) return false;
  const double expert_s = static_cast<double>(pool_expert_bytes_[0] + pool_expert_bytes_[1]) / copy_bytes_per_s_;
  const double on_demand_s = static_cast<double>(misses) * (2.0 * copy_overhead_s_ + expert_s);
  const double whole_s = 2.0 * copy_overhead_s_ + static_cast<double>(E) * expert_s;
  return whole_s <= on_demand_s;
}

void Streamer::add_expert_chunks(CopyPlan& plan, int64_t layer, int64_t expert, int64_t slot) const {
  for (int which = 0; which < 2; ++which) {
    const size_t bytes = static_cast<size_t>(pool_expert_bytes_[which]);
    const uint8_t* src = store_.block(layer, which)->data + expert * bytes;
    uint8_t* dst = static_cast<uint8_t*>(pool_memory_[which].data_ptr()) + slot * bytes;
    plan.bytes += bytes;
    // Neighbouring experts into neighbouring slots: one larger copy (fewer calls, full link rate).
    bool merged = false;
    for (auto it = plan.chunks.rbegin(); it != plan.chunks.rend() && it != plan.chunks.rbegin() + 2; ++it) {
      if (it->src + it->bytes == src && it->dst + it->bytes == dst) {
        it->bytes += bytes;
        merged = true;
        break;
      }
    }
    if (!merged) plan.chunks.push_back({src, dst, bytes});
  }
}

void Streamer::issue_expert_plan(CopyPlan& plan, int channel) {
  plan.slot = channel;
  plan.inject_fault = copies_issued_total_ == test_fail_copy_at_;
  ++copies_issued_total_;
  LayerStats& st = layer_stats_[plan.layer];
  st.bytes_copied += static_cast<int64_t>(plan.bytes);
  st.copies_issued += 1;
  st.chunks_issued += static_cast<int64_t>(plan.chunks.size());
  backend_->issue_copy(plan);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> Streamer::acquire_experts(int64_t layer, const at::Tensor& topk_ids,
                                                                   int64_t next_layer,
                                                                   const std::optional<at::Tensor>& next_ids) {
  std::lock_guard<std::mutex> lock(mu_);
  check_layer("acquire_experts", layer);
  TORCH_CHECK(policy_ != Policy::kFull, "acquire_experts(", layer,
              "): this streamer has policy full; use acquire(layer) (create it with policy=\"on_demand\" or \"auto\")");
  const LayerLayout& l = store_.layout(layer);
  TORCH_CHECK(store_.bytes_written(layer) >= l.host_bytes(), "acquire_experts(", layer, "): layer ", layer, " has ",
              store_.bytes_written(layer), " of its ", l.host_bytes(), " bytes written; fill it with write() first");
  TORCH_CHECK(held_slot_[layer] == kNotHeld, "acquire_experts(", layer, "): layer ", layer,
              " is already acquired; release_experts it first");
  // One step at a time: the pool is sized for one step's working set, and a second step's misses
  // could find every slot pinned by the first (or, under auto, copy a whole layer over its region).
  const auto other = std::find(held_slot_.begin(), held_slot_.end(), kHeldExperts);
  TORCH_CHECK(other == held_slot_.end(), "acquire_experts(", layer, "): layer ", other - held_slot_.begin(),
              "'s step is still acquired; release_experts(", other - held_slot_.begin(),
              ") first (the expert cache serves one step at a time)");
  collect_spans(/*block=*/false);
  // The guess at the next layer, checked and read before anything changes (on CUDA its router was
  // queued right after this step's routing: reading it first makes the host wait that much longer).
  next_distinct_.clear();
  const bool guess = next_ids.has_value() && next_ids->defined();
  if (guess) {
    check_layer("acquire_experts(next_layer)", next_layer);
    TORCH_CHECK(next_layer != layer, "acquire_experts(", layer, "): next_layer must be another layer than the step's (",
                layer, "); this step copies its routed experts itself");
    TORCH_CHECK(store_.bytes_written(next_layer) >= store_.layout(next_layer).host_bytes(), "acquire_experts(", layer,
                "): next_layer ", next_layer, " is not fully written yet");
    next_distinct_ = distinct_ids_on_host("acquire_experts", next_layer, *next_ids, "next_ids");
  } else {
    TORCH_CHECK(next_layer == -1, "acquire_experts(", layer, "): next_layer=", next_layer,
                " without next_ids (give both, or neither)");
  }
  const std::vector<int64_t>& distinct = distinct_ids_on_host("acquire_experts", layer, topk_ids, "topk_ids");
  const int64_t distinct_count = static_cast<int64_t>(distinct.size());
  LayerStats& st = layer_stats_[layer];
  st.acquires += 1;
  ensure_pool(distinct_count);
  // policy auto: a wide step (a prefill) gets full's double buffering -- two layer-sized regions, the
  // next layer copied whole into one while this layer computes on the other (below) -- when the cache
  // holds two layers (the memory full's two-slot ring takes). The pool never grows past its budget for
  // it: only a single step's working set may exceed the budget, and the planner's minimum covers that.
  const int64_t region_experts = max_layer_experts_;
  const int64_t now = ++clock_;
  const int64_t ticks_per_pass = store_.num_layers();

  // The expert map (expert -> pool slot, -1 not routed) is built in place: on the CPU in the tensor
  // returned; on CUDA in pinned memory, then copied without the host waiting (torch's pinned allocator
  // keeps the buffer until that copy is done).
  const bool on_cpu = backend_->device().is_cpu();
  at::Tensor map = at::empty({l.num_experts}, at::TensorOptions().dtype(at::kInt).pinned_memory(!on_cpu));
  int32_t* expert_map = map.data_ptr<int32_t>();
  std::fill(expert_map, expert_map + l.num_experts, -1);
  std::vector<int64_t>& misses = step_misses_;
  misses.clear();
  for (int64_t e : distinct) {
    const int64_t s = cache_.find(layer, e);
    if (s < 0) {
      misses.push_back(e);
      continue;
    }
    st.expert_hits += 1;
    if (cache_.slot_predicted(s)) st.predicted_used += 1;
    cache_.touch(s, now, ticks_per_pass);  // pinned: no miss below can take its slot
    expert_map[e] = static_cast<int32_t>(s);
  }
  cache_.end_prediction(layer);  // this layer's unused guesses become ordinary (evictable) entries
  const int64_t miss_count = static_cast<int64_t>(misses.size());
  CopyPlan plan{layer, kDemandChannel, 0, {}, false};
  std::vector<int64_t>& assigned = step_assigned_;
  assigned.clear();
  // policy auto: whole layers live in region [0, E) or, with room for two, in region (layer % 2) * E,
  // so a wide step (a prefill: most experts routed) can copy the next layer whole while it computes.
  const bool two_regions = cache_.num_slots() >= 2 * region_experts;
  const int64_t base = two_regions ? (layer % 2) * region_experts : 0;
  // From here on a failure empties the slots this step assigned (their copies may never have been
  // issued: left assigned, the next step would take them for cached experts) and unpins the rest.
  try {
    if (whole_layer_is_cheaper(layer, miss_count, base)) {
      // One copy per weight: expert e into slot base + e. The layer's cached experts move there too (they
      // are copied again: the cost model counted that), and whatever else held the region is evicted.
      place_whole_layer(layer, base, /*predicted=*/false, plan, assigned);
      for (int64_t e : distinct) {
        cache_.touch(base + e, now, ticks_per_pass);  // routed: used now (pinned)
        expert_map[e] = static_cast<int32_t>(base + e);
      }
      st.layer_copies += 1;
      misses.clear();  // nothing left to place one by one (miss_count keeps the statistic)
    }
    cache_.begin_taking(now, ticks_per_pass, static_cast<int64_t>(misses.size()));
    for (int64_t e : misses) {
      int64_t evicted_layer = -1;
      const int64_t s = cache_.take_slot(/*may_take_predictions=*/true, evicted_layer);
      // ensure_pool gave at least |distinct| slots and only this step's experts are pinned
      TORCH_INTERNAL_ASSERT(s >= 0, "expert cache: no slot for expert ", e, " of layer ", layer);
      if (evicted_layer >= 0) layer_stats_[evicted_layer].evictions += 1;
      cache_.assign(s, layer, e, /*predicted=*/false);
      cache_.touch(s, now, ticks_per_pass);
      add_expert_chunks(plan, layer, e, s);
      assigned.push_back(s);
      expert_map[e] = static_cast<int32_t>(s);
    }
    st.expert_misses += miss_count;
    st.routed_distinct += distinct_count;
    if (!plan.chunks.empty()) st.demand_copies += 1;
    st.hits += plan.chunks.empty() ? 1 : 0;

    if (!plan.chunks.empty()) issue_expert_plan(plan, kDemandChannel);
    // This layer's predicted experts must have landed. Wait before issuing the next layer's copy on
    // the same channel: waiting after it would wait for that copy too and lose the overlap.
    if (!predicted_pending_.empty()) {
      try {
        backend_->wait_ready(kPredictChannel, layer);
      } catch (...) {
        for (int64_t s : predicted_pending_) cache_.drop(s);  // the predicted experts never landed
        predicted_pending_.clear();
        throw;
      }
      predicted_pending_.clear();
    }
    // A wide step: the next layer's step will most likely be wide too; copy it whole into the other
    // region now, under this layer's compute (the ring's double buffering, for prefills).
    const int64_t next = (layer + 1) % store_.num_layers();
    const int64_t next_base = (next % 2) * region_experts;
    bool region_free = two_regions && next_base != base && held_slot_[next] == kNotHeld;
    for (int64_t i = next_base; region_free && i < next_base + store_.layout(next).num_experts; ++i) {
      region_free = !cache_.slot_pinned(i);  // this step's experts stay where they are
    }
    bool copied_ahead = false;
    if (region_free && whole_layer_is_cheaper(layer, distinct_count, base)) {
      CopyPlan ahead{next, kPredictChannel, 0, {}, false};
      std::vector<int64_t>& ahead_slots = ahead_slots_;
      ahead_slots.clear();
      place_whole_layer(next, next_base, /*predicted=*/true, ahead, ahead_slots);
      issue_prediction(ahead, ahead_slots);
      copied_ahead = true;
    }
    // The caller's guess at the next layer: behind this step's copies on the one copy engine, so it
    // runs under this step's compute (predict() before the step would delay the step by it). Not
    // needed when that layer was just copied ahead whole.
    if (guess && !(copied_ahead && next_layer == next) && held_slot_[next_layer] == kNotHeld) {
      predict_distinct(next_layer, next_distinct_);
    }
    backend_->wait_ready(kDemandChannel, layer);
  } catch (...) {
    for (int64_t s : assigned) cache_.drop(s);
    cache_.unpin_all();
    throw;
  }
  held_slot_[layer] = kHeldExperts;
  cursor_ = layer;

  if (!on_cpu) map = map.to(backend_->device(), /*non_blocking=*/true);
  // Fresh aliases: a caller changing a returned tensor's metadata (in place) cannot reach the next step's.
  return {pool_views_[0].alias(), pool_views_[1].alias(), map};
}

void Streamer::release_experts(int64_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  check_layer("release_experts", layer);
  TORCH_CHECK(held_slot_[layer] == kHeldExperts, "release_experts(", layer, "): layer ", layer,
              " is not acquired by acquire_experts (release without acquire, or released twice)");
  held_slot_[layer] = kNotHeld;
  // Later copies into these slots are ordered after the compute queued so far: issue_copy forks the
  // copy stream from the current stream.
  backend_->record_free(-1, layer);
  cache_.trim(clock_, store_.num_layers(), evicted_layers_);
  for (int64_t evicted_layer : evicted_layers_) layer_stats_[evicted_layer].evictions += 1;
}

void Streamer::predict(int64_t layer, const at::Tensor& expert_ids) {
  std::lock_guard<std::mutex> lock(mu_);
  check_layer("predict", layer);
  TORCH_CHECK(policy_ != Policy::kFull, "predict(", layer, "): only policies on_demand and auto predict experts");
  TORCH_CHECK(store_.bytes_written(layer) >= store_.layout(layer).host_bytes(), "predict(", layer, "): layer ",
              layer, " is not fully written yet");
  const std::vector<int64_t>& distinct = distinct_ids_on_host("predict", layer, expert_ids, "expert_ids");
  if (!pool_memory_[0].defined() || held_slot_[layer] != kNotHeld) return;  // a hint: nothing to do yet
  predict_distinct(layer, distinct);
}

void Streamer::predict_distinct(int64_t layer, const std::vector<int64_t>& distinct) {
  const int64_t now = clock_;
  const int64_t ticks_per_pass = store_.num_layers();
  CopyPlan plan{layer, kPredictChannel, 0, {}, false};
  std::vector<int64_t>& assigned = predict_assigned_;
  assigned.clear();
  cache_.begin_taking(now, ticks_per_pass, static_cast<int64_t>(distinct.size()));
  for (int64_t e : distinct) {
    // Looked up now, not before the loop: a slot taken for an earlier id may have held this one.
    if (cache_.find(layer, e) >= 0) continue;
    int64_t evicted_layer = -1;
    const int64_t s = cache_.take_slot(/*may_take_predictions=*/false, evicted_layer);
    if (s < 0) break;  // every slot is in use or predicted: predict no further
    if (evicted_layer >= 0) layer_stats_[evicted_layer].evictions += 1;
    cache_.assign(s, layer, e, /*predicted=*/true);
    add_expert_chunks(plan, layer, e, s);
    assigned.push_back(s);
  }
  if (plan.chunks.empty()) return;
  issue_prediction(plan, assigned);
}

// Copies ahead of a layer's step (`slots` were assigned as predicted): issued on the predict channel,
// and waited for at that layer's step; slots whose copy could not be issued are emptied.
void Streamer::issue_prediction(CopyPlan& plan, const std::vector<int64_t>& slots) {
  layer_stats_[plan.layer].predicted += static_cast<int64_t>(slots.size());
  try {
    issue_expert_plan(plan, kPredictChannel);
  } catch (...) {
    for (int64_t s : slots) cache_.drop(s);
    throw;
  }
  predicted_pending_.insert(predicted_pending_.end(), slots.begin(), slots.end());
}

std::tuple<std::vector<int64_t>, at::Tensor> Streamer::cache_state() {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t N = cache_.num_slots();
  at::Tensor table = at::empty({N, 2}, at::kLong);
  auto t = table.accessor<int64_t, 2>();
  for (int64_t i = 0; i < N; ++i) {
    t[i][0] = cache_.slot_layer(i);
    t[i][1] = cache_.slot_expert(i);
  }
  int64_t expert_bytes = 0;
  if (!pool_w13_shape_.empty()) expert_bytes = pool_expert_bytes_[0] + pool_expert_bytes_[1];
  return {{N, cache_.capacity(), cache_.occupied(), expert_bytes,
           copy_overhead_s_ < 0 ? -1 : static_cast<int64_t>(std::llround(copy_overhead_s_ * 1e9)),
           copy_bytes_per_s_ < 0 ? -1 : static_cast<int64_t>(std::llround(copy_bytes_per_s_))},
          table};
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
                        bool trace, bool timing, int64_t test_copy_delay_us, int64_t test_fail_copy_at,
                        c10::string_view policy, int64_t cache_bytes, c10::string_view eviction,
                        std::optional<double> copy_overhead_us, std::optional<double> copy_gb_per_s) {
  const Mode m = parse_mode(mode);
  const Policy p = parse_policy(policy);
  const Eviction ev = parse_eviction(std::string(eviction));
  c10::Device dev(c10::kCPU);
  try {
    dev = c10::Device(std::string(device));
  } catch (const std::exception&) {
    TORCH_CHECK(false, "device must be \"cpu\" or \"cuda[:index]\", got \"", std::string(device), "\"");
  }
  auto streamer = std::make_shared<Streamer>(dev, slots, prefetch_depth, m, trace, timing, test_copy_delay_us,
                                             test_fail_copy_at, p, cache_bytes, ev, copy_overhead_us, copy_gb_per_s);
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

std::tuple<at::Tensor, at::Tensor> streamer_host_copy(int64_t handle, int64_t layer) {
  return lookup(handle)->host_copy(layer);
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
  auto [w13, w2, expert_map] = streamer->acquire_experts(layer, topk_ids, next_layer, next_ids);
  at::Tensor out;
  try {
    // the biases are the caller's, whole and resident: indexed by global id, they never enter the cache
    out = fused_moe.call(hidden_states, w13, w2, topk_weights, topk_ids, expert_map, activation, w13_bias, w2_bias,
                         gated, swiglu_alpha, swiglu_limit);
  } catch (...) {
    streamer->release_experts(layer);
    throw;
  }
  streamer->release_experts(layer);
  return out;
}

void streamer_predict(int64_t handle, int64_t layer, const at::Tensor& expert_ids) {
  lookup(handle)->predict(layer, expert_ids);
}

std::tuple<std::vector<int64_t>, at::Tensor> streamer_cache_state(int64_t handle) {
  return lookup(handle)->cache_state();
}

std::vector<int64_t> streamer_live_counts() {
  int64_t streamers = 0;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    streamers = static_cast<int64_t>(r.streamers.size());
  }
  return {streamers, live_host_bytes(), live_host_blocks()};
}

}  // namespace moe_swap::streaming
