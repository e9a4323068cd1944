// fused_moe on the CPU: the experts of a MoE layer, grouped by expert.
//
// 1. Validate (moe_checks.h) and make every input contiguous (non-contiguous inputs are accepted).
// 2. Counting sort of the (token, slot) pairs by expert, checking every id on the way.
// 3. Gather each expert's tokens into consecutive float rows.
// 4. Per expert: gate/up projection (up only when ungated), fused bias-activation-and-multiply
//    (rounded to the input dtype, as a model running in that dtype does), down projection; all in
//    float32 accumulators. The biases are indexed by each row's global expert id, not its slot.
//    - Experts with up to small_batch_limit(dtype) tokens (decode, middle) are cut into row tiles that all
//      run in one parallel region, one thread per tile, with a kernel that reads each weight row once
//      for all of the expert's tokens (parallel across experts and across rows within an expert).
//    - Experts with more tokens (large prefill) run one after another, each projection a float32
//      GEMM that uses every thread (bfloat16/float16 weights are widened to float32 first). The limit
//      is per build and dtype: the avx512_bf16 build keeps bfloat16 experts of any size on the tiles.
// 5. Combine: per token, the routing-weighted sum of its experts' outputs (plus the w2 bias of each
//    expert's global id) in float32, then the cast.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "moe/fused_moe_cpu_kernels.h"
#include "moe/moe_checks.h"
#include "ops.h"

namespace moe_swap {
namespace {

using cpu::WeightType;

// Experts with at most this many tokens take the tiled path: the kernel build's measured limit (see
// fused_moe_cpu_dispatch.cpp); MOE_SWAP_CPU_SMALL_BATCH overrides it (the tests use it to run both paths).
int64_t small_batch_limit(WeightType w_type) {
  static const char* env = std::getenv("MOE_SWAP_CPU_SMALL_BATCH");
  return env != nullptr ? std::max<int64_t>(0, std::atoll(env))
                        : cpu::kernel_build().small_batch_limit[static_cast<int>(w_type)];
}

WeightType weight_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return WeightType::kBFloat16;
    case at::kHalf: return WeightType::kFloat16;
    default: return WeightType::kFloat32;
  }
}

// The (token, slot) pairs sorted by the expert that serves them.
struct ExpertGroups {
  std::vector<int64_t> row_begin;    // [E + 1]: expert e owns sorted rows [row_begin[e], row_begin[e+1])
  std::vector<int64_t> token_of_row; // [N]: the token each sorted row belongs to
  std::vector<int64_t> global_of_row; // [N]: the global expert id (topk_ids) of each sorted row: bias index
  std::vector<int64_t> row_of_pair;  // [T * k]: sorted row of pair t*k+j, or -1 (expert not held here)
};

// expert_map: nullptr when no map was given; a map with no entries (num_global_experts == 0) is still a
// map (every id is out of range), whose data pointer may be null too, hence `mapped`.
template <typename id_t>
ExpertGroups group_pairs_by_expert(const id_t* ids, bool mapped, const int32_t* expert_map, const FusedMoeSizes& s) {
  const int64_t num_pairs = s.num_tokens * s.top_k;
  std::vector<int64_t> expert_of_pair(num_pairs);
  std::vector<int64_t> global_of_pair(num_pairs);
  std::vector<int64_t> count(s.num_experts + 1, 0);
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t id = static_cast<int64_t>(ids[p]);
    int64_t expert = id;
    if (mapped) {
      TORCH_CHECK(id >= 0 && id < s.num_global_experts, "topk_ids[", p / s.top_k, ", ", p % s.top_k, "] = ", id,
                  " is out of range: expected a global expert id in [0, ", s.num_global_experts,
                  ") (expert_map has ", s.num_global_experts, " entries)");
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
    global_of_pair[p] = id;
    if (expert >= 0) ++count[expert + 1];
  }
  ExpertGroups groups;
  groups.row_begin.assign(s.num_experts + 1, 0);
  for (int64_t e = 0; e < s.num_experts; ++e) groups.row_begin[e + 1] = groups.row_begin[e] + count[e + 1];
  std::vector<int64_t> next(groups.row_begin.begin(), groups.row_begin.end() - 1);
  groups.token_of_row.resize(groups.row_begin.back());
  groups.global_of_row.resize(groups.row_begin.back());
  groups.row_of_pair.assign(num_pairs, -1);
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t expert = expert_of_pair[p];
    if (expert < 0) continue;
    const int64_t row = next[expert]++;
    groups.token_of_row[row] = p / s.top_k;
    groups.global_of_row[row] = global_of_pair[p];
    groups.row_of_pair[p] = row;
  }
  return groups;
}

// One unit of small-batch work: rows [row0, row1) of one expert's projection.
struct RowTile {
  int64_t expert;
  int64_t row0;
  int64_t row1;
};

std::vector<RowTile> cut_into_tiles(const std::vector<int64_t>& experts, int64_t num_rows, int64_t row_bytes,
                                    int64_t min_tiles) {
  std::vector<RowTile> tiles;
  if (experts.empty() || num_rows == 0) return tiles;
  // Tiles of about 256 KB of weights: small enough that the last one leaves the other threads idle
  // only briefly at the join, large enough that claiming one costs nothing next to reading it; and at
  // least min_tiles of them, none narrower than 16 rows.
  constexpr int64_t kTileBytes = 256 * 1024;
  const int64_t per_expert = std::max<int64_t>(1, (min_tiles + experts.size() - 1) / experts.size());
  int64_t tile_rows = std::min((num_rows + per_expert - 1) / per_expert, kTileBytes / std::max<int64_t>(1, row_bytes));
  tile_rows = std::max<int64_t>(16, tile_rows);
  tile_rows = (tile_rows + 3) / 4 * 4;  // whole 4-row micro tiles
  for (int64_t e : experts)
    for (int64_t r = 0; r < num_rows; r += tile_rows) tiles.push_back({e, r, std::min(num_rows, r + tile_rows)});
  return tiles;
}

// Runs fn(i) for every tile i < num_tiles on torch's threads, each thread claiming the next tile from a
// shared counter: a thread the OS runs late (other processes on the cores) or a slow tile leaves the
// remaining tiles to the others instead of holding a fixed share of them until the join.
template <typename Fn>
void run_tiles(int64_t num_tiles, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), num_tiles);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < num_tiles;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(i);
  });
}

struct ExpertWork {
  const FusedMoeSizes& s;
  WeightType w_type;
  int64_t w_elem_bytes;
  const char* w13;      // [E, 2I, H] (gated) or [E, I, H]
  const char* w2;       // [E, H, I]
  const float* x;       // [N, H] gathered tokens, sorted by expert
  float* activated;     // [N, I] act(gate + b) * (up + b) or act(up + b), rounded to the input dtype
  float* expert_out;    // [N, H] down projection per sorted row
  const std::vector<int64_t>& row_begin;
  const std::vector<int64_t>& global_of_row;
  const float* w13_bias;  // [E_global, w13_rows] float32, or nullptr
  cpu::ActParams act;

  const char* w13_of(int64_t e) const { return w13 + e * s.w13_rows * s.hidden_size * w_elem_bytes; }
  // The w13 bias of sorted row `row`, shifted to w13 row `offset`; nullptr without a bias.
  const float* w13_bias_of(int64_t row, int64_t offset) const {
    return w13_bias != nullptr ? w13_bias + global_of_row[row] * s.w13_rows + offset : nullptr;
  }
  // act_and_mul on sorted row `row`'s gate/up values for intermediate columns [col0, col0 + width).
  void activate(const float* gate, const float* up, int64_t row, int64_t col0, int64_t width) const {
    const int64_t I = s.intermediate_size;
    cpu::kernel_build().act_and_mul(gate, up, s.gated ? w13_bias_of(row, col0) : nullptr,
                                    w13_bias_of(row, (s.gated ? I : 0) + col0), activated + row * I + col0, width,
                                    act, w_type);
  }
  const char* w2_of(int64_t e) const { return w2 + e * s.hidden_size * s.intermediate_size * w_elem_bytes; }
};

// Decode: every small expert's projections cut into row tiles, all tiles in parallel.
void run_small_experts(const ExpertWork& work, const std::vector<int64_t>& experts) {
  const int64_t H = work.s.hidden_size, I = work.s.intermediate_size;
  const int64_t min_tiles = 4 * at::get_num_threads();
  const auto rows_times_tokens = cpu::kernel_build().rows_times_tokens;
  const bool gated = work.s.gated;
  const int64_t up_row0 = gated ? I : 0;  // w13's up rows follow the gate rows when gated

  // An up tile reads its rows of gate (when gated) and up.
  const std::vector<RowTile> up_tiles =
      cut_into_tiles(experts, I, (gated ? 2 : 1) * H * work.w_elem_bytes, min_tiles);
  run_tiles(static_cast<int64_t>(up_tiles.size()), [&](int64_t i) {
    thread_local std::vector<float> gate, up;  // kept per thread: no allocation per tile
    const RowTile& tile = up_tiles[i];
    const int64_t row0 = work.row_begin[tile.expert];
    const int64_t n = work.row_begin[tile.expert + 1] - row0;
    const int64_t width = tile.row1 - tile.row0;
    gate.resize(gated ? n * width : 0);
    up.resize(n * width);
    const char* w = work.w13_of(tile.expert);
    if (gated)
      rows_times_tokens(work.x + row0 * H, n, H, w + tile.row0 * H * work.w_elem_bytes, work.w_type, width, H, H,
                        gate.data(), width);
    rows_times_tokens(work.x + row0 * H, n, H, w + (up_row0 + tile.row0) * H * work.w_elem_bytes, work.w_type,
                      width, H, H, up.data(), width);
    for (int64_t t = 0; t < n; ++t)
      work.activate(gated ? gate.data() + t * width : nullptr, up.data() + t * width, row0 + t, tile.row0, width);
  });

  const std::vector<RowTile> down_tiles = cut_into_tiles(experts, H, I * work.w_elem_bytes, min_tiles);
  run_tiles(static_cast<int64_t>(down_tiles.size()), [&](int64_t i) {
    const RowTile& tile = down_tiles[i];
    const int64_t row0 = work.row_begin[tile.expert];
    const int64_t n = work.row_begin[tile.expert + 1] - row0;
    rows_times_tokens(work.activated + row0 * I, n, I, work.w2_of(tile.expert) + tile.row0 * I * work.w_elem_bytes,
                      work.w_type, tile.row1 - tile.row0, I, I, work.expert_out + row0 * H + tile.row0, H);
  });
}

// Prefill: one expert at a time, each projection a float32 GEMM over all threads.
void run_large_experts(const ExpertWork& work, const std::vector<int64_t>& experts, const at::Tensor& w13,
                       const at::Tensor& w2, const at::Tensor& x, const at::Tensor& activated,
                       const at::Tensor& expert_out) {
  if (experts.empty()) return;
  const int64_t I = work.s.intermediate_size, rows13 = work.s.w13_rows;
  const bool gated = work.s.gated;
  // Widened to float32 rather than torch's bf16/f16 matmul: that one rounds gate/up to the dtype (the
  // contract rounds only the activated intermediate; CPU mm has no float32 output for bf16 inputs), and
  // without native bf16/f16 dot products it measured 5-300x slower than SGEMM (BENCHMARKS.md, Zen 3).
  const bool widen = w13.scalar_type() != at::kFloat;
  at::Tensor w13_wide, w2_wide;
  if (widen) {
    w13_wide = at::empty({w13.size(1), w13.size(2)}, w13.options().dtype(at::kFloat));
    w2_wide = at::empty({w2.size(1), w2.size(2)}, w2.options().dtype(at::kFloat));
  }
  int64_t max_rows = 0;
  for (int64_t e : experts) max_rows = std::max(max_rows, work.row_begin[e + 1] - work.row_begin[e]);
  at::Tensor gate_up = at::empty({max_rows, rows13}, x.options());

  for (int64_t e : experts) {
    const int64_t row0 = work.row_begin[e];
    const int64_t n = work.row_begin[e + 1] - row0;
    at::Tensor w13_e = w13.select(0, e), w2_e = w2.select(0, e);
    if (widen) {
      w13_wide.copy_(w13_e);
      w2_wide.copy_(w2_e);
      w13_e = w13_wide;
      w2_e = w2_wide;
    }
    at::Tensor gate_up_e = gate_up.narrow(0, 0, n);
    at::mm_out(gate_up_e, x.narrow(0, row0, n), w13_e.t());
    const float* gu = gate_up_e.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        work.activate(gated ? gu + t * rows13 : nullptr, gu + t * rows13 + (gated ? I : 0), row0 + t, 0, I);
    });
    at::Tensor out_e = expert_out.narrow(0, row0, n);
    at::mm_out(out_e, activated.narrow(0, row0, n), w2_e.t());
  }
}

template <typename scalar_t>
void combine_into_output(const ExpertGroups& groups, const float* expert_out, const float* topk_weights,
                         const float* w2_bias, const FusedMoeSizes& s, scalar_t* out) {
  const int64_t H = s.hidden_size, k = s.top_k;
  at::parallel_for(0, s.num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(H);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = groups.row_of_pair[t * k + j];
        if (row < 0) continue;
        const float w = topk_weights[t * k + j];
        const float* y = expert_out + row * H;
        if (w2_bias != nullptr) {
          // the bias joins the expert's output before the routing weight scales it
          const float* b = w2_bias + groups.global_of_row[row] * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += w * (y[h] + b[h]);
        } else {
          for (int64_t h = 0; h < H; ++h) acc[h] += w * y[h];
        }
      }
      for (int64_t h = 0; h < H; ++h) out[t * H + h] = static_cast<scalar_t>(acc[h]);
    }
  });
}

}  // namespace

at::Tensor fused_moe_cpu(const at::Tensor& hidden_states_in, const at::Tensor& w13_in, const at::Tensor& w2_in,
                         const at::Tensor& topk_weights_in, const at::Tensor& topk_ids_in,
                         const std::optional<at::Tensor>& expert_map_in, c10::string_view activation,
                         const std::optional<at::Tensor>& w13_bias_in, const std::optional<at::Tensor>& w2_bias_in,
                         bool gated, double swiglu_alpha, double swiglu_limit) {
  const FusedMoeSizes s = check_fused_moe_args(hidden_states_in, w13_in, w2_in, topk_weights_in, topk_ids_in,
                                               expert_map_in, activation, w13_bias_in, w2_bias_in, gated, swiglu_alpha,
                                               swiglu_limit);
  TORCH_CHECK(hidden_states_in.device().is_cpu(), "fused_moe_cpu: hidden_states must be on the CPU, got ",
              hidden_states_in.device());
  at::Tensor out = at::empty({s.num_tokens, s.hidden_size}, hidden_states_in.options());
  if (s.num_tokens == 0 || s.hidden_size == 0) return out;

  const at::Tensor hidden_states = hidden_states_in.contiguous();
  const at::Tensor w13 = w13_in.contiguous();
  const at::Tensor w2 = w2_in.contiguous();
  const at::Tensor topk_weights = topk_weights_in.contiguous();
  const at::Tensor topk_ids = topk_ids_in.contiguous();
  at::Tensor expert_map;
  if (expert_map_in.has_value()) expert_map = expert_map_in->contiguous();
  const bool mapped = expert_map.defined();
  const int32_t* map_ptr = mapped ? expert_map.data_ptr<int32_t>() : nullptr;

  const ExpertGroups groups = topk_ids.scalar_type() == at::kInt
                                  ? group_pairs_by_expert(topk_ids.data_ptr<int32_t>(), mapped, map_ptr, s)
                                  : group_pairs_by_expert(topk_ids.data_ptr<int64_t>(), mapped, map_ptr, s);
  const int64_t num_rows = groups.row_begin.back();
  const int64_t H = s.hidden_size, I = s.intermediate_size;

  // Gather each sorted row's token as float32.
  const at::TensorOptions f32 = hidden_states.options().dtype(at::kFloat);
  const at::Tensor hidden_f32 = hidden_states.scalar_type() == at::kFloat ? hidden_states : hidden_states.to(at::kFloat);
  at::Tensor x = at::empty({num_rows, H}, f32);
  {
    const float* src = hidden_f32.data_ptr<float>();
    float* dst = x.data_ptr<float>();
    at::parallel_for(0, num_rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        std::memcpy(dst + r * H, src + groups.token_of_row[r] * H, H * sizeof(float));
    });
  }
  // The biases are tiny ([E_global, 2I] and [E_global, H]): widened to float32 whole.
  const at::Tensor w13_bias = s.has_w13_bias ? w13_bias_in->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor w2_bias = s.has_w2_bias ? w2_bias_in->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor activated = at::empty({num_rows, I}, f32);
  at::Tensor expert_out = at::empty({num_rows, H}, f32);

  const WeightType w_type = weight_type(hidden_states.scalar_type());
  const ExpertWork work{s,
                        w_type,
                        static_cast<int64_t>(w13.element_size()),
                        static_cast<const char*>(w13.data_ptr()),
                        static_cast<const char*>(w2.data_ptr()),
                        x.data_ptr<float>(),
                        activated.data_ptr<float>(),
                        expert_out.data_ptr<float>(),
                        groups.row_begin,
                        groups.global_of_row,
                        s.has_w13_bias ? w13_bias.data_ptr<float>() : nullptr,
                        cpu::ActParams{static_cast<int>(s.activation), s.swiglu_alpha, s.swiglu_limit}};
  std::vector<int64_t> small_experts, large_experts;
  for (int64_t e = 0; e < s.num_experts; ++e) {
    const int64_t n = groups.row_begin[e + 1] - groups.row_begin[e];
    if (n == 0) continue;
    (n <= small_batch_limit(w_type) ? small_experts : large_experts).push_back(e);
  }
  run_small_experts(work, small_experts);
  run_large_experts(work, large_experts, w13, w2, x, activated, expert_out);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fused_moe_cpu_combine", [&] {
    combine_into_output<scalar_t>(groups, expert_out.data_ptr<float>(), topk_weights.data_ptr<float>(),
                                  s.has_w2_bias ? w2_bias.data_ptr<float>() : nullptr, s, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace moe_swap
