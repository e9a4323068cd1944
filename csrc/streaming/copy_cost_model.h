// Policy auto's cost model: a copy of b bytes costs overhead + b / bandwidth. It decides whether a
// step copies its missing experts one by one or its whole layer in one copy per bank. Set by the
// streamer's creator (copy_overhead_us, copy_gb_per_s), or measured on this machine when the expert
// pool is first allocated.
#pragma once

#include "streaming/copy_engine.h"
#include "streaming/device_pool.h"
#include "streaming/host_store.h"

#include <cstdint>

namespace moe_swap::streaming {

class CopyCostModel {
 public:
  void set(double overhead_us, double gb_per_s);
  bool known() const { return bytes_per_s_ >= 0; }
  // Time the same bytes (the first n <= 8 experts of layer 0 into the first pool slots, while nothing
  // is cached) as many per-expert copies and as one copy per bank: the difference is the per-copy
  // overhead, the rest the bandwidth. On CUDA it blocks the host (once per streamer).
  void calibrate(CopyEngine& engine, const HostStore& store, const DevicePool& pool);
  // One copy per bank of all `experts` experts against one copy per bank per missing expert. A tie
  // (no per-copy overhead, every expert missing: the same bytes either way) goes to the whole layer,
  // whose region lets the next layer be copied under this one's compute; on a CPU the measured
  // overhead is often 0.
  bool whole_layer_costs_no_more(int64_t experts, int64_t misses, double expert_bytes) const;
  // For cache_state: -1 until known.
  int64_t overhead_ns() const;
  int64_t bytes_per_s() const;

 private:
  double overhead_s_ = -1.0;
  double bytes_per_s_ = -1.0;
};

}  // namespace moe_swap::streaming
