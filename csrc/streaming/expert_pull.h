// expert_cache_pull: the device-side path of policy on_demand. One op reads topk_ids where they
// are, decides hits and LRU victims in a layer's region of the expert pool, and pulls the missing
// experts' weights from host memory into their slots -- on CUDA from mapped pinned memory read by
// the kernel itself (zero-copy), so the host never waits for the routed ids and the step can live in
// a CUDA graph. The state (which expert each slot holds, its last use, the clock) lives in tensors
// on the device. The CPU kernel runs the same algorithm, serially, and is its test oracle's subject.
//
// The algorithm, per call (one step of one layer):
//   now = ++clock; mark the routed experts;
//   hits: every slot holding a routed expert is stamped `now` and mapped;
//   misses, in expert order: the unstamped-this-step slot with the oldest stamp (empty first) takes
//     the expert, is stamped and mapped, and the expert's weights are copied into it;
//   expert_map[e] = pool slot of e (slot_base + region slot), -1 for experts not routed.
// The region must hold min(E, number of ids) slots, so a step always fits (checked from shapes).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace moe_swap::streaming {

// Shape/dtype/device contract of expert_cache_pull (shared by both kernels); returns E.
int64_t check_expert_cache_pull(const at::Tensor& topk_ids, const at::Tensor& host_w13, const at::Tensor& host_w2,
                                const at::Tensor& pool_w13, const at::Tensor& pool_w2, int64_t slot_base,
                                const at::Tensor& slot_expert, const at::Tensor& slot_stamp, const at::Tensor& clock,
                                const at::Tensor& expert_map, const at::Tensor& counters);

// The most experts a layer may have on the device path (per-expert flags live in shared memory).
constexpr int64_t kMaxPullExperts = 8192;

}  // namespace moe_swap::streaming
