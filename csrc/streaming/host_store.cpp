#include "streaming/host_store.h"

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <atomic>
#include <fstream>
#include <sstream>
#include <string>

namespace moe_swap::streaming {

namespace {
std::atomic<int64_t> g_live_host_bytes{0};
std::atomic<int64_t> g_live_host_blocks{0};

// bytes = product(dims) * itemsize, or an error naming the tensor when it does not fit in size_t.
size_t checked_bytes(const char* name, at::IntArrayRef shape, size_t itemsize) {
  uint64_t n = itemsize;
  for (int64_t d : shape) {
    TORCH_CHECK(!c10::mul_overflows(n, static_cast<uint64_t>(d), &n), "HostStore: ", name, " of shape ",
                shape, " is too large to address");
  }
  return static_cast<size_t>(n);
}
}  // namespace

void host_bytes_allocated(size_t bytes) {
  g_live_host_bytes += static_cast<int64_t>(bytes);
  g_live_host_blocks += 1;
}
void host_bytes_freed(size_t bytes) {
  g_live_host_bytes -= static_cast<int64_t>(bytes);
  g_live_host_blocks -= 1;
}
int64_t live_host_bytes() { return g_live_host_bytes.load(); }
int64_t live_host_blocks() { return g_live_host_blocks.load(); }

int64_t host_memory_available() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return -1;
}

int64_t HostStore::reserve(StreamBackend& backend, at::IntArrayRef w13_shape, at::IntArrayRef w2_shape,
                           at::ScalarType dtype) {
  TORCH_CHECK(w13_shape.size() == 3, "w13 must be 3-D [E, 2I, H] (or [E, I, H] ungated), got shape ", w13_shape);
  TORCH_CHECK(w2_shape.size() == 3, "w2 must be 3-D [E, H, I], got shape ", w2_shape);
  for (size_t d = 0; d < 3; ++d) {
    TORCH_CHECK(w13_shape[d] > 0, "w13 dims must be positive, got shape ", w13_shape);
    TORCH_CHECK(w2_shape[d] > 0, "w2 dims must be positive, got shape ", w2_shape);
  }
  const int64_t E = w13_shape[0], H = w13_shape[2], I = w2_shape[2];
  TORCH_CHECK(w2_shape[0] == E && w2_shape[1] == H, "w2 must be [E, H, I] with [E, H] = [", E, ", ", H,
              "] to match w13 ", w13_shape, ", got ", w2_shape);
  TORCH_CHECK(w13_shape[1] == 2 * I || w13_shape[1] == I,
              "w13.size(1) must be 2*I (gate rows then up rows) or I (ungated: up rows only) with I = w2.size(2) = ",
              I, ", got ", w13_shape[1], " (w13 shape ", w13_shape, ", w2 shape ", w2_shape, ")");
  TORCH_CHECK(at::isFloatingType(dtype) || at::isIntegralType(dtype, /*includeBool=*/false),
              "layer dtype must be a floating or integer type, got ", dtype);
  const size_t itemsize = c10::elementSize(dtype);

  LayerLayout layout{E, I, w13_shape[1], H, dtype, checked_bytes("w13", w13_shape, itemsize),
                     checked_bytes("w2", w2_shape, itemsize)};
  TORCH_CHECK(layout.w2_bytes <= SIZE_MAX - layout.w13_bytes, "HostStore: layer of shapes ", w13_shape, " and ",
              w2_shape, " is too large to address");

  Entry entry{layout, {backend.allocate_host(layout.w13_bytes), backend.allocate_host(layout.w2_bytes)}, 0, {}};
  entry.row_written[0].assign(static_cast<size_t>(E * w13_shape[1]), false);
  entry.row_written[1].assign(static_cast<size_t>(E * H), false);
  layers_.push_back(std::move(entry));
  host_bytes_ += layout.host_bytes();
  for (int which = 0; which < 2; ++which) max_bytes_[which] = std::max(max_bytes_[which], layout.bytes(which));
  return num_layers() - 1;
}

at::Tensor HostStore::host_view(int64_t layer, int64_t which) const {
  const Entry& e = layers_[layer];
  const LayerLayout& l = e.layout;
  return at::from_blob(e.blocks[which]->data, which == 0 ? l.w13_shape() : l.w2_shape(),
                       at::TensorOptions().dtype(l.dtype).device(at::kCPU));
}

void HostStore::write(int64_t layer, int64_t which, int64_t expert_start, int64_t row_offset,
                      const at::Tensor& src) {
  TORCH_CHECK(layer >= 0 && layer < num_layers(), "layer must be in [0, ", num_layers(), "), got ", layer);
  TORCH_CHECK(which == 0 || which == 1, "which must be 0 (w13) or 1 (w2), got ", which);
  const LayerLayout& l = layers_[layer].layout;
  const char* name = which == 0 ? "w13" : "w2";
  at::Tensor dst_full = host_view(layer, which);
  TORCH_CHECK(src.dim() == 2 || src.dim() == 3, "src must be 2-D [rows, cols] or 3-D [experts, rows, cols], got ",
              src.dim(), "-D with shape ", src.sizes());
  TORCH_CHECK(src.scalar_type() == l.dtype, "src must have the layer's dtype ", l.dtype, ", got ",
              src.scalar_type());
  at::Tensor src3 = src.dim() == 2 ? src.unsqueeze(0) : src;
  const int64_t n = src3.size(0), rows = src3.size(1), cols = src3.size(2);
  TORCH_CHECK(cols == dst_full.size(2), "src.size(-1) must equal ", name, ".size(2) = ", dst_full.size(2),
              ", got ", cols, " (src shape ", src.sizes(), ")");
  TORCH_CHECK(expert_start >= 0 && n <= dst_full.size(0) && expert_start <= dst_full.size(0) - n,
              "experts [", expert_start, ", ", expert_start, " + ", n, ") must lie in [0, ", dst_full.size(0),
              ") of ", name);
  TORCH_CHECK(row_offset >= 0 && rows <= dst_full.size(1) && row_offset <= dst_full.size(1) - rows, "rows [",
              row_offset, ", ", row_offset, " + ", rows, ") must lie in [0, ", dst_full.size(1), ") of ", name);
  dst_full.narrow(0, expert_start, n).narrow(1, row_offset, rows).copy_(src3);
  // Count only rows not written before, so that writing a part twice cannot make a layer with
  // unwritten parts look complete.
  std::vector<bool>& written = layers_[layer].row_written[which];
  const int64_t rows_per_expert = dst_full.size(1);
  size_t new_rows = 0;
  for (int64_t e = expert_start; e < expert_start + n; ++e) {
    for (int64_t r = row_offset; r < row_offset + rows; ++r) {
      const size_t flag = static_cast<size_t>(e * rows_per_expert + r);
      if (!written[flag]) {
        written[flag] = true;
        ++new_rows;
      }
    }
  }
  layers_[layer].bytes_written += new_rows * static_cast<size_t>(cols) * c10::elementSize(l.dtype);
}

}  // namespace moe_swap::streaming
