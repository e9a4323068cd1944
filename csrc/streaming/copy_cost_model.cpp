#include "streaming/copy_cost_model.h"

#include <algorithm>
#include <cmath>

namespace moe_swap::streaming {

void CopyCostModel::set(double overhead_us, double gb_per_s) {
  overhead_s_ = overhead_us * 1e-6;
  bytes_per_s_ = gb_per_s * 1e9;
}

void CopyCostModel::calibrate(CopyEngine& engine, const HostStore& store, const DevicePool& pool) {
  const LayerLayout& l = store.layout(0);
  const int64_t n = std::min<int64_t>({pool.slots(), l.num_experts, 8});
  const double expert_bytes = static_cast<double>(l.expert_bytes(kW13Bank) + l.expert_bytes(kW2Bank));
  if (n < 2) {  // nothing to compare: assume copies are all bandwidth (auto then behaves as on_demand)
    overhead_s_ = 0.0;
    bytes_per_s_ = 1e12;
    return;
  }
  const size_t bytes = static_cast<size_t>(n * expert_bytes);
  CopyPlan separate{0, kDemandChannel, bytes, {}};
  CopyPlan whole{0, kDemandChannel, bytes, {}};
  for (int bank = 0; bank < kWeightBanks; ++bank) {
    const size_t b = l.expert_bytes(bank);
    const uint8_t* src = store.record(0, bank, 0);
    uint8_t* dst = pool.data(0, bank);
    for (int64_t e = 0; e < n; ++e) separate.chunks.push_back({src + e * b, dst + e * b, b});
    whole.chunks.push_back({src, dst, n * b});
  }
  constexpr int kRepeats = 5;
  const double t_separate = engine.backend().time_copy(separate, kRepeats);
  const double t_whole = engine.backend().time_copy(whole, kRepeats);
  const double extra_copies = static_cast<double>(separate.chunks.size() - whole.chunks.size());
  overhead_s_ = std::max(0.0, (t_separate - t_whole) / extra_copies);
  const double transfer_s = std::max(t_whole - kWeightBanks * overhead_s_, 1e-9);
  bytes_per_s_ = static_cast<double>(n) * expert_bytes / transfer_s;
}

bool CopyCostModel::whole_layer_costs_no_more(int64_t experts, int64_t misses, double expert_bytes) const {
  if (misses == 0 || bytes_per_s_ <= 0) return false;
  const double expert_s = expert_bytes / bytes_per_s_;
  const double on_demand_s = static_cast<double>(misses) * (kWeightBanks * overhead_s_ + expert_s);
  const double whole_s = kWeightBanks * overhead_s_ + static_cast<double>(experts) * expert_s;
  return whole_s <= on_demand_s;
}

int64_t CopyCostModel::overhead_ns() const {
  return overhead_s_ < 0 ? -1 : static_cast<int64_t>(std::llround(overhead_s_ * 1e9));
}

int64_t CopyCostModel::bytes_per_s() const {
  return bytes_per_s_ < 0 ? -1 : static_cast<int64_t>(std::llround(bytes_per_s_));
}

}  // namespace moe_swap::streaming
