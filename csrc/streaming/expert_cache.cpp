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
  occupied_ = 0;
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

void ExpertCache::begin_taking(int64_t now, int64_t ticks_per_pass, int64_t at_most) {
  taking_.clear();
  taking_next_ = 0;
  taking_predicted_ranked_ = false;
  taking_now_ = now;
  taking_ticks_per_pass_ = ticks_per_pass;
  taking_at_most_ = at_most;
  if (at_most > 0) rank_victims(now, ticks_per_pass, /*occupied_only=*/false, /*predicted=*/false, at_most, taking_);
}

int64_t ExpertCache::take_slot(bool may_take_predictions, int64_t& evicted_layer) {
  evicted_layer = -1;
  if (taking_next_ == taking_.size() && may_take_predictions && !taking_predicted_ranked_) {
    // A routed expert outranks a guess: then the slots predictions for later layers hold.
    taking_predicted_ranked_ = true;
    rank_victims(taking_now_, taking_ticks_per_pass_, /*occupied_only=*/false, /*predicted=*/true,
                 taking_at_most_ - static_cast<int64_t>(taking_next_), taking_);
  }
  if (taking_next_ == taking_.size()) return -1;
  const int64_t slot = taking_[taking_next_++];
  evicted_layer = slots_[slot].layer;  // kEmpty (-1) for an empty slot
  drop(slot);
  return slot;
}

void ExpertCache::rank_victims(int64_t now, int64_t ticks_per_pass, bool occupied_only, bool predicted, int64_t limit,
                               std::vector<int64_t>& out) {
  ranked_.clear();
  for (int64_t i = 0; i < num_slots(); ++i) {
    const Slot& s = slots_[i];
    if (s.pinned || s.predicted != predicted) continue;  // used by this step, or of the kind not asked for
    if (occupied_only && s.layer == kEmpty) continue;
    ranked_.emplace_back(keep_value(s, now, ticks_per_pass), i);
  }
  // (value, slot) pairs compare by value, then by slot: the first minimum a scan would keep.
  const auto end = ranked_.begin() + std::min<int64_t>(limit, static_cast<int64_t>(ranked_.size()));
  std::partial_sort(ranked_.begin(), end, ranked_.end());
  for (auto it = ranked_.begin(); it != end; ++it) out.push_back(it->second);
}

void ExpertCache::assign(int64_t slot, int64_t layer, int64_t expert, bool predicted) {
  TORCH_INTERNAL_ASSERT(slots_[slot].layer == kEmpty, "expert cache slot ", slot, " assigned while occupied");
  TORCH_INTERNAL_ASSERT(where_[layer][expert] == kEmpty, "expert ", expert, " of layer ", layer, " cached twice");
  slots_[slot] = Slot{layer, expert, false, predicted};
  where_[layer][expert] = slot;
  ++occupied_;
}

int64_t ExpertCache::end_prediction(int64_t layer) {
  int64_t unused = 0;
  for (int64_t slot : where_[layer]) {  // the layer's entries, not the whole pool
    if (slot != kEmpty && slots_[slot].predicted) {
      slots_[slot].predicted = false;
      ++unused;
    }
  }
  return unused;
}

void ExpertCache::drop(int64_t slot) {
  Slot& s = slots_[slot];
  if (s.layer != kEmpty) {
    where_[s.layer][s.expert] = kEmpty;
    --occupied_;
  }
  s = Slot{};
}

void ExpertCache::trim(int64_t now, int64_t ticks_per_pass, std::vector<int64_t>& evicted_layers) {
  unpin_all();
  evicted_layers.clear();
  const int64_t excess = occupied_ - capacity_;
  if (excess <= 0) return;
  // Candidates: occupied, not predictions for the next layers (those are kept; all are unpinned now).
  std::vector<int64_t>& victims = trim_victims_;
  victims.clear();
  for (int64_t i = 0; i < num_slots(); ++i) {
    if (slots_[i].layer != kEmpty && !slots_[i].predicted) victims.push_back(i);
  }
  // All of them go (a wide step's layer after its step): no ranking needed. Else the policy's victims.
  if (static_cast<int64_t>(victims.size()) > excess) {
    victims.clear();
    rank_victims(now, ticks_per_pass, /*occupied_only=*/true, /*predicted=*/false, excess, victims);
  }
  for (int64_t slot : victims) {
    evicted_layers.push_back(slots_[slot].layer);
    drop(slot);
  }
}

void ExpertCache::unpin_all() {
  for (Slot& s : slots_) s.pinned = false;
}

}  // namespace moe_swap::streaming
