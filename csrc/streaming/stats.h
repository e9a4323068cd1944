// Per-layer statistics of a streamer: one definition of the columns, from which the struct, the
// stats table (streamer_stats) and its column names (streamer_stats_columns, read by the Python face
// and its documentation) are all made, so they cannot drift apart.
#pragma once

#include <cstdint>

namespace moe_swap::streaming {

// X(name, what it counts)
#define MOE_SWAP_LAYER_STATS(X)                                                                          \
  X(bytes_copied, "bytes copied from the host store")                                                    \
  X(copies_issued, "copies issued (a whole layer, or one step's or one guess's experts)")                \
  X(chunks_issued, "memcpy calls (per expert, or per run of neighbouring experts)")                      \
  X(acquires, "steps of the layer")                                                                      \
  X(hits, "steps that found the layer resident or already copying (ring), or copied nothing (cache)")   \
  X(demand_copies, "steps that had to start a copy themselves")                                          \
  X(wait_ns, "time the compute stream waited on this layer's copies")                                    \
  X(waits_timed, "waits timed")                                                                          \
  X(expert_hits, "routed experts already cached (or brought in by a prediction)")                        \
  X(expert_misses, "routed experts copied by their step")                                                \
  X(evictions, "this layer's experts given up for others (or trimmed to the budget)")                    \
  X(predicted, "experts copied ahead by a prediction")                                                   \
  X(predicted_used, "of those, routed at the layer's next step (recall's numerator)")                    \
  X(routed_distinct, "distinct routed experts over all steps (hits + misses)")                           \
  X(ids_to_host_ns, "time to bring the routed ids to the host (a device sync on CUDA)")                  \
  X(layer_copies, "policy auto: steps that copied the whole layer in one copy")

struct LayerStats {
#define MOE_SWAP_STATS_FIELD(name, what) int64_t name = 0;
  MOE_SWAP_LAYER_STATS(MOE_SWAP_STATS_FIELD)
#undef MOE_SWAP_STATS_FIELD
};

#define MOE_SWAP_STATS_COUNT(name, what) +1
constexpr int kLayerStatsColumns = 0 MOE_SWAP_LAYER_STATS(MOE_SWAP_STATS_COUNT);
#undef MOE_SWAP_STATS_COUNT

}  // namespace moe_swap::streaming
