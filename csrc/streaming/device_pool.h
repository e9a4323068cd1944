// DevicePool: device memory cut into equal slots, per bank (see host_store.h). Two layouts: the expert
// pool (one allocation per bank, so a bank is one [N, ...] tensor that fused_moe indexes through an
// expert map) and the scratch ring (each slot its own allocation per bank, so the views of two held
// layers never share a storage). Knows no policy: which slot holds what is a placement's.
#pragma once

#include "streaming/backend.h"
#include "streaming/host_store.h"

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <vector>

namespace moe_swap::streaming {

class DevicePool {
 public:
  enum class Layout { kOneAllocation, kAllocationPerSlot };
  explicit DevicePool(Layout layout) : layout_(layout) {}

  // (Re)allocate `slots` slots of slot_bytes[b] bytes in each bank b; the old memory is dropped (the
  // caller has drained every copy into it).
  void allocate(StreamBackend& backend, int64_t slots, const std::array<size_t, kWeightBanks>& slot_bytes);
  bool allocated() const { return !memory_.empty(); }  // (a pool of 0 slots is allocated)
  int64_t slots() const { return slots_; }
  size_t slot_bytes(int bank) const { return slot_bytes_[bank]; }
  size_t slot_bytes() const { return slot_bytes_[kW13Bank] + slot_bytes_[kW2Bank]; }
  size_t bytes() const { return static_cast<size_t>(slots_) * slot_bytes(); }
  uint8_t* data(int64_t slot, int bank) const;
  // The first `bytes` of a slot's bank as a tensor of `dtype` and `shape` (views, no copy).
  at::Tensor view(int64_t slot, int bank, size_t bytes, at::ScalarType dtype, at::IntArrayRef shape) const;
  // kOneAllocation: a whole bank as [N, ...shape] of `dtype`.
  at::Tensor bank_view(int bank, at::ScalarType dtype, at::IntArrayRef expert_shape) const;

 private:
  const Layout layout_;
  int64_t slots_ = 0;
  std::array<size_t, kWeightBanks> slot_bytes_ = {0, 0};
  std::vector<std::array<at::Tensor, kWeightBanks>> memory_;  // one entry, or one per slot
};

}  // namespace moe_swap::streaming
