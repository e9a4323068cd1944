// Sorting token-expert pairs by expert on the device: count, exclusive scan, scatter.
//
// A pair p = t * k + j is (token t, its j-th choice). Its local expert is topk_ids[p], mapped through
// expert_map when one is given. Invalid pairs (an id outside [0, num_ids), or a map entry outside
// [-1, E)) are dropped like unmapped ones (-1), never read out of bounds, and the smallest such p is
// recorded in `bad_pair` (as num_pairs - p, 0 = none) for the debug check on the host.
// Every size is the worst case (num_pairs), so nothing here needs the host to wait for the device.
#pragma once

#include <cstdint>

namespace moe_swap::moe_cuda {

// Device pointers into the op's int32 scratch buffer.
struct MoeRouting {
  int* expert_counts;   // [E], zeroed before counting
  int* bad_pair;        // [1], zeroed with expert_counts
  int* expert_offsets;  // [E + 1]: rows of expert e in sorted order are [offsets[e], offsets[e+1])
  int* expert_cursor;   // [E]: scatter cursors
  int* tile_offsets;    // [E + 1]: first grouped-GEMM row tile of each expert
  int* active_experts;  // [E]: experts with at least one pair, then -1
  int* pair_expert;     // [num_pairs]: local expert of each pair, or -1
  int* sorted_pairs;    // [num_pairs]: pair index at each sorted row
  int* pair_row;        // [num_pairs]: sorted row of each pair, or -1 when dropped

  // Ints needed for E experts and num_pairs pairs.
  static int64_t scratch_ints(int64_t num_experts, int64_t num_pairs) {
    return (num_experts + 1) + (num_experts + 1) + num_experts + (num_experts + 1) + num_experts + 3 * num_pairs;
  }
  static MoeRouting carve(int* base, int64_t num_experts, int64_t num_pairs) {
    MoeRouting r;
    r.expert_counts = base;
    r.bad_pair = r.expert_counts + num_experts;
    r.expert_offsets = r.bad_pair + 1;
    r.expert_cursor = r.expert_offsets + num_experts + 1;
    r.tile_offsets = r.expert_cursor + num_experts;
    r.active_experts = r.tile_offsets + num_experts + 1;
    r.pair_expert = r.active_experts + num_experts;
    r.sorted_pairs = r.pair_expert + num_pairs;
    r.pair_row = r.sorted_pairs + num_pairs;
    return r;
  }
};

constexpr int kSortThreads = 256;

template <typename IdT>
__global__ void moe_count_pairs_kernel(const IdT* __restrict__ topk_ids, const int* __restrict__ expert_map,
                                       int64_t num_ids, int num_experts, int num_pairs, MoeRouting r) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= num_pairs) return;
  const int64_t id = static_cast<int64_t>(topk_ids[p]);
  int expert = -1;
  bool invalid = id < 0 || id >= num_ids;
  if (!invalid) {
    const int mapped = expert_map != nullptr ? expert_map[id] : static_cast<int>(id);
    invalid = mapped < -1 || mapped >= num_experts;
    if (!invalid) expert = mapped;
  }
  if (invalid) atomicMax(r.bad_pair, num_pairs - p);
  r.pair_expert[p] = expert;
  if (expert >= 0) atomicAdd(&r.expert_counts[expert], 1);
}

struct ScanTriple {
  int rows, tiles, active;
};

__device__ __forceinline__ ScanTriple warp_inclusive_scan(ScanTriple v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int rows = __shfl_up_sync(0xffffffffu, v.rows, offset);
    const int tiles = __shfl_up_sync(0xffffffffu, v.tiles, offset);
    const int active = __shfl_up_sync(0xffffffffu, v.active, offset);
    if (lane >= offset) {
      v.rows += rows;
      v.tiles += tiles;
      v.active += active;
    }
  }
  return v;
}

// One block: exclusive scans of the per-expert row counts, row-tile counts and "has rows" flags,
// E in chunks of the block size. Writes offsets, cursors, tile offsets, the active-expert list and,
// when asked, the inclusive row ends (the `offs` of at::_grouped_mm).
// static: a header included by several objects (fused_moe.cu, quant/fused_moe_quant.cu)
static __global__ void __launch_bounds__(kSortThreads)
    moe_scan_experts_kernel(int num_experts, int tile_rows, MoeRouting r, int* __restrict__ expert_ends) {
  __shared__ ScanTriple warp_totals[kSortThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  constexpr int kWarps = kSortThreads / 32;
  ScanTriple carry{0, 0, 0};
  for (int base = 0; base < num_experts; base += kSortThreads) {
    const int e = base + static_cast<int>(threadIdx.x);
    const int count = e < num_experts ? r.expert_counts[e] : 0;
    const ScanTriple mine{count, (count + tile_rows - 1) / tile_rows, count > 0 ? 1 : 0};
    const ScanTriple inclusive = warp_inclusive_scan(mine);
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      ScanTriple w = lane < kWarps ? warp_totals[lane] : ScanTriple{0, 0, 0};
      w = warp_inclusive_scan(w);
      if (lane < kWarps) warp_totals[lane] = w;
    }
    __syncthreads();
    const ScanTriple before = warp > 0 ? warp_totals[warp - 1] : ScanTriple{0, 0, 0};
    const ScanTriple chunk_total = warp_totals[kWarps - 1];
    if (e < num_experts) {
      const int row = carry.rows + before.rows + inclusive.rows - mine.rows;
      r.expert_offsets[e] = row;
      r.expert_cursor[e] = row;
      r.tile_offsets[e] = carry.tiles + before.tiles + inclusive.tiles - mine.tiles;
      if (mine.active) r.active_experts[carry.active + before.active + inclusive.active - mine.active] = e;
      if (expert_ends != nullptr) expert_ends[e] = row + count;
    }
    carry.rows += chunk_total.rows;
    carry.tiles += chunk_total.tiles;
    carry.active += chunk_total.active;
    __syncthreads();  // warp_totals is reused by the next chunk
  }
  if (threadIdx.x == 0) {
    r.expert_offsets[num_experts] = carry.rows;
    r.tile_offsets[num_experts] = carry.tiles;
  }
  for (int s = carry.active + static_cast<int>(threadIdx.x); s < num_experts; s += kSortThreads) {
    r.active_experts[s] = -1;
  }
}

// Rows inside one expert come in arrival order; every kernel computes each row independently of the
// others, so the values do not depend on that order.
static __global__ void moe_scatter_pairs_kernel(int num_pairs, MoeRouting r) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= num_pairs) return;
  const int expert = r.pair_expert[p];
  if (expert < 0) {
    r.pair_row[p] = -1;
    return;
  }
  const int row = atomicAdd(&r.expert_cursor[expert], 1);
  r.sorted_pairs[row] = p;
  r.pair_row[p] = row;
}

}  // namespace moe_swap::moe_cuda
