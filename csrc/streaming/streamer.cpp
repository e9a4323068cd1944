// The schedule of the weight streamer (the same for every backend), and the handle registry behind
// the torch ops. See streamer.h for the design and the choice of handles over a custom class.
#include "streaming/streamer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <exception>
#include <limits>
#include <sstream>
#include <unordered_map>

namespace moe_swap::streaming {

namespace {

constexpr int kNotHeld = -1;
constexpr int kHeldWithoutSlot = -2;  // uva: the layer is held, its views read host memory directly

// Neighbouring experts are merged into one copy until a chunk reaches this size: per-expert chunks
// let a consumer start on landed experts, and merging keeps 128 tiny experts from costing 256 calls.
constexpr size_t kMinChunkBytes = size_t{1} << 20;

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
                   int64_t test_copy_delay_us, int64_t test_fail_copy_at)
    : mode_(mode), num_slots_(slots), prefetch_depth_(prefetch_depth), trace_(trace),
      test_fail_copy_at_(test_fail_copy_at) {
  TORCH_CHECK(slots >= 1 && slots <= 64, "slots must be in [1, 64], got ", slots);
  if (mode == Mode::kFull) {
    TORCH_CHECK(prefetch_depth >= 0 && prefetch_depth <= slots - 1, "prefetch_depth must be in [0, slots - 1] = [0, ",
                slots - 1, "] (one slot is always the layer being computed), got ", prefetch_depth);
  }
  TORCH_CHECK(test_copy_delay_us >= 0, "test_copy_delay_us must be >= 0, got ", test_copy_delay_us);
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
  const int64_t layer = store_.reserve(*backend_, w13_shape, w2_shape, dtype);
  layer_stats_.emplace_back();
  held_slot_.push_back(kNotHeld);
  return layer;
}

void Streamer::write(int64_t layer, int64_t which, int64_t expert_start, int64_t row_offset, const at::Tensor& src) {
  std::lock_guard<std::mutex> lock(mu_);
  check_layer("write", layer);
  TORCH_CHECK(held_slot_[layer] == kNotHeld, "write(", layer, "): layer ", layer,
              " is acquired; release it before changing its weights");
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
  if (mode_ != Mode::kFull) return;  // the baselines have no copy engine to run ahead
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
    const int64_t row[kLayerStatsColumns] = {s.bytes_copied, s.copies_issued, s.chunks_issued, s.acquires,
                                             s.hits,         s.demand_copies, s.wait_ns,       s.waits_timed};
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
  return {store_.num_layers(),
          static_cast<int64_t>(store_.host_bytes()),
          static_cast<int64_t>(slot_memory_.size() * slot_bytes()),
          static_cast<int64_t>(slot_bytes()),
          num_slots_,
          prefetch_depth_,
          backend_->untimed_spans()};
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
                        bool trace, bool timing, int64_t test_copy_delay_us, int64_t test_fail_copy_at) {
  const Mode m = parse_mode(mode);
  c10::Device dev(c10::kCPU);
  try {
    dev = c10::Device(std::string(device));
  } catch (const std::exception&) {
    TORCH_CHECK(false, "device must be \"cpu\" or \"cuda[:index]\", got \"", std::string(device), "\"");
  }
  auto streamer = std::make_shared<Streamer>(dev, slots, prefetch_depth, m, trace, timing, test_copy_delay_us,
                                             test_fail_copy_at);
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
  TORCH_CHECK(w13.dim() == 3, "w13 must be 3-D [E, 2I, H], got ", w13.dim(), "-D with shape ", w13.sizes());
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

std::tuple<at::Tensor, at::Tensor> streamer_acquire(int64_t handle, int64_t layer, at::TensorList /*after*/) {
  return lookup(handle)->acquire(layer);
}

void streamer_prefetch(int64_t handle, int64_t layer) { lookup(handle)->prefetch(layer); }

void streamer_release(int64_t handle, int64_t layer, at::TensorList /*after*/) { lookup(handle)->release(layer); }

void streamer_synchronize(int64_t handle) { lookup(handle)->synchronize(); }

std::tuple<at::Tensor, at::Tensor> streamer_stats(int64_t handle) { return lookup(handle)->stats(); }

std::vector<int64_t> streamer_info(int64_t handle) { return lookup(handle)->info(); }

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
