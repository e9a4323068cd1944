// HostStore: every streamed layer's experts in exact-size host memory (pinned on CUDA), as per-expert
// records over byte banks, one block per bank. The weights are two banks: w13 [E, 2I, H] (gate rows,
// then up rows; [E, I, H] for ungated experts) and w2 [E, H, I]; a quantized format adds its scales and
// zero points as further banks. Every bank is expert-major, so expert e's record in bank b is one run
// of bytes (record()), and a copy of any set of experts is chunks of those runs. One block per bank,
// not one per layer, so the two views a uva acquire returns never share a storage (custom ops' outputs
// must not alias one another).
#pragma once

#include "streaming/backend.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace moe_swap::streaming {

// The banks of the weights (every layer has them; further banks follow them).
constexpr int kW13Bank = 0;
constexpr int kW2Bank = 1;
constexpr int kWeightBanks = 2;

// Shape and packing of one streamed layer.
struct LayerLayout {
  int64_t num_experts;    // E
  int64_t intermediate;   // I
  int64_t w13_rows;       // 2I (gate rows, then up rows) or I (ungated: up rows only)
  int64_t hidden;         // H
  at::ScalarType dtype;
  size_t w13_bytes;       // E*w13_rows*H*itemsize
  size_t w2_bytes;        // E*H*I*itemsize
  int num_banks() const { return kWeightBanks; }
  size_t bytes(int64_t bank) const { return bank == kW13Bank ? w13_bytes : w2_bytes; }
  // one expert's record in a bank
  size_t expert_bytes(int64_t bank) const { return bytes(bank) / static_cast<size_t>(num_experts); }
  size_t host_bytes() const { return w13_bytes + w2_bytes; }
  std::vector<int64_t> w13_shape() const { return {num_experts, w13_rows, hidden}; }
  std::vector<int64_t> w2_shape() const { return {num_experts, hidden, intermediate}; }
};

class HostStore {
 public:
  // Checks the shapes (names the argument and values on error), allocates the layer's exact bytes.
  int64_t reserve(StreamBackend& backend, at::IntArrayRef w13_shape, at::IntArrayRef w2_shape,
                  at::ScalarType dtype);
  // Copy `src` into layer `layer`'s `which` tensor (0: w13, 1: w2) at
  // [expert_start : expert_start + n, row_offset : row_offset + rows, :], where src is
  // [n, rows, cols] or [rows, cols] (n = 1). Same dtype; any strides; any device.
  void write(int64_t layer, int64_t which, int64_t expert_start, int64_t row_offset, const at::Tensor& src);

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  const LayerLayout& layout(int64_t layer) const { return layers_[layer].layout; }
  const std::shared_ptr<HostBlock>& block(int64_t layer, int64_t bank) const { return layers_[layer].blocks[bank]; }
  // Expert `expert`'s record in `bank`: layout(layer).expert_bytes(bank) bytes.
  const uint8_t* record(int64_t layer, int64_t bank, int64_t expert) const {
    return layers_[layer].blocks[bank]->data + static_cast<size_t>(expert) * layers_[layer].layout.expert_bytes(bank);
  }
  // Distinct bytes written into the layer so far (a layer is used only once it has all its bytes;
  // writing the same rows twice counts them once).
  size_t bytes_written(int64_t layer) const { return layers_[layer].bytes_written; }
  size_t host_bytes() const { return host_bytes_; }
  // The largest bank `bank` of any layer: what a scratch-ring slot must hold of it.
  size_t max_bytes(int64_t bank) const { return max_bytes_[bank]; }
  // CPU tensors aliasing the host block (valid while the store lives).
  at::Tensor host_view(int64_t layer, int64_t which) const;

 private:
  struct Entry {
    LayerLayout layout;
    std::shared_ptr<HostBlock> blocks[kWeightBanks];
    size_t bytes_written = 0;
    // per block, one flag per [H]- or [I]-wide row (expert-major): written at least once
    std::vector<bool> row_written[kWeightBanks];
  };
  std::vector<Entry> layers_;
  size_t host_bytes_ = 0;
  size_t max_bytes_[kWeightBanks] = {0, 0};
};

}  // namespace moe_swap::streaming
