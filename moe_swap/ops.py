"""Typed Python wrappers of the ``torch.ops.moe_swap`` ops, each with its fake (meta) kernel beside it.

The schemas in ``csrc/torch_bindings.cpp`` are the API; these wrappers add docstrings and defaults,
and the fake kernels let the ops trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["topk_route", "fused_moe", "fused_moe_quant", "expert_cache_pull", "set_debug", "debug_enabled", "cpu_parallel_threads",
           "cpu_kernel_build", "cpu_kernel_builds"]


def topk_route(
    router_logits: Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    num_expert_group: int = 1,
    topk_group: int = 1,
    correction_bias: Optional[Tensor] = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Pick ``top_k`` experts per token.

    Reproduces the routers of Mixtral (softmax, top-2, ``renormalize``), Qwen2-MoE and OLMoE
    (softmax), Qwen3-MoE (softmax, ``renormalize``), DeepSeek-V2 (softmax, optionally
    group-limited, ``routed_scaling_factor``) and DeepSeek-V3 (sigmoid, groups, ``correction_bias``,
    ``renormalize``, ``routed_scaling_factor``).

    Args:
        router_logits: ``[T, E]`` router output, float32, bfloat16 or float16 (scored in float32).
            Non-contiguous logits are accepted (copied contiguous first).
        top_k: experts per token, in ``[1, E]``, and at most ``topk_group * E / num_expert_group``
            (the experts left after the group limit). The CUDA kernel supports ``top_k <= 32``.
        scoring: ``"softmax"`` (Mixtral, Qwen, OLMoE, DeepSeek-V2) or ``"sigmoid"`` (DeepSeek-V3).
        renormalize: divide the chosen weights by ``their sum + 1e-20`` (DeepSeek-V3's epsilon: a
            no-op in float32 for softmax weights, and all-zero sigmoid weights stay 0).
        num_expert_group: split the experts into this many equal, consecutive groups (``>= 1``,
            must divide E).
        topk_group: keep only the best ``topk_group`` groups (in ``[1, num_expert_group]``), then
            pick top-k inside them; experts of the other groups are never chosen. A group scores by
            its best expert's selection score, or, when ``correction_bias`` is given, by the sum of
            its best two (DeepSeek-V3; as in vLLM's ``grouped_topk``). Group ties: lower group first.
        correction_bias: ``[E]`` float32/bfloat16/float16 on the logits' device, added to the scores
            for *selection only*; the returned weights are the unbiased scores.
        routed_scaling_factor: multiplies the final weights (after renormalisation).

    Returns:
        ``(topk_weights, topk_ids)``: float32 ``[T, top_k]`` and int32 ``[T, top_k]``, in order of
        decreasing selection score (ties: lower expert id first). NaN scores rank lowest, below
        -inf, so the ids are always distinct and in ``[0, E)``; the weights follow torch: a NaN or
        +inf logit makes the whole softmax row NaN. ``T = 0`` gives empty ``[0, top_k]`` tensors.
        The weights stay float32 even where a model rounds them to its dtype (Qwen, OLMoE).
    """
    _check_tensors(router_logits=router_logits)
    return torch.ops.moe_swap.topk_route.default(
        router_logits, top_k, scoring, renormalize, num_expert_group, topk_group,
        correction_bias, routed_scaling_factor,
    )


def _check_tensors(**tensors) -> None:
    """Required tensor arguments are tensors (the dispatcher's own message for an op called with no
    tensor at all does not name the argument)."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_same_device(op: str, anchor: str, tensors: dict) -> None:
    """Fake kernels: every tensor in ``tensors`` (name -> tensor or None) on the device of ``tensors[anchor]``.

    The fake kernel also serves real calls in which some tensor is on the meta device (the dispatcher
    picks the Meta kernel whenever any input is meta); without this check such a call would return an
    uninitialised tensor, or skip the op's effect, instead of raising as the real kernel does."""
    device = tensors[anchor].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise RuntimeError(f"{op}: {name} must be on the device of {anchor} ({device}), got {t.device}")


@torch.library.register_fake("moe_swap::topk_route")
def _topk_route_fake(router_logits, top_k, scoring="softmax", renormalize=False, num_expert_group=1,
                     topk_group=1, correction_bias=None, routed_scaling_factor=1.0):
    torch._check(router_logits.dim() == 2, lambda: f"router_logits must be a 2-D tensor, got {router_logits.dim()}-D")
    num_experts = router_logits.shape[1]
    torch._check(1 <= top_k <= num_experts,
                 lambda: f"top_k must be in [1, E] with E = router_logits.size(1) = {num_experts}, got {top_k}")
    if correction_bias is not None:
        torch._check(correction_bias.device == router_logits.device,
                     lambda: f"correction_bias must be on the same device as router_logits "
                             f"({router_logits.device}), got {correction_bias.device}")
    t = router_logits.shape[0]
    return (router_logits.new_empty((t, top_k), dtype=torch.float32),
            router_logits.new_empty((t, top_k), dtype=torch.int32))


FUSED_MOE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu2", "swiglu_clamp", "silu_clamp")


def fused_moe(
    hidden_states: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    expert_map: Optional[Tensor] = None,
    activation: str = "silu",
    w13_bias: Optional[Tensor] = None,
    w2_bias: Optional[Tensor] = None,
    gated: bool = True,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> Tensor:
    """The experts of a MoE layer, fused: ``out[t] = Σ_j w[t,j] · (w2[e] · h_e(x_t) + b2[g])``.

    ``g = topk_ids[t, j]`` is the global expert id and ``e = expert_map[g]`` (or ``g`` without a map)
    its index into ``w13``/``w2``. Gated: ``h = act(gate_e x + b13[g, :I]) ⊙ (up_e x + b13[g, I:])``;
    ungated (``gated=False``, e.g. nemotron_h's relu2 experts): ``h = act(up_e x + b13[g])``.

    Args:
        hidden_states: ``[T, H]``, float32, bfloat16 or float16 (the dtype of the output).
        w13: ``[E, 2I, H]`` per expert, gate rows then up rows (vLLM's layout), same dtype; with
            ``gated=False``, ``[E, I, H]`` up rows only.
        w2: ``[E, H, I]`` down projections, same dtype.
        topk_weights: ``[T, k]`` float32 routing weights.
        topk_ids: ``[T, k]`` int32 (or int64) expert ids: indices into ``w13``/``w2``, or global ids
            when ``expert_map`` is given.
        expert_map: optional int32 ``[E_global]``: global id -> index into ``w13``/``w2``, or -1 when
            the expert is not held here (that pair contributes nothing).
        activation: ``"silu"``, ``"gelu"`` (erf), ``"gelu_tanh"``, ``"relu2"`` (``relu(x)²``) or
            ``"swiglu_clamp"`` (gpt-oss, gated only): ``g = min(gate, limit)``,
            ``u = clamp(up, -limit, limit)``, ``h = (u + 1) · g · sigmoid(alpha · g)``; or
            ``"silu_clamp"`` (DeepSeek-V4, HY-V4, gated only): the same clamps, ``h = silu(g) · u``.
        w13_bias: optional ``[E_global, 2I]`` (gated: gate part then up part) or ``[E_global, I]``.
        w2_bias: optional ``[E_global, H]``, added to each expert's down projection before the
            routing weight multiplies it.
            Both biases have the weights' dtype and are indexed by the **global** expert id
            (``topk_ids``, before ``expert_map``), ``E_global = expert_map.numel()`` with a map, else
            ``E``: they are tiny, so a cache that holds only some experts' weights keeps every
            expert's biases whole and resident (the bytes streamed per expert do not grow).
        gated: whether ``w13`` holds gate rows (see ``w13``).
        swiglu_alpha, swiglu_limit: the parameters of ``"swiglu_clamp"`` (``"silu_clamp"`` uses the limit) (finite; ``limit > 0``;
            checked whatever the activation).

    Inputs may be non-contiguous (they are made contiguous). Rounding, for every activation: the
    projections accumulate in float32, the biases are added to those float32 sums, the activation
    (and the clamps of ``swiglu_clamp``) runs in float32, and the activated intermediate is rounded
    to the input dtype once, before the down projection; the w2 bias joins the float32 down sum and
    the output is rounded once at the end. Eager transformers in bf16 (gpt-oss, nemotron_h) rounds
    after every op instead (projection, bias sum, sigmoid, each product); in float32 the two agree
    to float32 accuracy, in bf16 to about one bf16 ulp of the output (tests/test_hf_parity.py). An id out of range raises on CPU; on
    CUDA such a pair is skipped (never read out of bounds), and with ``set_debug(True)`` it raises
    instead.
    """
    _check_tensors(hidden_states=hidden_states, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    return torch.ops.moe_swap.fused_moe.default(
        hidden_states, w13, w2, topk_weights, topk_ids, expert_map, activation, w13_bias, w2_bias, gated,
        swiglu_alpha, swiglu_limit,
    )


def check_fused_moe_layout(w13, w2, expert_map, activation, w13_bias, w2_bias, gated, swiglu_alpha,
                           swiglu_limit, hidden_size) -> None:
    """The checks of fused_moe's activation, gating, bias and swiglu arguments, with the kernels'
    messages (moe_checks.h): the fake kernel runs them, so a traced or meta call raises as a real one."""
    if activation not in FUSED_MOE_ACTIVATIONS:
        raise ValueError("activation must be 'silu', 'gelu', 'gelu_tanh', 'relu2', 'swiglu_clamp' or 'silu_clamp', "
                         f"got '{activation}'")
    if not gated and activation in ("swiglu_clamp", "silu_clamp"):
        raise ValueError(f"activation '{activation}' needs gate rows: it requires gated=True, got gated=False")
    if not math.isfinite(swiglu_alpha):
        raise ValueError(f"swiglu_alpha must be finite, got {swiglu_alpha}")
    if not (math.isfinite(swiglu_limit) and swiglu_limit > 0):
        raise ValueError(f"swiglu_limit must be finite and > 0, got {swiglu_limit}")
    torch._check(w13.dim() == 3, lambda: f"w13 must be 3-D, got {w13.dim()}-D with shape {tuple(w13.shape)}")
    rows = w13.shape[1]
    if gated:
        torch._check(rows % 2 == 0, lambda: f"w13.size(1) must be even (2I: gate rows then up rows, gated=True), "
                                            f"got {rows} (w13 shape {tuple(w13.shape)})")
    inter = rows // 2 if gated else rows
    torch._check(w2.dim() == 3 and w2.shape[2] == inter,
                 lambda: f"w2.size(2) must equal I = {inter} (gated={gated}), got w2 shape {tuple(w2.shape)}")
    num_global = expert_map.shape[0] if expert_map is not None else w13.shape[0]
    for name, bias, cols in (("w13_bias", w13_bias, rows), ("w2_bias", w2_bias, hidden_size)):
        if bias is None:
            continue
        torch._check(bias.dim() == 2 and bias.shape[0] == num_global and bias.shape[1] == cols,
                     lambda: f"{name} must have shape [{num_global}, {cols}] ([E_global, ...]), got {tuple(bias.shape)}")
        torch._check(bias.dtype == w13.dtype,
                     lambda: f"{name} must have the dtype of hidden_states ({w13.dtype}), got {bias.dtype}")


@torch.library.register_fake("moe_swap::fused_moe")
def _fused_moe_fake(hidden_states, w13, w2, topk_weights, topk_ids, expert_map=None, activation="silu",
                    w13_bias=None, w2_bias=None, gated=True, swiglu_alpha=1.702, swiglu_limit=7.0):
    torch._check(hidden_states.dim() == 2, lambda: f"hidden_states must be 2-D, got {hidden_states.dim()}-D")
    check_same_device("fused_moe", "hidden_states", dict(hidden_states=hidden_states, w13=w13, w2=w2,
                                                         topk_weights=topk_weights, topk_ids=topk_ids,
                                                         expert_map=expert_map, w13_bias=w13_bias, w2_bias=w2_bias))
    check_fused_moe_layout(w13, w2, expert_map, activation, w13_bias, w2_bias, gated, swiglu_alpha, swiglu_limit,
                           hidden_states.shape[1])
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


QUANT_FORMATS = ("fp8_block", "mxfp4", "int4", "int8")


def fused_moe_quant(
    hidden_states: Tensor,
    w13: Tensor,
    w13_scale: Tensor,
    w2: Tensor,
    w2_scale: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    format: str,
    group_size: int = 0,
    w13_zero: Optional[Tensor] = None,
    w2_zero: Optional[Tensor] = None,
    expert_map: Optional[Tensor] = None,
    activation: str = "silu",
    w13_bias: Optional[Tensor] = None,
    w2_bias: Optional[Tensor] = None,
    gated: bool = True,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> Tensor:
    """:func:`fused_moe` on quantized experts, computed from their bytes (never a float copy of the layer).

    The weights are in one of moe_swap's layouts (``moe_swap/quant.py`` documents each exactly; a
    :class:`moe_swap.quant.QuantWeight` holds them and ``kernel_args()`` gives its three tensors):
    ``"fp8_block"`` (float8_e4m3fn, float32 scale per 128x128 block; a gated w13's gate and up halves are
    blocked separately), ``"mxfp4"`` (e2m1 nibbles, e8m0 scale per 32), ``"int4"`` (nibbles, scale
    float32/float16/bfloat16 per ``group_size`` in {32, 64, 128}, optional uint8 zero points, else 8) or
    ``"int8"`` (per-row float32 scale). ``w13`` holds ``[E, 2I, packed H]`` (``[E, I, packed H]`` with
    ``gated=False``), ``w2`` ``[E, H, packed I]``; ``H`` is ``hidden_states.size(1)``.

    Every other argument, the rounding (float32 sums of ``x`` times the dequantized weights, the
    activated intermediate rounded once to the input dtype) and the id handling are :func:`fused_moe`'s.
    The oracle is :func:`moe_swap.reference.fused_moe_quant` (dequantize, then the float reference).
    The CUDA kernel is compiled but has never run on a GPU.
    """
    _check_tensors(hidden_states=hidden_states, w13=w13, w13_scale=w13_scale, w2=w2, w2_scale=w2_scale,
                   topk_weights=topk_weights, topk_ids=topk_ids)
    return torch.ops.moe_swap.fused_moe_quant.default(
        hidden_states, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, format, group_size, w13_zero, w2_zero,
        expert_map, activation, w13_bias, w2_bias, gated, swiglu_alpha, swiglu_limit,
    )


@torch.library.register_fake("moe_swap::fused_moe_quant")
def _fused_moe_quant_fake(hidden_states, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, format, group_size=0,
                          w13_zero=None, w2_zero=None, expert_map=None, activation="silu", w13_bias=None,
                          w2_bias=None, gated=True, swiglu_alpha=1.702, swiglu_limit=7.0):
    if format not in QUANT_FORMATS:
        raise ValueError(f"format must be 'fp8_block', 'mxfp4', 'int4' or 'int8', got '{format}'")
    torch._check(hidden_states.dim() == 2, lambda: f"hidden_states must be 2-D, got {hidden_states.dim()}-D")
    check_same_device("fused_moe_quant", "hidden_states", dict(
        hidden_states=hidden_states, w13=w13, w13_scale=w13_scale, w2=w2, w2_scale=w2_scale, topk_weights=topk_weights,
        topk_ids=topk_ids, w13_zero=w13_zero, w2_zero=w2_zero, expert_map=expert_map, w13_bias=w13_bias,
        w2_bias=w2_bias))
    if activation not in FUSED_MOE_ACTIVATIONS:
        raise ValueError("activation must be 'silu', 'gelu', 'gelu_tanh', 'relu2', 'swiglu_clamp' or 'silu_clamp', "
                         f"got '{activation}'")
    torch._check(w13.dim() == 3 and w2.dim() == 3,
                 lambda: f"w13 and w2 must be 3-D, got shapes {tuple(w13.shape)} and {tuple(w2.shape)}")
    torch._check(not gated or w13.shape[1] % 2 == 0, lambda: f"w13.size(1) must be even (2I: gate rows then up rows, "
                                                             f"gated=True), got {w13.shape[1]}")
    torch._check(w2.shape[1] == hidden_states.shape[1],
                 lambda: f"w2.size(1) must equal H = {hidden_states.shape[1]}, got w2 shape {tuple(w2.shape)}")
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


def expert_cache_pull(
    topk_ids: Tensor,
    host_w13: Tensor,
    host_w2: Tensor,
    pool_w13: Tensor,
    pool_w2: Tensor,
    slot_base: int,
    slot_expert: Tensor,
    slot_stamp: Tensor,
    clock: Tensor,
    expert_map: Tensor,
    counters: Tensor,
) -> None:
    """The device-side on_demand step of one layer: no host sync, capturable in a CUDA graph.

    Reads ``topk_ids`` where they are; in the layer's region ``[slot_base, slot_base + C)`` of the
    expert pool, stamps the slots that hold routed experts (hits) and gives each missing expert the
    least recently used slot not used by this step (empty slots first), copying its weights there
    from ``host_w13 [E, 2I, H]`` / ``host_w2 [E, H, I]`` (on CUDA a mapped pinned view: the kernel
    reads host memory itself). Writes ``expert_map [E]`` (pool slot, or -1 when not routed) for
    :func:`fused_moe` on ``pool_w13 [N, 2I, H]`` / ``pool_w2 [N, H, I]``.

    State, all on the pool's device: ``slot_expert`` int32 ``[C]`` (expert held, -1 empty; start at
    -1), ``slot_stamp`` int64 ``[C]`` (last use), ``clock`` int64 ``[1]``; ``counters`` int64 ``[2]``
    accumulates (hits, misses). ``C`` must be at least ``min(E, topk_ids.numel())``.
    An id out of range raises on CPU; on CUDA it is skipped (never read out of bounds), and with
    ``set_debug(True)`` the op raises after the step, naming the first one.
    The CUDA kernel is compiled but has never run on a GPU.
    """
    _check_tensors(topk_ids=topk_ids, host_w13=host_w13, host_w2=host_w2, pool_w13=pool_w13, pool_w2=pool_w2,
                   slot_expert=slot_expert, slot_stamp=slot_stamp, clock=clock, expert_map=expert_map,
                   counters=counters)
    torch.ops.moe_swap.expert_cache_pull.default(topk_ids, host_w13, host_w2, pool_w13, pool_w2, slot_base,
                                                 slot_expert, slot_stamp, clock, expert_map, counters)


@torch.library.register_fake("moe_swap::expert_cache_pull")
def _expert_cache_pull_fake(topk_ids, host_w13, host_w2, pool_w13, pool_w2, slot_base, slot_expert, slot_stamp,
                            clock, expert_map, counters):
    check_same_device("expert_cache_pull", "pool_w13", dict(
        pool_w13=pool_w13, topk_ids=topk_ids, host_w13=host_w13, host_w2=host_w2, pool_w2=pool_w2,
        slot_expert=slot_expert, slot_stamp=slot_stamp, clock=clock, expert_map=expert_map, counters=counters))
    return None


def set_debug(enabled: bool = True) -> None:
    """Debug switch (also ``MOE_SWAP_DEBUG=1``): synchronise and check after every CUDA launch and
    every streamer copy, and turn out-of-range expert ids in CUDA kernels into errors instead of
    skipped pairs. While the current stream captures a CUDA graph the synchronising checks are skipped."""
    torch.ops.moe_swap.set_debug(bool(enabled))


def debug_enabled() -> bool:
    """Whether the debug switch is on."""
    return bool(torch.ops.moe_swap.debug_enabled())


def cpu_parallel_threads() -> int:
    """How many threads a parallel region of moe_swap's CPU kernels runs on now (at most
    ``torch.get_num_threads()``). 1 with more threads available means the library was built without
    the parallel backend's compiler flags and every CPU kernel runs single-threaded."""
    return int(torch.ops.moe_swap.cpu_parallel_threads())


def cpu_kernel_build() -> str:
    """The build of fused_moe's CPU inner loops this process uses: ``"avx512_bf16"``, ``"avx512"``,
    ``"avx2"`` or ``"generic"`` (portable). The best one this CPU runs, or the one the environment
    variable ``MOE_SWAP_CPU_KERNELS`` names, read once per process; raises if the CPU lacks that one."""
    return str(torch.ops.moe_swap.cpu_kernel_build())


def cpu_kernel_builds() -> list:
    """The names of every build of fused_moe's CPU inner loops this CPU runs, best first."""
    return [str(name) for name in torch.ops.moe_swap.cpu_kernel_builds()]
