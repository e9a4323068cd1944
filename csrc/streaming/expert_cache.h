// The bookkeeping of the device expert cache (policy `on_demand`): which (layer, expert) each
// expert-sized slot of the pool holds, and which slot to give up when a step needs room. No device
// memory here (the Streamer owns the pool tensors and the copies), so it is the same for every backend.
//
// A slot holds one expert of any streamed layer (the pool is shared by all layers, so a hot layer
// can take more of it than a cold one). `capacity` slots may keep their expert between steps (the
// byte budget); a step whose distinct experts do not fit uses extra "working-set" slots beyond it,
// which are emptied again when the step ends (see trim()).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace moe_swap::streaming {

enum class Eviction {
  kLru,   // least recently used
  kLfu,   // least frequently used (uses counted over the whole run, ties: least recent)
  kFlru,  // frequency-weighted LRU: uses decayed by age, half-life kFlruHalfLifePasses forward passes
};
constexpr double kFlruHalfLifePasses = 4.0;

Eviction parse_eviction(const std::string& name);
const char* eviction_name(Eviction e);

class ExpertCache {
 public:
  static constexpr int64_t kEmpty = -1;

  explicit ExpertCache(Eviction eviction) : eviction_(eviction) {}

  Eviction eviction() const { return eviction_; }
  int64_t capacity() const { return capacity_; }
  void set_capacity(int64_t slots) { capacity_ = slots; }
  int64_t num_slots() const { return static_cast<int64_t>(slots_.size()); }
  // Grow the pool to `n` slots (new slots empty). Shrinking never happens.
  void resize(int64_t n);
  // Forget everything (the pool memory was re-allocated).
  void clear();
  // A layer with `num_experts` experts joins (per-expert use history).
  void add_layer(int64_t num_experts);

  // The slot holding (layer, expert), or -1.
  int64_t find(int64_t layer, int64_t expert) const;
  // Record a use at time `now` (one step of one layer is one tick) and pin it for the step.
  void touch(int64_t slot, int64_t now, int64_t ticks_per_pass);
  // Slots for missing experts, one ranking of the pool per step (O(N log N), not O(N) per miss):
  // begin_taking ranks the slots not pinned by the current step nor holding an unused prediction,
  // empty ones first, then by the eviction policy; each take_slot then empties and returns the next
  // (with may_take_predictions, slots holding predictions for later layers when nothing else is
  // left), or -1 when no slot qualifies. `evicted_layer`: the layer of the cached expert given up, or
  // -1. `at_most`: how many take_slot calls will follow at most. Between begin_taking and the last
  // take_slot the caller only assigns (and touches) the slots it took.
  void begin_taking(int64_t now, int64_t ticks_per_pass, int64_t at_most);
  int64_t take_slot(bool may_take_predictions, int64_t& evicted_layer);
  // The (empty) slot now holds (layer, expert); `predicted`: brought in ahead by a prediction, kept
  // from eviction until that layer's next step (end_prediction). A routed miss is touch()ed after.
  void assign(int64_t slot, int64_t layer, int64_t expert, bool predicted);
  // The layer's step has come: its predictions not used by it become ordinary entries; returns how many.
  int64_t end_prediction(int64_t layer);
  // Empty a slot (its copy failed, or it was trimmed).
  void drop(int64_t slot);
  // End of a step: unpin, then give up slots beyond `capacity` by the eviction policy; `evicted_layers`
  // (cleared first) gets the layer of every expert given up (one entry each), for the per-layer
  // eviction counts.
  void trim(int64_t now, int64_t ticks_per_pass, std::vector<int64_t>& evicted_layers);
  void unpin_all();

  int64_t slot_layer(int64_t slot) const { return slots_[slot].layer; }
  int64_t slot_expert(int64_t slot) const { return slots_[slot].expert; }
  bool slot_predicted(int64_t slot) const { return slots_[slot].predicted; }
  bool slot_pinned(int64_t slot) const { return slots_[slot].pinned; }
  int64_t occupied() const { return occupied_; }

 private:
  struct Slot {
    int64_t layer = kEmpty;
    int64_t expert = kEmpty;
    bool pinned = false;     // used by the current step: never a victim
    bool predicted = false;  // brought in by a prediction, not used yet
  };
  struct History {
    int64_t uses = 0;
    int64_t last_use = -1;
    double score = 0.0;      // FLRU: decayed use count as of last_use
  };
  static double half_life(int64_t ticks_per_pass);
  // Appends to `out` the (at most `limit`) unpinned slots whose `predicted` flag is `predicted`
  // (occupied ones only, with occupied_only) that the eviction policy gives up first: lowest keep
  // value first, ties by slot index (the order repeated single picks of the minimum would give).
  void rank_victims(int64_t now, int64_t ticks_per_pass, bool occupied_only, bool predicted, int64_t limit,
                    std::vector<int64_t>& out);
  // Lower is evicted first.
  double keep_value(const Slot& s, int64_t now, int64_t ticks_per_pass) const;
  History& history(int64_t layer, int64_t expert) { return history_[layer][expert]; }
  const History& history(int64_t layer, int64_t expert) const { return history_[layer][expert]; }

  const Eviction eviction_;
  int64_t capacity_ = 0;
  std::vector<Slot> slots_;
  std::vector<std::vector<History>> history_;  // per layer, per expert
  std::vector<std::vector<int64_t>> where_;    // per layer, per expert: slot or -1
  int64_t occupied_ = 0;                       // slots holding an expert
  // scratch, kept so that a step allocates nothing: rank_victims' (keep value, slot), trim's victims
  std::vector<std::pair<double, int64_t>> ranked_;
  std::vector<int64_t> trim_victims_;
  // begin_taking / take_slot: the ranked slots, the next one to give out, and the ranking's time
  std::vector<int64_t> taking_;
  size_t taking_next_ = 0;
  bool taking_predicted_ranked_ = false;
  int64_t taking_now_ = 0, taking_ticks_per_pass_ = 0, taking_at_most_ = 0;
};

}  // namespace moe_swap::streaming
