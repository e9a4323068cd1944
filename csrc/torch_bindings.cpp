// The torch library `moe_swap`: every schema of the project, and which kernel serves which backend.
// The schema strings are the API; Python wrappers and fake kernels live in moe_swap/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "core/checks.h"
#include "ops.h"
#include "streaming/streamer.h"

TORCH_LIBRARY(moe_swap, m) {
  // Route tokens to experts: softmax/sigmoid scores, optional group limit and selection bias,
  // top-k, optional renormalisation and scaling. Returns (topk_weights f32 [T,k], topk_ids i32 [T,k]).
  m.def(
      "topk_route(Tensor router_logits, int top_k, str scoring=\"softmax\", bool renormalize=False, "
      "int num_expert_group=1, int topk_group=1, Tensor? correction_bias=None, "
      "float routed_scaling_factor=1.0) -> (Tensor topk_weights, Tensor topk_ids)");
  // The MoE layer: out[t] = sum_j w[t,j] * (w2[e] @ h + b2[g]), g = topk_ids[t,j] (global id),
  // e = expert_map[g] when a map is given (-1: not held here, contributes nothing), else e = g;
  // gated: h = act(w13[e,:I] @ x_t + b13[g,:I]) * (w13[e,I:] @ x_t + b13[g,I:]) with w13 [E, 2I, H];
  // gated=False: h = act(w13[e] @ x_t + b13[g]) with w13 [E, I, H]. Activations: silu, gelu,
  // gelu_tanh, relu2, swiglu_clamp (gpt-oss: gated only, uses swiglu_alpha/limit), silu_clamp
  // (DeepSeek-V4: gated only, silu(min(gate, limit)) * clamp(up, -limit, limit)). The biases
  // w13_bias [E_global, 2I or I] and w2_bias [E_global, H] are indexed by the global id g, so a
  // cache holding only some experts' weights keeps every expert's biases whole and resident.
  m.def(
      "fused_moe(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
      "Tensor? expert_map=None, str activation=\"silu\", Tensor? w13_bias=None, Tensor? w2_bias=None, "
      "bool gated=True, float swiglu_alpha=1.702, float swiglu_limit=7.0) -> Tensor");
  // fused_moe on quantized experts, computed from their bytes (layouts: moe_swap/quant.py). One op for
  // every format: the format is data of the layer (the streamer and cache hand bytes over whatever they
  // hold), and the options are fused_moe's. format: "fp8_block" (w float8_e4m3fn [E, R, K], scale f32 per
  // 128x128 block, a gated w13's halves blocked separately), "mxfp4" (w u8 [E, R, ceil(K/32)*16], scale
  // e8m0 u8 [E, R, ceil(K/32)]), "int4" (w u8 [E, R, ceil(K/2)], scale f32/f16/bf16 [E, R, ceil(K/g)],
  // optional zero u8 of that shape, else 8; group_size g in 32/64/128), "int8" (w int8 [E, R, K], scale
  // f32 [E, R]). R, K: 2I (I ungated), H for w13; H, I for w2.
  m.def(
      "fused_moe_quant(Tensor hidden_states, Tensor w13, Tensor w13_scale, Tensor w2, Tensor w2_scale, "
      "Tensor topk_weights, Tensor topk_ids, str format, int group_size=0, Tensor? w13_zero=None, "
      "Tensor? w2_zero=None, Tensor? expert_map=None, str activation=\"silu\", Tensor? w13_bias=None, "
      "Tensor? w2_bias=None, bool gated=True, float swiglu_alpha=1.702, float swiglu_limit=7.0) -> Tensor");
  // Device-side on_demand step (no host sync; capturable on CUDA): read topk_ids, stamp hits and
  // pick LRU victims in the layer's pool region [slot_base, +C) (state: slot_expert int32 [C],
  // slot_stamp int64 [C], clock int64 [1]), pull missing experts from host_w13/host_w2 (CUDA: a
  // mapped pinned view) into the pool, write expert_map int32 [E]; counters int64 [2] += (hits, misses).
  m.def(
      "expert_cache_pull(Tensor topk_ids, Tensor host_w13, Tensor host_w2, Tensor(a!) pool_w13, Tensor(b!) pool_w2, "
      "int slot_base, Tensor(c!) slot_expert, Tensor(d!) slot_stamp, Tensor(e!) clock, Tensor(f!) expert_map, "
      "Tensor(g!) counters) -> ()");
  // Debug switch: synchronise and check after every CUDA launch; invalid expert ids become errors.
  m.def("set_debug(bool enabled) -> ()", &moe_swap::set_debug);
  // Whether the debug switch is on.
  m.def("debug_enabled() -> bool", &moe_swap::debug_enabled);
  // The number of distinct threads one parallel region of the CPU kernels ran on (at most
  // torch.get_num_threads(); 1 means the kernels were built without the parallel backend's flags).
  m.def("cpu_parallel_threads() -> int", &moe_swap::cpu_parallel_threads);
  // The fused_moe CPU kernel build in use ("avx512_bf16", "avx512", "avx2" or "generic"; the
  // MOE_SWAP_CPU_KERNELS override, an error if the CPU lacks it), and every build this CPU runs.
  m.def("cpu_kernel_build() -> str", &moe_swap::cpu_kernel_build);
  m.def("cpu_kernel_builds() -> str[]", &moe_swap::cpu_kernel_builds);

  // ---- weight streamer (csrc/streaming; Python face moe_swap.WeightStreamer) ----
  // State lives in C++ streamers named by integer handles (see streaming/streamer.h for why).
  // Create a streamer. policy "full" (the ring): mode "full" (copy engine + N-slot ring + prefetch),
  // "sync" (baseline: vLLM legacy cpu_offload_gb) or "uva" (baseline: kernels read mapped pinned
  // memory). policy "on_demand" (the expert cache): only routed experts move, into an expert cache of
  // cache_bytes (eviction "lru", "lfu" or "flru"); mode must be "full", and slots/prefetch_depth only
  // size the unused ring's checks. policy "auto": as on_demand, with a cost model that
  // copy_overhead_us and copy_gb_per_s set (both or neither; None: measured when the expert cache is
  // first allocated). Test hooks: moe_swap_testing::streamer_set_hooks.
  m.def(
      "streamer_create(str device, int slots=2, int prefetch_depth=1, str mode=\"full\", bool trace=False, "
      "bool timing=True, str policy=\"full\", int cache_bytes=0, str eviction=\"lru\", "
      "float? copy_overhead_us=None, float? copy_gb_per_s=None) -> int");
  // Destroy a streamer: waits for its in-flight copies, then frees its host store and slots.
  m.def("streamer_destroy(int handle) -> ()");
  // Allocate a layer's exact-size host storage (w13 [E,2I,H] or ungated [E,I,H], w2 [E,H,I]); returns its index. Fill with streamer_write.
  m.def("streamer_reserve_layer(int handle, int[] w13_shape, int[] w2_shape, ScalarType dtype) -> int");
  // Copy src ([rows, cols] or [n, rows, cols]) into a layer's w13 (which=0) or w2 (which=1) at experts
  // [expert_start, +n), rows [row_offset, +rows).
  m.def("streamer_write(int handle, int layer, int which, int expert_start, int row_offset, Tensor src) -> ()");
  // Copy a whole layer into the host store; returns its index (the caller may free its tensors after).
  m.def("streamer_add_layer(int handle, Tensor w13, Tensor w2) -> int");
  // A layer's host-store weights as zero-copy tensors on the streamer's device (CUDA: mapped pinned
  // memory read over PCIe), the source of expert_cache_pull; they keep the host memory alive.
  m.def("streamer_host_device_views(int handle, int layer) -> (Tensor w13, Tensor w2)");
  // on_demand/auto: set the expert cache's byte budget (before the first step allocates the cache).
  m.def("streamer_set_cache_bytes(int handle, int cache_bytes) -> ()");
  // The current stream waits for the layer's slot (copying it first if it was never prefetched);
  // returns views [E,2I,H], [E,H,I] valid until release. `after`: tensors this call is ordered after.
  m.def("streamer_acquire(int handle, int layer, Tensor[] after) -> (Tensor w13, Tensor w2)");
  // Start copying a layer into a free slot, if one is free (a hint).
  m.def("streamer_prefetch(int handle, int layer) -> ()");
  // Record the slot's "free" event on the current stream after `after`'s producers; prefetch ahead.
  m.def("streamer_release(int handle, int layer, Tensor[] after) -> ()");
  // Host waits for every in-flight copy (tests and benchmarks; never in the steady state).
  m.def("streamer_synchronize(int handle) -> ()");
  // Statistics: per layer int64 [L, C] (the columns streamer_stats_columns names, defined once in
  // streaming/stats.h) and trace float64 [n, 5] (layer, slot or channel, kind 0 copy / 1 wait /
  // 2 hold, start_us, end_us).
  m.def("streamer_stats(int handle) -> (Tensor per_layer, Tensor trace)");
  // The names of streamer_stats' per-layer columns, in order.
  m.def("streamer_stats_columns() -> str[]");
  // [num_layers, host_bytes, device_bytes, slot_bytes, slots, prefetch_depth, untimed_spans]
  m.def("streamer_info(int handle) -> int[]");
  // on_demand: copy the routed experts not cached (host reads topk_ids: a sync on CUDA); returns the
  // expert cache's pool w13 [N,2I,H], w2 [N,H,I] and expert_map int32 [E] (-1: not routed), valid
  // until streamer_release_experts. next_ids (with next_layer): a guess at that layer's routing,
  // predicted (as streamer_predict) after this step's own copies are issued.
  m.def(
      "streamer_acquire_experts(int handle, int layer, Tensor topk_ids, int next_layer=-1, Tensor? next_ids=None) "
      "-> (Tensor w13, Tensor w2, Tensor expert_map)");
  // on_demand: the step's experts may be evicted once the current stream's work so far is done.
  m.def("streamer_release_experts(int handle, int layer, Tensor[] after) -> ()");
  // One MoE step of any policy, one opaque op (traces with a shape-only fake kernel): on_demand/auto
  // acquire_experts, fused_moe on the pool with the expert_map, release_experts; full acquire,
  // fused_moe on the layer's views, release (next_layer/next_ids: on_demand/auto only). The biases and
  // gated/swiglu options go to fused_moe as they are: indexed by global id, resident, never copied.
  m.def(
      "streamer_moe(int handle, int layer, Tensor hidden_states, Tensor topk_weights, Tensor topk_ids, "
      "str activation=\"silu\", int next_layer=-1, Tensor? next_ids=None, Tensor? w13_bias=None, "
      "Tensor? w2_bias=None, bool gated=True, float swiglu_alpha=1.702, float swiglu_limit=7.0) -> Tensor");
  // on_demand: start copying the experts in expert_ids (the layer's predicted routing) ahead; a hint.
  m.def("streamer_predict(int handle, int layer, Tensor expert_ids) -> ()");
  // on_demand/auto: ([pool slots, capacity slots, occupied slots, bytes per expert, copy overhead ns,
  // copy bytes/s] (the last two: policy auto's cost model, -1 until set or measured), (layer, expert)
  // per pool slot int64 [N, 2], -1 empty). Policy full: no pool ([0, 0, 0, bytes per expert, -1, -1]).
  m.def("streamer_cache_state(int handle) -> (int[], Tensor)");
}

// Test hooks of the weight streamer, apart from the API (moe_swap.testing is their Python face).
TORCH_LIBRARY(moe_swap_testing, m) {
  // From now on: a random delay in [0, copy_delay_us] before each copied chunk (CPU backend only), and
  // the copy with index fail_copy_at (0-based, counting every copy since creation; -1 none) fails.
  m.def("streamer_set_hooks(int handle, int copy_delay_us=0, int fail_copy_at=-1) -> ()");
  // Copies (CPU) of a layer's host-store weights, for checks.
  m.def("streamer_host_copy(int handle, int layer) -> (Tensor w13, Tensor w2)");
  // [live streamers, live host-store bytes, live host-store blocks] in this process (leak checks).
  m.def("streamer_live_counts() -> int[]");
}

TORCH_LIBRARY_IMPL(moe_swap, CPU, m) {
  m.impl("topk_route", &moe_swap::topk_route_cpu);
  m.impl("fused_moe", &moe_swap::fused_moe_cpu);
  m.impl("fused_moe_quant", &moe_swap::fused_moe_quant_cpu);
  m.impl("expert_cache_pull", &moe_swap::expert_cache_pull_cpu);
}

#ifdef MOE_SWAP_WITH_CUDA
TORCH_LIBRARY_IMPL(moe_swap, CUDA, m) {
  m.impl("topk_route", &moe_swap::topk_route_cuda);
  m.impl("fused_moe", &moe_swap::fused_moe_cuda);
  m.impl("fused_moe_quant", &moe_swap::fused_moe_quant_cuda);
  m.impl("expert_cache_pull", &moe_swap::expert_cache_pull_cuda);
}
#endif

// The weight streamer's ops hold no per-backend kernels: the streamer behind the handle picks its
// backend, and the ops take no tensors (or tensors on any device), so one kernel serves every key.
TORCH_LIBRARY_IMPL(moe_swap, CompositeExplicitAutograd, m) {
  namespace st = moe_swap::streaming;
  m.impl("streamer_create", &st::streamer_create);
  m.impl("streamer_destroy", &st::streamer_destroy);
  m.impl("streamer_reserve_layer", &st::streamer_reserve_layer);
  m.impl("streamer_write", &st::streamer_write);
  m.impl("streamer_add_layer", &st::streamer_add_layer);
  m.impl("streamer_host_device_views", &st::streamer_host_device_views);
  m.impl("streamer_set_cache_bytes", &st::streamer_set_cache_bytes);
  m.impl("streamer_acquire", &st::streamer_acquire);
  m.impl("streamer_prefetch", &st::streamer_prefetch);
  m.impl("streamer_release", &st::streamer_release);
  m.impl("streamer_synchronize", &st::streamer_synchronize);
  m.impl("streamer_stats", &st::streamer_stats);
  m.impl("streamer_stats_columns", &st::streamer_stats_columns);
  m.impl("streamer_info", &st::streamer_info);
  m.impl("streamer_acquire_experts", &st::streamer_acquire_experts);
  m.impl("streamer_release_experts", &st::streamer_release_experts);
  m.impl("streamer_moe", &st::streamer_moe);
  m.impl("streamer_predict", &st::streamer_predict);
  m.impl("streamer_cache_state", &st::streamer_cache_state);
}

TORCH_LIBRARY_IMPL(moe_swap_testing, CompositeExplicitAutograd, m) {
  namespace st = moe_swap::streaming;
  m.impl("streamer_set_hooks", &st::testing_set_hooks);
  m.impl("streamer_host_copy", &st::testing_host_copy);
  m.impl("streamer_live_counts", &st::testing_live_counts);
}

// `import moe_swap._C` loads this library, whose static initialisers above register the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "moe_swap native ops (see torch.ops.moe_swap)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
