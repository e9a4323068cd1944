#include "streaming/device_pool.h"

#include <ATen/ATen.h>

namespace moe_swap::streaming {

void DevicePool::allocate(StreamBackend& backend, int64_t slots, const std::array<size_t, kWeightBanks>& slot_bytes) {
  memory_.clear();
  slots_ = 0;
  const int64_t allocations = layout_ == Layout::kOneAllocation ? 1 : slots;
  const size_t per_allocation = layout_ == Layout::kOneAllocation ? static_cast<size_t>(slots) : 1;
  for (int64_t i = 0; i < allocations; ++i) {
    std::array<at::Tensor, kWeightBanks> banks;
    for (int b = 0; b < kWeightBanks; ++b) banks[b] = backend.allocate_slot(per_allocation * slot_bytes[b]);
    memory_.push_back(std::move(banks));
  }
  slots_ = slots;
  slot_bytes_ = slot_bytes;
}

uint8_t* DevicePool::data(int64_t slot, int bank) const {
  if (layout_ == Layout::kAllocationPerSlot) return memory_[slot][bank].data_ptr<uint8_t>();
  return static_cast<uint8_t*>(memory_[0][bank].data_ptr()) + static_cast<size_t>(slot) * slot_bytes_[bank];
}

at::Tensor DevicePool::view(int64_t slot, int bank, size_t bytes, at::ScalarType dtype, at::IntArrayRef shape) const {
  TORCH_INTERNAL_ASSERT(layout_ == Layout::kAllocationPerSlot && slot < slots_ && bytes <= slot_bytes_[bank]);
  return memory_[slot][bank].narrow(0, 0, static_cast<int64_t>(bytes)).view(dtype).view(shape);
}

at::Tensor DevicePool::bank_view(int bank, at::ScalarType dtype, at::IntArrayRef expert_shape) const {
  TORCH_INTERNAL_ASSERT(layout_ == Layout::kOneAllocation && allocated());
  std::vector<int64_t> shape{slots_};
  shape.insert(shape.end(), expert_shape.begin(), expert_shape.end());
  return memory_[0][bank].view(dtype).view(shape);
}

}  // namespace moe_swap::streaming
