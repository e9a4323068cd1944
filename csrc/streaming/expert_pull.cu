// expert_cache_pull on CUDA (see expert_pull.h for the algorithm): the routed ids never leave the
// device. Two launches on the current stream, nothing waits on the host, no allocation depends on
// data, so a decode step with it can be captured in a CUDA graph:
//   1. plan (one block): mark routed experts in shared memory, stamp hits (threads over slots, one
//      claim per expert),
//      then one thread picks LRU victims for the misses (a step misses at most min(E, T*k)
//      experts; the serial pick is O(misses * C), small at decode) and writes the copy list;
//   2. pull (grid: blocks x list entries): each block copies its share of one listed expert from
//      the mapped pinned host view (zero-copy reads over PCIe by the SMs) into its pool slot, in
//      16-byte words when every address allows it. The list has at most min(C, E, ids) entries (a
//      step copies only distinct routed experts), known from shapes; entries past the list's length
//      exit at once. Zero-copy reads need many requests in flight to fill the link, so a short list
//      (decode: a few experts) gets more blocks per entry: about 4 blocks per SM over the whole list.
//
// NOTE: compiled for sm_90 but never run on a GPU. Out-of-range ids are skipped (never read out
// of bounds); with set_debug(True) the op then raises, naming the first one (the plan kernel records
// its position; the host reads it after the step, whose valid ids were pulled as usual).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "core/checks.h"
#include "ops.h"
#include "streaming/expert_pull.h"

namespace moe_swap {
namespace {

constexpr int kPlanThreads = 256;
constexpr int kPullThreads = 256;
constexpr int kMinPullBlocksPerExpert = 16;
constexpr int kMaxPullBlocksPerExpert = 1024;
// The plan kernel's static shared memory (now, hits, first_bad) next to its dynamic flags.
constexpr size_t kPlanStaticShared = 64;

template <typename Id>
__global__ void plan_pull_kernel(const Id* __restrict__ ids, int64_t num_ids, int num_experts, int num_slots,
                                 int64_t slot_base, int32_t* __restrict__ slot_expert, int64_t* __restrict__ slot_stamp,
                                 int64_t* __restrict__ clock, int32_t* __restrict__ expert_map,
                                 int64_t* __restrict__ counters, int32_t* __restrict__ copy_list,
                                 int32_t* __restrict__ copy_count, int64_t* __restrict__ first_bad) {
  extern __shared__ int shared[];
  int* needed = shared;                                                      // [E]: 0 not routed, 1 routed, 2 hit
  unsigned char* used = reinterpret_cast<unsigned char*>(shared + num_experts);  // [C]: slot taken by this step
  __shared__ int64_t now;
  __shared__ unsigned long long hits;
  __shared__ unsigned long long bad;  // the first flat position of an out-of-range id (debug)
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    needed[e] = 0;
    expert_map[e] = -1;
  }
  for (int s = threadIdx.x; s < num_slots; s += blockDim.x) used[s] = 0;
  if (threadIdx.x == 0) {
    now = *clock + 1;
    *clock = now;
    hits = 0;
    bad = ~0ull;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < num_ids; i += blockDim.x) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    if (e >= 0 && e < num_experts) {
      needed[e] = 1;  // benign race: every writer writes 1
    } else if (first_bad != nullptr) {
      atomicMin(&bad, static_cast<unsigned long long>(i));  // skipped; debug reports it after the step
    }
  }
  __syncthreads();
  for (int s = threadIdx.x; s < num_slots; s += blockDim.x) {
    const int32_t e = slot_expert[s];
    // One slot per expert claims the hit, even where the slot state names an expert twice (a caller's
    // corrupted state): the other slot stays free for a miss, as on the CPU.
    if (e >= 0 && e < num_experts && atomicCAS(&needed[e], 1, 2) == 1) {
      used[s] = 1;
      slot_stamp[s] = now;
      expert_map[e] = static_cast<int32_t>(slot_base + s);
      atomicAdd(&hits, 1ull);
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  int32_t copies = 0;
  for (int e = 0; e < num_experts; ++e) {
    if (needed[e] != 1) continue;
    int victim = -1;
    for (int s = 0; s < num_slots; ++s) {
      if (used[s]) continue;
      if (victim < 0 || (slot_expert[s] < 0 && slot_expert[victim] >= 0) ||
          ((slot_expert[s] < 0) == (slot_expert[victim] < 0) && slot_stamp[s] < slot_stamp[victim])) {
        victim = s;
      }
    }
    if (victim < 0) break;  // cannot happen: the host checked the region holds min(E, num_ids) slots
    used[victim] = 1;
    slot_expert[victim] = e;
    slot_stamp[victim] = now;
    expert_map[e] = static_cast<int32_t>(slot_base + victim);
    copy_list[2 * copies] = victim;
    copy_list[2 * copies + 1] = e;
    ++copies;
  }
  *copy_count = copies;
  counters[0] += static_cast<int64_t>(hits);
  counters[1] += copies;
  if (first_bad != nullptr) *first_bad = bad == ~0ull ? -1 : static_cast<int64_t>(bad);
}

// Copy `bytes` from src to dst with the block's threads, blocks [part, part + parts) of the job.
__device__ void copy_share(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst, size_t bytes,
                           int part, int parts) {
  const bool words = (reinterpret_cast<uintptr_t>(src) % 16 == 0) && (reinterpret_cast<uintptr_t>(dst) % 16 == 0) &&
                     (bytes % 16 == 0);
  if (words) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    const size_t n = bytes / 16;
    for (size_t i = static_cast<size_t>(part) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<size_t>(parts) * blockDim.x) {
      d[i] = s[i];
    }
  } else {
    for (size_t i = static_cast<size_t>(part) * blockDim.x + threadIdx.x; i < bytes;
         i += static_cast<size_t>(parts) * blockDim.x) {
      dst[i] = src[i];
    }
  }
}

__global__ void pull_experts_kernel(const unsigned char* __restrict__ host_w13, const unsigned char* __restrict__ host_w2,
                                    unsigned char* __restrict__ pool_w13, unsigned char* __restrict__ pool_w2,
                                    size_t w13_bytes, size_t w2_bytes, int64_t slot_base,
                                    const int32_t* __restrict__ copy_list, const int32_t* __restrict__ copy_count) {
  const int entry = blockIdx.y;
  if (entry >= *copy_count) return;
  const int64_t slot = slot_base + copy_list[2 * entry];
  const int64_t expert = copy_list[2 * entry + 1];
  copy_share(host_w13 + expert * w13_bytes, pool_w13 + slot * w13_bytes, w13_bytes, blockIdx.x, gridDim.x);
  copy_share(host_w2 + expert * w2_bytes, pool_w2 + slot * w2_bytes, w2_bytes, blockIdx.x, gridDim.x);
}

}  // namespace

void expert_cache_pull_cuda(const at::Tensor& topk_ids, const at::Tensor& host_w13, const at::Tensor& host_w2,
                            const at::Tensor& pool_w13, const at::Tensor& pool_w2, int64_t slot_base,
                            const at::Tensor& slot_expert, const at::Tensor& slot_stamp, const at::Tensor& clock,
                            const at::Tensor& expert_map, const at::Tensor& counters) {
  const int64_t E = streaming::check_expert_cache_pull(topk_ids, host_w13, host_w2, pool_w13, pool_w2, slot_base,
                                                       slot_expert, slot_stamp, clock, expert_map, counters);
  const int64_t C = slot_expert.size(0);
  TORCH_CHECK(C <= 65535, "expert_cache_pull (CUDA): the region may hold at most 65535 slots, got ", C);
  c10::cuda::OptionalCUDAGuard guard(pool_w13.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor ids = topk_ids.contiguous();
  // [2*C] (slot, expert) pairs + 1 count: fixed size, so the allocation does not depend on the data
  at::Tensor scratch = at::empty({2 * C + 1}, pool_w13.options().dtype(at::kInt));
  int32_t* copy_list = scratch.data_ptr<int32_t>();
  int32_t* copy_count = copy_list + 2 * C;
  const size_t shared_bytes = static_cast<size_t>(4 * E + C);  // int flags per expert, byte flags per slot
  TORCH_CHECK(shared_bytes + kPlanStaticShared <= 48 * 1024, "expert_cache_pull (CUDA): 4 E + C = ", shared_bytes,
              " (E = ", E, ", C = ", C, ") exceeds the ", 48 * 1024 - kPlanStaticShared, " bytes of shared flags");
  // Debug (not while capturing a graph: reading the result back is a sync): the plan kernel records
  // the first out-of-range id's position, raised after the step.
  const bool debug = debug_sync_now();
  const at::Tensor first_bad = debug ? at::empty({1}, pool_w13.options().dtype(at::kLong)) : at::Tensor();
  int64_t* first_bad_ptr = debug ? first_bad.data_ptr<int64_t>() : nullptr;
  if (ids.scalar_type() == at::kInt) {
    plan_pull_kernel<int32_t><<<1, kPlanThreads, shared_bytes, stream>>>(
        ids.data_ptr<int32_t>(), ids.numel(), static_cast<int>(E), static_cast<int>(C), slot_base,
        slot_expert.data_ptr<int32_t>(), slot_stamp.data_ptr<int64_t>(), clock.data_ptr<int64_t>(),
        expert_map.data_ptr<int32_t>(), counters.data_ptr<int64_t>(), copy_list, copy_count, first_bad_ptr);
  } else {
    plan_pull_kernel<int64_t><<<1, kPlanThreads, shared_bytes, stream>>>(
        ids.data_ptr<int64_t>(), ids.numel(), static_cast<int>(E), static_cast<int>(C), slot_base,
        slot_expert.data_ptr<int32_t>(), slot_stamp.data_ptr<int64_t>(), clock.data_ptr<int64_t>(),
        expert_map.data_ptr<int32_t>(), counters.data_ptr<int64_t>(), copy_list, copy_count, first_bad_ptr);
  }
  MOE_SWAP_LAUNCH_CHECK();
  // A step copies distinct routed experts into distinct slots: at most min(C, E, ids) list entries.
  const int64_t max_copies = std::min<int64_t>({C, E, ids.numel()});
  if (max_copies > 0) {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t per_expert = std::clamp<int64_t>((4 * sms + max_copies - 1) / max_copies, kMinPullBlocksPerExpert,
                                                   kMaxPullBlocksPerExpert);
    const dim3 grid(static_cast<unsigned>(per_expert), static_cast<unsigned>(max_copies));
    pull_experts_kernel<<<grid, kPullThreads, 0, stream>>>(
        static_cast<const unsigned char*>(host_w13.data_ptr()), static_cast<const unsigned char*>(host_w2.data_ptr()),
        static_cast<unsigned char*>(pool_w13.data_ptr()), static_cast<unsigned char*>(pool_w2.data_ptr()),
        static_cast<size_t>(host_w13[0].nbytes()), static_cast<size_t>(host_w2[0].nbytes()), slot_base, copy_list,
        copy_count);
    MOE_SWAP_LAUNCH_CHECK();
  }
  if (debug) {
    const int64_t position = first_bad.item<int64_t>();
    if (position >= 0) {
      const int64_t id = ids.reshape({-1})[position].item<int64_t>();
      TORCH_CHECK(false, "topk_ids must be expert ids in [0, ", E, "), got ", id, " at flat position ", position,
                  " (on CUDA such ids are skipped unless debug mode is on)");
    }
  }
}

}  // namespace moe_swap
