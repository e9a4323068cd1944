#include "streaming/ring_placement.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <sstream>

namespace moe_swap::streaming {

namespace {

// Neighbouring experts are merged into one copy until a chunk reaches this size: per-expert chunks
// let a consumer start on landed experts, and merging keeps 128 tiny experts from costing 256 calls.
constexpr size_t kMinChunkBytes = size_t{1} << 20;

}  // namespace

RingPlacement::RingPlacement(StreamerCore& core, Mode mode, int64_t slots, int64_t prefetch_depth)
    : Placement(core), mode_(mode), num_slots_(slots), prefetch_depth_(prefetch_depth) {
  slots_.resize(slots);
}

std::string RingPlacement::held_layers() const {
  std::ostringstream os;
  os << "[";
  bool first = true;
  for (size_t l = 0; l < held_slot_.size(); ++l) {
    if (held_slot_[l] == kNotHeld) continue;
    os << (first ? "" : ", ") << l;
    first = false;
  }
  os << "]";
  return os.str();
}

void RingPlacement::forget_layer(int64_t layer) {
  const int s = find_slot(layer);
  if (s >= 0) {
    core_.engine.drain();  // no copy may read the host block while it changes
    slots_[s].layer = -1;
  }
}

void RingPlacement::ensure_slots() {
  const HostStore& store = core_.store;
  TORCH_CHECK(store.num_layers() > 0, "the streamer has no layers: add_layer first");
  const std::array<size_t, kWeightBanks> need = {store.max_bytes(kW13Bank), store.max_bytes(kW2Bank)};
  if (slots_fit()) return;
  for (const Slot& s : slots_) {
    TORCH_CHECK(!s.held, "a layer larger than the scratch-ring slots (", ring_.slot_bytes(),
                " bytes) was added while layer ", s.layer, " is acquired; release every layer before using the larger "
                "one (needs ", need[0] + need[1], " bytes per slot)");
  }
  core_.engine.drain();
  ring_.allocate(core_.engine.backend(), num_slots_, need);
  for (Slot& s : slots_) s = Slot{};
}

bool RingPlacement::slots_fit() const {
  return ring_.slots() == num_slots_ && ring_.slot_bytes(kW13Bank) >= core_.store.max_bytes(kW13Bank) &&
         ring_.slot_bytes(kW2Bank) >= core_.store.max_bytes(kW2Bank);
}

// For prefetches (hints): size the ring if needed and possible. A larger layer was added and the
// ring can only grow while nothing is held; until then, nothing is prefetched.
bool RingPlacement::try_fit_slots() {
  if (slots_fit()) return true;
  if (std::any_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.held; })) return false;
  ensure_slots();
  return true;
}

int RingPlacement::find_slot(int64_t layer) const {
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].layer == layer) return static_cast<int>(i);
  }
  return -1;
}

int64_t RingPlacement::distance(int64_t from, int64_t to) const {
  const int64_t L = core_.num_layers();
  return ((to - from) % L + L) % L;
}

// The unheld slot whose layer is needed furthest in the future (the cyclic order is known, so this
// is Belady's choice), considering only slots whose layer is needed later than `limit` layers ahead.
int RingPlacement::pick_victim(int64_t cursor, int64_t limit) const {
  const int64_t L = core_.num_layers();
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

CopyPlan RingPlacement::plan_copy(int64_t layer, int slot) const {
  const LayerLayout& l = core_.store.layout(layer);
  // Every path into a copy has sized the ring first; a copy past a slot's end must never happen.
  TORCH_INTERNAL_ASSERT(slot < ring_.slots() && l.w13_bytes <= ring_.slot_bytes(kW13Bank) &&
                        l.w2_bytes <= ring_.slot_bytes(kW2Bank), "layer ", layer, " does not fit scratch-ring slot ", slot);
  CopyPlan plan{layer, slot, l.host_bytes(), {}};
  const size_t per_expert = l.expert_bytes(kW13Bank) + l.expert_bytes(kW2Bank);
  for (int64_t first = 0; first < l.num_experts;) {
    int64_t n = 1;
    while (first + n < l.num_experts && per_expert * n < kMinChunkBytes) ++n;
    for (int bank = 0; bank < kWeightBanks; ++bank) {
      const size_t offset = first * l.expert_bytes(bank);
      plan.chunks.push_back({core_.store.record(layer, bank, first), ring_.data(slot, bank) + offset,
                             n * l.expert_bytes(bank)});
    }
    first += n;
  }
  return plan;
}

void RingPlacement::issue_into(int slot, int64_t layer, bool demand) {
  Slot& s = slots_[slot];
  s.layer = layer;
  s.issue_error.clear();
  CopyPlan plan = plan_copy(layer, slot);
  try {
    core_.engine.issue(plan, slot);  // each ring slot is its own channel
  } catch (const std::exception& e) {
    if (demand) {
      s.layer = -1;
      throw;
    }
    s.issue_error = e.what();  // a prefetch failed: the acquire of this layer reports it
  }
}

void RingPlacement::prefetch_window() {
  const int64_t L = core_.num_layers();
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

StepWeights RingPlacement::acquire(const StepRequest& step) {
  const int64_t layer = step.layer;
  const HostStore& store = core_.store;
  const LayerLayout& l = store.layout(layer);
  TORCH_CHECK(core_.fully_written(layer), "acquire(", layer, "): layer ", layer, " has ", store.bytes_written(layer),
              " of its ", l.host_bytes(), " bytes written; fill it with write() first");
  TORCH_CHECK(held_slot_[layer] == kNotHeld, "acquire(", layer, "): layer ", layer,
              " is already acquired; release it first");
  core_.collect_spans(/*block=*/false);
  LayerStats& st = core_.stats[layer];
  st.acquires += 1;

  if (mode_ == Mode::kUva) {
    StreamBackend& backend = core_.engine.backend();
    at::Tensor w13 = backend.uva_view(store.block(layer, kW13Bank), l.w13_shape(), l.dtype);
    at::Tensor w2 = backend.uva_view(store.block(layer, kW2Bank), l.w2_shape(), l.dtype);
    core_.engine.begin_hold(layer);
    held_slot_[layer] = kHeldWithoutSlot;
    cursor_ = layer;
    return {w13, w2, {}};
  }

  ensure_slots();
  int s = mode_ == Mode::kFull ? find_slot(layer) : -1;
  if (s >= 0) {
    if (!slots_[s].issue_error.empty()) {
      const std::string error = std::move(slots_[s].issue_error);
      slots_[s] = Slot{};
      TORCH_CHECK(false, "acquire(", layer, "): the prefetch copy of layer ", layer, " failed: ", error);
    }
    st.hits += 1;
  } else {
    s = pick_victim(layer, 0);
    TORCH_CHECK(s >= 0, "acquire(", layer, "): the scratch ring is exhausted: all ", num_slots_,
                " slots are held by layers ", held_layers(),
                "; release a layer first (or create the streamer with more slots)");
    st.demand_copies += 1;
    if (mode_ == Mode::kSync) {
      slots_[s].layer = layer;
      CopyPlan plan = plan_copy(layer, s);
      try {
        core_.engine.copy_on_current_stream(plan, s);
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
      core_.engine.wait(s, layer);
    } catch (...) {
      slots_[s] = Slot{};  // the copy failed: the next acquire copies again
      throw;
    }
  }
  slots_[s].held = true;
  held_slot_[layer] = s;
  cursor_ = layer;
  prefetch_window();
  return {ring_.view(s, kW13Bank, l.w13_bytes, l.dtype, l.w13_shape()),
          ring_.view(s, kW2Bank, l.w2_bytes, l.dtype, l.w2_shape()), {}};
}

void RingPlacement::prefetch(int64_t layer) {
  // the baselines have no copy engine to run ahead
  if (mode_ != Mode::kFull) return;
  TORCH_CHECK(core_.fully_written(layer), "prefetch(", layer, "): layer ", layer, " is not fully written yet");
  if (held_slot_[layer] != kNotHeld || find_slot(layer) >= 0) return;
  if (!try_fit_slots()) return;
  int64_t k = distance(cursor_, layer);
  if (k == 0) k = core_.num_layers();
  const int s = pick_victim(cursor_, k);
  if (s >= 0) issue_into(s, layer, /*demand=*/false);  // a hint: no free slot, nothing to do
}

void RingPlacement::release(int64_t layer) {
  const int s = held_slot_[layer];
  TORCH_CHECK(s != kNotHeld, "release(", layer, "): layer ", layer,
              " is not acquired (release without acquire, or released twice)");
  held_slot_[layer] = kNotHeld;
  if (s == kHeldWithoutSlot) {
    core_.engine.release(-1, layer);
    return;
  }
  slots_[s].held = false;
  core_.engine.release(s, layer);
  prefetch_window();
}

void RingPlacement::predict(int64_t layer, const at::Tensor& /*expert_ids*/) {
  TORCH_CHECK(false, "predict(", layer, "): only policies on_demand and auto predict experts");
}

std::tuple<std::vector<int64_t>, at::Tensor> RingPlacement::cache_state() const {
  const int64_t expert_bytes = core_.num_layers() > 0 ? static_cast<int64_t>(core_.store.layout(0).expert_bytes(kW13Bank) +
                                                                             core_.store.layout(0).expert_bytes(kW2Bank))
                                                      : 0;
  return {{0, 0, 0, expert_bytes, -1, -1}, at::empty({0, 2}, at::kLong)};
}

void RingPlacement::set_cache_bytes(int64_t /*cache_bytes*/) {
  TORCH_CHECK(false, "set_cache_bytes: this streamer has policy full (no expert cache)");
}

}  // namespace moe_swap::streaming
