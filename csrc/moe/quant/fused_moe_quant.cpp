// fused_moe_quant on the CPU: fused_moe's computation (moe/fused_moe.cpp) on quantized experts, computed
// from their bytes: no float copy of a layer or an expert is ever made.
//
// 1. Validate (quant_checks.h), make the inputs contiguous, counting-sort the (token, slot) pairs by expert
//    (checking every id), gather each sorted row's token as float32.
// 2. Gate/up, then down: each expert's rows cut into tiles, all tiles of all experts in one parallel region
//    (threads claim tiles from a shared counter). A tile of an expert with few tokens decodes each weight
//    in registers once for all of them (quant rows_times_tokens); with more tokens it dequantizes 4 rows at
//    a time into a thread-local float buffer (a few KB, in cache) that the float kernel of fused_moe then
//    multiplies into every token, so the decoding is paid once per weight, not once per token.
// 3. The activation (fused_moe's act_and_mul, rounded to the input dtype), then the combine in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "moe/quant/quant_checks.h"
#include "moe/quant/quant_cpu_kernels.h"
#include "ops.h"

namespace moe_swap {
namespace {

using cpu::QuantMatrix;
using cpu::WeightType;

// Experts with more tokens than this dequantize row tiles into a buffer (see the top of the file): at
// 8 tokens the in-register decoding is already repeated twice per weight (4-token micro tiles).
constexpr int64_t kDecodeInRegistersMaxTokens = 8;
constexpr int64_t kBufferRows = 4;

WeightType float_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return WeightType::kBFloat16;
    case at::kHalf: return WeightType::kFloat16;
    default: return WeightType::kFloat32;
  }
}

struct Groups {
  std::vector<int64_t> row_begin;      // [E + 1]
  std::vector<int64_t> token_of_row;   // [N]
  std::vector<int64_t> global_of_row;  // [N]
  std::vector<int64_t> row_of_pair;    // [T * k], -1: expert not held here
};

template <typename id_t>
Groups sort_pairs(const id_t* ids, const int32_t* expert_map, bool mapped, const FusedMoeSizes& s) {
  const int64_t num_pairs = s.num_tokens * s.top_k;
  std::vector<int64_t> expert_of_pair(num_pairs);
  Groups g;
  g.row_begin.assign(s.num_experts + 1, 0);
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t id = static_cast<int64_t>(ids[p]);
    int64_t expert = id;
    if (mapped) {
      TORCH_CHECK(id >= 0 && id < s.num_global_experts, "topk_ids[", p / s.top_k, ", ", p % s.top_k, "] = ", id,
                  " is out of range: expected a global expert id in [0, ", s.num_global_experts, ") (expert_map has ",
                  s.num_global_experts, " entries)");
      expert = expert_map[id];
      TORCH_CHECK(expert >= -1 && expert < s.num_experts, "expert_map[", id, "] = ", expert,
                  " is out of range: expected -1 (not held here) or an index in [0, ", s.num_experts,
                  ") into w13/w2 (used by topk_ids[", p / s.top_k, ", ", p % s.top_k, "])");
    } else {
      TORCH_CHECK(id >= 0 && id < s.num_experts, "topk_ids[", p / s.top_k, ", ", p % s.top_k, "] = ", id,
                  " is out of range: expected an expert id in [0, ", s.num_experts, ") (w13 holds ", s.num_experts,
                  " experts)");
    }
    expert_of_pair[p] = expert;
    if (expert >= 0) ++g.row_begin[expert + 1];
  }
  for (int64_t e = 0; e < s.num_experts; ++e) g.row_begin[e + 1] += g.row_begin[e];
  std::vector<int64_t> next(g.row_begin.begin(), g.row_begin.end() - 1);
  g.token_of_row.resize(g.row_begin.back());
  g.global_of_row.resize(g.row_begin.back());
  g.row_of_pair.assign(num_pairs, -1);
  for (int64_t p = 0; p < num_pairs; ++p) {
    if (expert_of_pair[p] < 0) continue;
    const int64_t row = next[expert_of_pair[p]]++;
    g.token_of_row[row] = p / s.top_k;
    g.global_of_row[row] = static_cast<int64_t>(ids[p]);
    g.row_of_pair[p] = row;
  }
  return g;
}

struct Tile {
  int64_t expert, row0, row1;
};

// Tiles of about 64 KB of quantized weights, at least 4 per thread overall, none narrower than 16 rows.
std::vector<Tile> cut_tiles(const std::vector<int64_t>& experts, int64_t rows, int64_t row_bytes) {
  std::vector<Tile> tiles;
  if (experts.empty() || rows == 0) return tiles;
  const int64_t min_tiles = 4 * at::get_num_threads();
  const int64_t per_expert = std::max<int64_t>(1, (min_tiles + experts.size() - 1) / experts.size());
  int64_t tile_rows = std::min((rows + per_expert - 1) / per_expert, (64 * 1024) / std::max<int64_t>(1, row_bytes));
  tile_rows = (std::max<int64_t>(16, tile_rows) + 3) / 4 * 4;
  for (int64_t e : experts)
    for (int64_t r = 0; r < rows; r += tile_rows) tiles.push_back({e, r, std::min(rows, r + tile_rows)});
  return tiles;
}

template <typename Fn>
void run_tiles(int64_t num_tiles, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), num_tiles);
  if (threads <= 0) return;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < num_tiles;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(i);
  });
}

// One projection of the layer, [E, rows, cols] quantized; matrix(e) is expert e's.
struct QuantProjection {
  QuantMatrix first;          // expert 0
  int64_t expert_q_bytes;     // strides between experts
  int64_t expert_scale_bytes;
  int64_t expert_zero_bytes;
  int64_t rows;

  QuantMatrix matrix(int64_t e) const {
    QuantMatrix m = first;
    m.q += e * expert_q_bytes;
    m.scale = static_cast<const char*>(m.scale) + e * expert_scale_bytes;
    if (m.zero != nullptr) m.zero += e * expert_zero_bytes;
    return m;
  }
};

QuantProjection projection_of(QuantFormat f, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                              int64_t cols, int64_t group, int64_t segments) {
  QuantMatrix m{};
  m.format = static_cast<cpu::QFormat>(f);
  m.q = static_cast<const uint8_t*>(q.data_ptr());
  m.row_bytes = q.size(2);
  m.scale = scale.data_ptr();
  m.scale_type = float_type(scale.scalar_type());
  m.scale_ld = scale.dim() == 3 ? scale.size(2) : 1;
  m.zero = zero.defined() ? static_cast<const uint8_t*>(zero.data_ptr()) : nullptr;
  m.group = group;
  m.cols = cols;
  m.seg_rows = q.size(1) / segments;
  m.seg_blocks = (m.seg_rows + kFp8BlockSize - 1) / kFp8BlockSize;
  const auto per_expert = [&](const at::Tensor& t) {
    return t.defined() && q.size(0) > 0 ? static_cast<int64_t>(t.nbytes()) / q.size(0) : int64_t{0};
  };
  return QuantProjection{m, per_expert(q), per_expert(scale), per_expert(zero), q.size(1)};
}

// out[t * ld_out + r] = x_t . W[row0 + r] for the n tokens of one expert, rows [row0, row0 + num_rows).
void project(const QuantMatrix& m, const float* x, int64_t n, int64_t row0, int64_t num_rows, float* out,
             int64_t ld_out) {
  const cpu::QuantKernelBuild& qk = cpu::quant_kernel_build();
  if (n <= kDecodeInRegistersMaxTokens) {
    qk.rows_times_tokens(x, n, m.cols, m, row0, num_rows, out, ld_out);
    return;
  }
  thread_local std::vector<float> rows;  // kBufferRows dequantized rows: the only float weights, in cache
  rows.resize(kBufferRows * m.cols);
  const auto float_rows_times_tokens = cpu::kernel_build().rows_times_tokens;
  for (int64_t r = 0; r < num_rows; r += kBufferRows) {
    const int64_t count = std::min(kBufferRows, num_rows - r);
    qk.dequant_rows(m, row0 + r, count, rows.data());
    float_rows_times_tokens(x, n, m.cols, rows.data(), WeightType::kFloat32, count, m.cols, m.cols, out + r, ld_out);
  }
}

template <typename scalar_t>
void combine(const Groups& g, const float* expert_out, const float* topk_weights, const float* w2_bias,
             const FusedMoeSizes& s, scalar_t* out) {
  const int64_t H = s.hidden_size, k = s.top_k;
  at::parallel_for(0, s.num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(H);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = g.row_of_pair[t * k + j];
        if (row < 0) continue;
        const float w = topk_weights[t * k + j];
        const float* y = expert_out + row * H;
        const float* b = w2_bias != nullptr ? w2_bias + g.global_of_row[row] * H : nullptr;
        for (int64_t h = 0; h < H; ++h) acc[h] += w * (y[h] + (b != nullptr ? b[h] : 0.0f));
      }
      for (int64_t h = 0; h < H; ++h) out[t * H + h] = static_cast<scalar_t>(acc[h]);
    }
  });
}

}  // namespace

at::Tensor fused_moe_quant_cpu(const at::Tensor& hidden_states_in, const at::Tensor& w13_in,
                               const at::Tensor& w13_scale_in, const at::Tensor& w2_in, const at::Tensor& w2_scale_in,
                               const at::Tensor& topk_weights_in, const at::Tensor& topk_ids_in,
                               c10::string_view format, int64_t group_size,
                               const std::optional<at::Tensor>& w13_zero_in,
                               const std::optional<at::Tensor>& w2_zero_in,
                               const std::optional<at::Tensor>& expert_map_in, c10::string_view activation,
                               const std::optional<at::Tensor>& w13_bias_in,
                               const std::optional<at::Tensor>& w2_bias_in, bool gated, double swiglu_alpha,
                               double swiglu_limit) {
  const FusedMoeQuantSizes qs = check_fused_moe_quant_args(
      hidden_states_in, w13_in, w13_scale_in, w2_in, w2_scale_in, topk_weights_in, topk_ids_in, format, group_size,
      w13_zero_in, w2_zero_in, expert_map_in, activation, w13_bias_in, w2_bias_in, gated, swiglu_alpha, swiglu_limit);
  const FusedMoeSizes& s = qs.moe;
  TORCH_CHECK(hidden_states_in.device().is_cpu(), "fused_moe_quant_cpu: hidden_states must be on the CPU, got ",
              hidden_states_in.device());
  at::Tensor out = at::empty({s.num_tokens, s.hidden_size}, hidden_states_in.options());
  if (s.num_tokens == 0 || s.hidden_size == 0) return out;

  const at::Tensor w13 = w13_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor w13_scale = w13_scale_in.contiguous(), w2_scale = w2_scale_in.contiguous();
  const at::Tensor w13_zero = w13_zero_in.has_value() ? w13_zero_in->contiguous() : at::Tensor();
  const at::Tensor w2_zero = w2_zero_in.has_value() ? w2_zero_in->contiguous() : at::Tensor();
  const at::Tensor topk_weights = topk_weights_in.contiguous(), topk_ids = topk_ids_in.contiguous();
  const at::Tensor expert_map = expert_map_in.has_value() ? expert_map_in->contiguous() : at::Tensor();
  const bool mapped = expert_map.defined();
  const int32_t* map_ptr = mapped ? expert_map.data_ptr<int32_t>() : nullptr;
  const Groups groups = topk_ids.scalar_type() == at::kInt ? sort_pairs(topk_ids.data_ptr<int32_t>(), map_ptr, mapped, s)
                                                           : sort_pairs(topk_ids.data_ptr<int64_t>(), map_ptr, mapped, s);
  const int64_t num_rows = groups.row_begin.back();
  const int64_t H = s.hidden_size, I = s.intermediate_size;

  const at::TensorOptions f32 = hidden_states_in.options().dtype(at::kFloat);
  const at::Tensor hidden_f32 = hidden_states_in.to(at::kFloat).contiguous();
  at::Tensor x = at::empty({num_rows, H}, f32);
  {
    const float* src = hidden_f32.data_ptr<float>();
    float* dst = x.data_ptr<float>();
    at::parallel_for(0, num_rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) std::memcpy(dst + r * H, src + groups.token_of_row[r] * H, H * sizeof(float));
    });
  }
  const at::Tensor w13_bias = s.has_w13_bias ? w13_bias_in->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor w2_bias = s.has_w2_bias ? w2_bias_in->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor activated = at::empty({num_rows, I}, f32);
  at::Tensor expert_out = at::empty({num_rows, H}, f32);

  const QuantProjection p13 = projection_of(qs.format, w13, w13_scale, w13_zero, H, qs.group_size, gated ? 2 : 1);
  const QuantProjection p2 = projection_of(qs.format, w2, w2_scale, w2_zero, I, qs.group_size, 1);
  std::vector<int64_t> experts;
  for (int64_t e = 0; e < s.num_experts; ++e)
    if (groups.row_begin[e + 1] > groups.row_begin[e]) experts.push_back(e);

  const float* x_ptr = x.data_ptr<float>();
  float* act_ptr = activated.data_ptr<float>();
  float* eo_ptr = expert_out.data_ptr<float>();
  const float* b13 = s.has_w13_bias ? w13_bias.data_ptr<float>() : nullptr;
  const cpu::ActParams act{static_cast<int>(s.activation), s.swiglu_alpha, s.swiglu_limit};
  const WeightType round_to = float_type(hidden_states_in.scalar_type());
  const auto act_and_mul = cpu::kernel_build().act_and_mul;

  // gate/up: a tile of intermediate columns [row0, row1) reads those gate rows and the matching up rows
  const std::vector<Tile> up_tiles = cut_tiles(experts, I, (gated ? 2 : 1) * p13.first.row_bytes);
  run_tiles(static_cast<int64_t>(up_tiles.size()), [&](int64_t i) {
    thread_local std::vector<float> gate, up;
    const Tile& tile = up_tiles[i];
    const int64_t row0 = groups.row_begin[tile.expert], n = groups.row_begin[tile.expert + 1] - row0;
    const int64_t width = tile.row1 - tile.row0;
    const QuantMatrix m = p13.matrix(tile.expert);
    gate.resize(gated ? n * width : 0);
    up.resize(n * width);
    if (gated) project(m, x_ptr + row0 * H, n, tile.row0, width, gate.data(), width);
    project(m, x_ptr + row0 * H, n, (gated ? I : 0) + tile.row0, width, up.data(), width);
    for (int64_t t = 0; t < n; ++t) {
      const float* bias = b13 != nullptr ? b13 + groups.global_of_row[row0 + t] * s.w13_rows : nullptr;
      act_and_mul(gated ? gate.data() + t * width : nullptr, up.data() + t * width,
                  bias != nullptr && gated ? bias + tile.row0 : nullptr,
                  bias != nullptr ? bias + (gated ? I : 0) + tile.row0 : nullptr, act_ptr + (row0 + t) * I + tile.row0,
                  width, act, round_to);
    }
  });
  const std::vector<Tile> down_tiles = cut_tiles(experts, H, p2.first.row_bytes);
  run_tiles(static_cast<int64_t>(down_tiles.size()), [&](int64_t i) {
    const Tile& tile = down_tiles[i];
    const int64_t row0 = groups.row_begin[tile.expert], n = groups.row_begin[tile.expert + 1] - row0;
    project(p2.matrix(tile.expert), act_ptr + row0 * I, n, tile.row0, tile.row1 - tile.row0,
            eo_ptr + row0 * H + tile.row0, H);
  });

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fused_moe_quant_cpu_combine", [&] {
    combine<scalar_t>(groups, eo_ptr, topk_weights.data_ptr<float>(), s.has_w2_bias ? w2_bias.data_ptr<float>() : nullptr,
                      s, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace moe_swap
