// Bookkeeping of the device expert cache; see expert_cache.h.
#include "streaming/expert_cache.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace moe_swap::streaming {

Eviction parse_eviction(const std::string& name) {
  if (name == "lru") return Eviction::kLru;
  if (name == "lfu") return Eviction::kLfu;
  if (name == "flru") return Eviction::kFlru;
  TORCH_CHECK(false, "eviction must be \"lru\", \"lfu\" or \"flru\" (frequency-weighted LRU), got \"", name, "\"");
}

const char* eviction_name(Eviction e) {
  switch (e) {
    case Eviction::kLru: return "lru";
    case Eviction::kLfu: return "lfu";
    case Eviction::kFlru: return "flru";
  }
  return "?";
}

void ExpertCache::resize(int64_t n) {
  if (n > num_slots()) slots_.resize(n);
}

void ExpertCache::clear() {
  for (Slot& s : slots_) s = Slot{};
  for (auto& layer : where_) std::fill(layer.begin(), layer.end(), kEmpty);
}

void ExpertCache::add_layer(int64_t num_experts) {
  history_.emplace_back(num_experts);
  where_.emplace_back(num_experts, kEmpty);
}

int64_t ExpertCache::find(int64_t layer, int64_t expert) const { return where_[layer][expert]; }

double ExpertCache::half_life(int64_t ticks_per_pass) {
  return kFlruHalfLifePasses * static_cast<double>(std::max<int64_t>(ticks_per_pass, 1));
}

void ExpertCache::touch(int64_t slot, int64_t now, int64_t ticks_per_pass) {
  Slot& s = slots_[slot];
  s.pinned = true;
  s.predicted = false;
  History& h = history(s.layer, s.expert);
  // FLRU: the score as of the last use, decayed to now, plus this use.
  const double age = h.last_use < 0 ? 0.0 : static_cast<double>(now - h.last_use);
  h.score = h.score * std::exp2(-age / half_life(ticks_per_pass)) + 1.0;
  h.uses += 1;
  h.last_use = now;
}

double ExpertCache::keep_value(const Slot& s, int64_t now, int64_t ticks_per_pass) const {
  if (s.layer == kEmpty) return -std::numeric_limits<double>::infinity();
  const History& h = history(s.layer, s.expert);
  const double recency = static_cast<double>(h.last_use + 1) / static_cast<double>(now + 2);  // in (0, 1)
  switch (eviction_) {
    case Eviction::kLru:
      return static_cast<double>(h.last_use);
    case Eviction::kLfu:
      return static_cast<double>(h.uses) + recency;
    case Eviction::kFlru: {
      return h.score * std::exp2(-static_cast<double>(now - h.last_use) / half_life(ticks_per_pass)) + 1e-9 * recency;
    }
  }
  return 0.0;
}

int64_t ExpertCache::take_slot(int64_t now, int64_t ticks_per_pass, bool may_take_predictions,
                               int64_t& evicted_layer) {
  const int64_t s = pick(now, ticks_per_pass, /*occupied_only=*/false, /*include_predicted=*/false, evicted_layer);
  if (s >= 0 || !may_take_predictions) return s;
  // A routed expert outranks a guess: take a slot some prediction for a later layer holds.
  return pick(now, ticks_per_pass, /*occupied_only=*/false, /*include_predicted=*/true, evicted_layer);
}

int64_t ExpertCache::pick(int64_t now, int64_t ticks_per_pass, bool occupied_only, bool include_predicted,
                          int64_t& evicted_layer) {
  evicted_layer = -1;
  int64_t best = -1;
  double best_value = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < num_slots(); ++i) {
    const Slot& s = slots_[i];
    if (s.pinned || (s.predicted && !include_predicted)) continue;  // used by this step, or a prediction not yet used
    if (occupied_only && s.layer == kEmpty) continue;
    const double v = keep_value(s, now, ticks_per_pass);
    if (v < best_value) {
      best = i;
      best_value = v;
    }
  }
  if (best >= 0 && slots_[best].layer != kEmpty) {
    evicted_layer = slots_[best].layer;
    drop(best);
  }
  return best;
}

void ExpertCache::assign(int64_t slot, int64_t layer, int64_t expert, bool predicted) {
  TORCH_INTERNAL_ASSERT(slots_[slot].layer == kEmpty, "expert cache slot ", slot, " assigned while occupied");
  TORCH_INTERNAL_ASSERT(where_[layer][expert] == kEmpty, "expert ", expert, " of layer ", layer, " cached twice");
  slots_[slot] = Slot{layer, expert, false, predicted};
  where_[layer][expert] = slot;
}

int64_t ExpertCache::end_prediction(int64_t layer) {
  int64_t unused = 0;
  for (Slot& s : slots_) {
    if (s.layer == layer && s.predicted) {
      s.predicted = false;
      ++unused;
    }
  }
  return unused;
}

void ExpertCache::drop(int64_t slot) {
  Slot& s = slots_[slot];
  if (s.layer != kEmpty) where_[s.layer][s.expert] = kEmpty;
  s = Slot{};
}

std::vector<int64_t> ExpertCache::trim(int64_t now, int64_t ticks_per_pass) {
  unpin_all();
  std::vector<int64_t> evicted;
  for (int64_t n = occupied(); n > capacity_; --n) {
    int64_t layer = -1;
    if (pick(now, ticks_per_pass, /*occupied_only=*/true, /*include_predicted=*/false, layer) < 0) break;  // the rest are predictions for the next layers
    evicted.push_back(layer);
  }
  return evicted;
}

void ExpertCache::unpin_all() {
  for (Slot& s : slots_) s.pinned = false;
}

int64_t ExpertCache::occupied() const {
  return std::count_if(slots_.begin(), slots_.end(), [](const Slot& s) { return s.layer != kEmpty; });
}

}  // namespace moe_swap::streaming
