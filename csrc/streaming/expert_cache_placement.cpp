#include "streaming/expert_cache_placement.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>

namespace moe_swap::streaming {

ExpertCachePlacement::ExpertCachePlacement(StreamerCore& core, int64_t cache_bytes, Eviction eviction,
                                           std::optional<CopyCostModel> cost_model)
    : Placement(core), cache_bytes_(cache_bytes), cache_(eviction), cost_model_(cost_model) {}

void ExpertCachePlacement::check_new_layer(at::IntArrayRef w13_shape, at::IntArrayRef w2_shape,
                                           at::ScalarType dtype) const {
  if (core_.num_layers() == 0) return;
  // One pool serves every layer, so every expert must have the same shape and dtype.
  const std::vector<int64_t> w13(w13_shape.begin() + std::min<size_t>(1, w13_shape.size()), w13_shape.end());
  const std::vector<int64_t> w2(w2_shape.begin() + std::min<size_t>(1, w2_shape.size()), w2_shape.end());
  TORCH_CHECK(w13 == w13_expert_shape_ && w2 == w2_expert_shape_ && dtype == dtype_,
              "policy on_demand: every layer's experts must have the same shape and dtype (one expert cache "
              "serves all layers); layer 0 has w13 experts ", c10::IntArrayRef(w13_expert_shape_), ", w2 experts ",
              c10::IntArrayRef(w2_expert_shape_), ", ", dtype_, "; got w13 ", w13_shape, ", w2 ", w2_shape, ", ",
              dtype);
}

void ExpertCachePlacement::layer_added(int64_t layer) {
  const LayerLayout& l = core_.store.layout(layer);
  if (layer == 0) {
    w13_expert_shape_ = {l.w13_rows, l.hidden};
    w2_expert_shape_ = {l.hidden, l.intermediate};
    dtype_ = l.dtype;
    expert_bytes_ = {static_cast<int64_t>(l.expert_bytes(kW13Bank)), static_cast<int64_t>(l.expert_bytes(kW2Bank))};
    cache_.set_capacity(cache_bytes_ / expert_bytes());
  }
  cache_.add_layer(l.num_experts);
  max_layer_experts_ = std::max(max_layer_experts_, l.num_experts);
  total_experts_ += l.num_experts;
  routed_seen_.resize(max_layer_experts_, 0);
  held_.push_back(false);
}

void ExpertCachePlacement::set_cache_bytes(int64_t cache_bytes) {
  TORCH_CHECK(!pool_.allocated(), "set_cache_bytes: the expert cache is already allocated (a step ran); "
              "set the budget before the first step");
  cache_bytes_ = cache_bytes;
  if (core_.num_layers() > 0) cache_.set_capacity(cache_bytes_ / expert_bytes());
}

void ExpertCachePlacement::forget_layer(int64_t layer) {
  core_.engine.drain();
  for (int64_t i = 0; i < cache_.num_slots(); ++i) {
    if (cache_.slot_layer(i) == layer) cache_.drop(i);  // its cached experts are stale now
  }
}

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

const std::vector<int64_t>& ExpertCachePlacement::distinct_ids_on_host(const char* op, int64_t layer,
                                                                       const at::Tensor& ids, const char* arg) {
  TORCH_CHECK(ids.defined(), op, "(", layer, "): ", arg, " is undefined");
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op, "(", layer, "): ", arg,
              " must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.device().is_cpu() || ids.device() == core_.engine.device(), op, "(", layer, "): ", arg,
              " must be on the CPU or on the streamer's device ", core_.engine.device(), ", got ", ids.device());
  const auto t0 = std::chrono::steady_clock::now();
  // On CUDA this is the device->host copy that makes the host wait for the router: measured below.
  // Read as they come (int32 or int64): no conversion, no copy on the CPU when already contiguous.
  const at::Tensor host = (ids.device().is_cpu() ? ids : ids.to(at::kCPU)).contiguous();
  const auto t1 = std::chrono::steady_clock::now();
  core_.stats[layer].ids_to_host_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
  const int64_t E = core_.store.layout(layer).num_experts;
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
void ExpertCachePlacement::ensure_pool(int64_t slots_needed) {
  // The cache never holds more than one slot per (layer, expert), nor (auto) more than two layer
  // regions need: a budget beyond that allocates no pool it could never use.
  const int64_t useful = cost_model_ ? std::max(total_experts_, 2 * max_layer_experts_) : total_experts_;
  const int64_t n = std::max(std::min(cache_.capacity(), useful), slots_needed);
  if (pool_.allocated() && cache_.num_slots() >= n) return;
  core_.engine.drain();
  for (int64_t i = 0; i < cache_.num_slots(); ++i) {
    if (cache_.slot_layer(i) != ExpertCache::kEmpty) core_.stats[cache_.slot_layer(i)].evictions += 1;
  }
  cache_.clear();
  pool_.allocate(core_.engine.backend(), n,
                 {static_cast<size_t>(expert_bytes_[kW13Bank]), static_cast<size_t>(expert_bytes_[kW2Bank])});
  cache_.resize(n);
  pool_views_ = {pool_.bank_view(kW13Bank, dtype_, w13_expert_shape_), pool_.bank_view(kW2Bank, dtype_, w2_expert_shape_)};
  ahead_pending_.clear();
  if (cost_model_ && !cost_model_->known()) cost_model_->calibrate(core_.engine, core_.store, pool_);
}

// Put every expert of `target` into slots [base, base + E) and add the copies to `plan`: the layer's
// entries elsewhere and every other entry in the region are given up. `predicted`: the copies run
// ahead of the layer's step. O(E): the layer's entries are found by the cache's index.
void ExpertCachePlacement::place_whole_layer(int64_t target, int64_t base, bool predicted, CopyPlan& plan,
                                             std::vector<int64_t>& assigned) {
  const int64_t E = core_.store.layout(target).num_experts;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t slot = cache_.find(target, e);
    if (slot != ExpertCache::kEmpty) cache_.drop(slot);
  }
  for (int64_t i = base; i < base + E; ++i) {
    const int64_t owner = cache_.slot_layer(i);
    if (owner == ExpertCache::kEmpty) continue;
    core_.stats[owner].evictions += 1;
    cache_.drop(i);
  }
  for (int64_t e = 0; e < E; ++e) {
    cache_.assign(base + e, target, e, predicted);
    add_expert_chunks(plan, target, e, base + e);  // neighbours merge: one chunk per bank
    assigned.push_back(base + e);
  }
}

// policy auto: the layer's region fits the pool and the cost model prefers the whole layer.
bool ExpertCachePlacement::whole_layer_is_cheaper(int64_t layer, int64_t misses, int64_t base) const {
  const int64_t E = core_.store.layout(layer).num_experts;
  return cost_model_ && cache_.num_slots() >= base + E &&
         cost_model_->whole_layer_costs_no_more(E, misses, static_cast<double>(expert_bytes()));
}

void ExpertCachePlacement::add_expert_chunks(CopyPlan& plan, int64_t layer, int64_t expert, int64_t slot) const {
  for (int bank = 0; bank < kWeightBanks; ++bank) {
    const size_t bytes = static_cast<size_t>(expert_bytes_[bank]);
    const uint8_t* src = core_.store.record(layer, bank, expert);
    uint8_t* dst = pool_.data(slot, bank);
    plan.bytes += bytes;
    // Neighbouring experts into neighbouring slots: one larger copy (fewer calls, full link rate).
    bool merged = false;
    for (auto it = plan.chunks.rbegin(); it != plan.chunks.rend() && it != plan.chunks.rbegin() + kWeightBanks; ++it) {
      if (it->src + it->bytes == src && it->dst + it->bytes == dst) {
        it->bytes += bytes;
        merged = true;
        break;
      }
    }
    if (!merged) plan.chunks.push_back({src, dst, bytes});
  }
}

StepWeights ExpertCachePlacement::acquire(const StepRequest& step) {
  const int64_t layer = step.layer;
  const int64_t next_layer = step.next_layer;
  const HostStore& store = core_.store;
  const LayerLayout& l = store.layout(layer);
  TORCH_CHECK(core_.fully_written(layer), "acquire_experts(", layer, "): layer ", layer, " has ",
              store.bytes_written(layer), " of its ", l.host_bytes(), " bytes written; fill it with write() first");
  TORCH_CHECK(!held_[layer], "acquire_experts(", layer, "): layer ", layer,
              " is already acquired; release_experts it first");
  // One step at a time: the pool is sized for one step's working set, and a second step's misses
  // could find every slot pinned by the first (or, under auto, copy a whole layer over its region).
  const auto other = std::find(held_.begin(), held_.end(), true);
  TORCH_CHECK(other == held_.end(), "acquire_experts(", layer, "): layer ", other - held_.begin(),
              "'s step is still acquired; release_experts(", other - held_.begin(),
              ") first (the expert cache serves one step at a time)");
  core_.collect_spans(/*block=*/false);
  // The guess at the next layer, checked and read before anything changes (on CUDA its router was
  // queued right after this step's routing: reading it first makes the host wait that much longer).
  next_distinct_.clear();
  const bool guess = step.next_ids != nullptr && step.next_ids->defined();
  if (guess) {
    core_.check_layer("acquire_experts(next_layer)", next_layer);
    TORCH_CHECK(next_layer != layer, "acquire_experts(", layer, "): next_layer must be another layer than the step's (",
                layer, "); this step copies its routed experts itself");
    TORCH_CHECK(core_.fully_written(next_layer), "acquire_experts(", layer, "): next_layer ", next_layer,
                " is not fully written yet");
    next_distinct_ = distinct_ids_on_host("acquire_experts", next_layer, *step.next_ids, "next_ids");
  } else {
    TORCH_CHECK(next_layer == -1, "acquire_experts(", layer, "): next_layer=", next_layer,
                " without next_ids (give both, or neither)");
  }
  const std::vector<int64_t>& distinct = distinct_ids_on_host("acquire_experts", layer, *step.topk_ids, "topk_ids");
  const int64_t distinct_count = static_cast<int64_t>(distinct.size());
  LayerStats& st = core_.stats[layer];
  st.acquires += 1;
  ensure_pool(distinct_count);
  // policy auto: a wide step (a prefill) gets full's double buffering -- two layer-sized regions, the
  // next layer copied whole into one while this layer computes on the other (below) -- when the cache
  // holds two layers (the memory full's two-slot ring takes). The pool never grows past its budget for
  // it: only a single step's working set may exceed the budget, and the planner's minimum covers that.
  const int64_t region_experts = max_layer_experts_;
  const int64_t now = ++clock_;
  const int64_t ticks_per_pass = core_.num_layers();

  // The expert map (expert -> pool slot, -1 not routed) is built in place: on the CPU in the tensor
  // returned; on CUDA in pinned memory, then copied without the host waiting (torch's pinned allocator
  // keeps the buffer until that copy is done).
  const bool on_cpu = core_.engine.device().is_cpu();
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
  CopyPlan plan{layer, kDemandChannel, 0, {}};
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
      // One copy per bank: expert e into slot base + e. The layer's cached experts move there too (they
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
      if (evicted_layer >= 0) core_.stats[evicted_layer].evictions += 1;
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

    if (!plan.chunks.empty()) core_.engine.issue(plan, kDemandChannel);
    // This layer's copies ahead must have landed. Wait before issuing the next layer's copy on the
    // same channel: waiting after it would wait for that copy too and lose the overlap.
    if (!ahead_pending_.empty()) {
      try {
        core_.engine.wait(kAheadChannel, layer);
      } catch (...) {
        for (int64_t s : ahead_pending_) cache_.drop(s);  // the copies ahead never landed
        ahead_pending_.clear();
        throw;
      }
      ahead_pending_.clear();
    }
    // A wide step: the next layer's step will most likely be wide too; copy it whole into the other
    // region now, under this layer's compute (the ring's double buffering, for prefills).
    const int64_t next = (layer + 1) % core_.num_layers();
    const int64_t next_base = (next % 2) * region_experts;
    bool region_free = two_regions && next_base != base && !held_[next];
    for (int64_t i = next_base; region_free && i < next_base + store.layout(next).num_experts; ++i) {
      region_free = !cache_.slot_pinned(i);  // this step's experts stay where they are
    }
    bool copied_ahead = false;
    if (region_free && whole_layer_is_cheaper(layer, distinct_count, base)) {
      CopyPlan ahead{next, kAheadChannel, 0, {}};
      std::vector<int64_t>& ahead_slots = ahead_slots_;
      ahead_slots.clear();
      place_whole_layer(next, next_base, /*predicted=*/true, ahead, ahead_slots);
      issue_ahead(ahead, ahead_slots);
      copied_ahead = true;
    }
    // The caller's guess at the next layer: behind this step's copies on the one copy engine, so it
    // runs under this step's compute (predict() before the step would delay the step by it). Not
    // needed when that layer was just copied ahead whole.
    if (guess && !(copied_ahead && next_layer == next) && !held_[next_layer]) {
      predict_distinct(next_layer, next_distinct_);
    }
    core_.engine.wait(kDemandChannel, layer);
  } catch (...) {
    for (int64_t s : assigned) cache_.drop(s);
    cache_.unpin_all();
    throw;
  }
  held_[layer] = true;

  if (!on_cpu) map = map.to(core_.engine.device(), /*non_blocking=*/true);
  // Fresh aliases: a caller changing a returned tensor's metadata (in place) cannot reach the next step's.
  return {pool_views_[kW13Bank].alias(), pool_views_[kW2Bank].alias(), map};
}

void ExpertCachePlacement::release(int64_t layer) {
  TORCH_CHECK(held_[layer], "release_experts(", layer, "): layer ", layer,
              " is not acquired by acquire_experts (release without acquire, or released twice)");
  held_[layer] = false;
  // Later copies into these slots are ordered after the compute queued so far: issue_copy forks the
  // copy stream from the current stream.
  core_.engine.release(-1, layer);
  cache_.trim(clock_, core_.num_layers(), evicted_layers_);
  for (int64_t evicted_layer : evicted_layers_) core_.stats[evicted_layer].evictions += 1;
}

void ExpertCachePlacement::predict(int64_t layer, const at::Tensor& expert_ids) {
  TORCH_CHECK(core_.fully_written(layer), "predict(", layer, "): layer ", layer, " is not fully written yet");
  const std::vector<int64_t>& distinct = distinct_ids_on_host("predict", layer, expert_ids, "expert_ids");
  if (!pool_.allocated() || held_[layer]) return;  // a hint: nothing to do yet
  predict_distinct(layer, distinct);
}

void ExpertCachePlacement::predict_distinct(int64_t layer, const std::vector<int64_t>& distinct) {
  const int64_t now = clock_;
  const int64_t ticks_per_pass = core_.num_layers();
  CopyPlan plan{layer, kAheadChannel, 0, {}};
  std::vector<int64_t>& assigned = predict_assigned_;
  assigned.clear();
  cache_.begin_taking(now, ticks_per_pass, static_cast<int64_t>(distinct.size()));
  for (int64_t e : distinct) {
    // Looked up now, not before the loop: a slot taken for an earlier id may have held this one.
    if (cache_.find(layer, e) >= 0) continue;
    int64_t evicted_layer = -1;
    const int64_t s = cache_.take_slot(/*may_take_predictions=*/false, evicted_layer);
    if (s < 0) break;  // every slot is in use or predicted: predict no further
    if (evicted_layer >= 0) core_.stats[evicted_layer].evictions += 1;
    cache_.assign(s, layer, e, /*predicted=*/true);
    add_expert_chunks(plan, layer, e, s);
    assigned.push_back(s);
  }
  if (plan.chunks.empty()) return;
  issue_ahead(plan, assigned);
}

// Copies ahead of a layer's step (`slots` were assigned as predicted): issued on the ahead channel,
// and waited for at that layer's step; slots whose copy could not be issued are emptied.
void ExpertCachePlacement::issue_ahead(CopyPlan& plan, const std::vector<int64_t>& slots) {
  core_.stats[plan.layer].predicted += static_cast<int64_t>(slots.size());
  try {
    core_.engine.issue(plan, kAheadChannel);
  } catch (...) {
    for (int64_t s : slots) cache_.drop(s);
    throw;
  }
  ahead_pending_.insert(ahead_pending_.end(), slots.begin(), slots.end());
}

std::tuple<std::vector<int64_t>, at::Tensor> ExpertCachePlacement::cache_state() const {
  const int64_t N = cache_.num_slots();
  at::Tensor table = at::empty({N, 2}, at::kLong);
  auto t = table.accessor<int64_t, 2>();
  for (int64_t i = 0; i < N; ++i) {
    t[i][0] = cache_.slot_layer(i);
    t[i][1] = cache_.slot_expert(i);
  }
  const bool measured = cost_model_.has_value();
  return {{N, cache_.capacity(), cache_.occupied(), core_.num_layers() > 0 ? expert_bytes() : 0,
           measured ? cost_model_->overhead_ns() : -1, measured ? cost_model_->bytes_per_s() : -1},
          table};
}

}  // namespace moe_swap::streaming
