"""``moe_swap.offload(model)``: run a Hugging Face MoE model with its experts streamed from host memory.

The routed experts of each MoE layer move into the streamer's HostStore (pinned host memory on
CUDA) and their original parameters are deleted; everything else goes to the device. Only the
experts' computation changes:
- transformers 5.x: the model keeps its own router, shared experts and block; every experts module that
  dispatches through ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` (any model_type) gets the
  ``"moe_swap"`` implementation registered there (acquire the layer's slot, ``fused_moe``, release), with its
  layout read from the module and converted once (see :func:`moe_swap.models.read_experts_layout`); biases
  stay on the device, indexed by expert id.
- transformers 4.x: the sparse block's forward is replaced by router -> ``topk_route`` ->
  ``fused_moe`` (+ the shared expert), with the family's routing rules.
"""

from __future__ import annotations

import copy
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .models import Family, MoELayer
from .ops import fused_moe, topk_route
from .planner import format_bytes, plan_placement
from .streamer import MODES, POLICIES, WeightStreamer, check_policy_options

__all__ = ["offload", "OffloadReport", "POLICIES", "MODES"]

EXPERTS_IMPLEMENTATION = "moe_swap"


@dataclass
class OffloadReport:
    """What :func:`offload` did: where each MoE layer's experts live and what that costs."""

    model_type: str
    device: str
    policy: str
    mode: str
    moe_layers: list[int]  # decoder layer indices of the sparse MoE layers
    resident_layers: list[int]  # decoder layer indices whose experts stay on the device
    streamed_layers: list[int]  # decoder layer indices whose experts stream from host memory
    slots: int
    slot_bytes: int
    device_bytes: int  # weights on the device: non-expert + resident experts + ring slots
    pinned_bytes: int  # the HostStore (pinned on CUDA, ordinary memory on the CPU backend)
    # policy full: the bytes each forward streams (every streamed layer, whole). on_demand/auto: None, it
    # depends on the routing (only the routed experts missing from the cache move): see copied_bytes.
    streamed_bytes_per_forward: Optional[int]
    expert_bytes: int  # all routed experts of the model
    streamed_expert_bytes: int  # the experts of the streamed layers (in the host store)
    gpu_budget: Optional[int]
    warnings: list[str] = field(default_factory=list)
    cache_bytes: int = 0  # policy on_demand: the expert cache's byte budget
    eviction: str = ""  # policy on_demand: the cache's eviction policy
    predict: bool = False  # policy on_demand: next-layer prediction on
    ids_path: str = ""  # policy on_demand: "host" (the host reads the routed ids) or "device" (expert_cache_pull)
    load: Optional[dict] = None  # filled by moe_swap.load: seconds, peak host memory
    streamer: Any = field(default=None, repr=False)

    @property
    def offloaded(self) -> bool:
        return bool(self.streamed_layers)

    @property
    def max_streamed_bytes_per_forward(self) -> int:
        """The most a forward can stream: every streamed layer's experts (what policy full streams)."""
        return self.streamed_expert_bytes

    @property
    def copied_bytes(self) -> int:
        """Bytes the streamer has copied so far (measured)."""
        return int(self.stats().get("bytes_copied", 0))

    def stats(self) -> dict:
        """The streamer's statistics (bytes copied, copies, wait time...), {} when nothing streams."""
        return self.streamer.stats() if self.streamer is not None else {}

    def __str__(self) -> str:
        host_kind = "pinned host" if self.device.startswith("cuda") else "host store (CPU backend)"
        rows = [
            ("model", f"{self.model_type}, {len(self.moe_layers)} MoE layers"),
            ("device / policy / mode", f"{self.device} / {self.policy} / {self.mode}"),
            ("resident layers", _ranges(self.resident_layers) or "none"),
            ("streamed layers", _ranges(self.streamed_layers) or "none"),
            ("ring slots", f"{self.slots} x {format_bytes(self.slot_bytes)}" if self.slots else "none"),
        ]
        if self.policy in ("on_demand", "auto"):
            if self.ids_path == "device":
                how = "routed ids read on the device (a region per layer, LRU; wide steps on the host path)"
            else:
                how = f"eviction {self.eviction}"
            rows.append(("expert cache", f"{format_bytes(self.cache_bytes)}, {how}, prediction "
                                         f"{'on' if self.predict else 'off'}"))
        rows += [
            ("device weights", format_bytes(self.device_bytes)
             + (f" (budget {format_bytes(self.gpu_budget)} = {self.gpu_budget:,} bytes)"
                if self.gpu_budget is not None else "")),
            (host_kind, format_bytes(self.pinned_bytes)),
        ]
        if self.streamed_bytes_per_forward is not None:
            rows.append(("streamed per forward", format_bytes(self.streamed_bytes_per_forward)))
        elif self.streamed_layers:
            rows.append(("streamed per forward", f"only routed experts missing from the cache (at most "
                                                 f"{format_bytes(self.max_streamed_bytes_per_forward)}); copied so "
                                                 f"far: {format_bytes(self.copied_bytes)}"))
        if self.load:
            rows.append(("load time", f"{self.load['seconds']:.2f} s"))
            rows.append(("peak host memory (load)", f"{format_bytes(self.load['peak_host_bytes'])} (process "
                         f"resident memory before loading: {format_bytes(self.load['host_bytes_before'])})"))
        width = max(len(k) for k, _ in rows)
        lines = ["moe_swap offload"] + [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def cache_table(self) -> str:
        """Per streamed layer: expert-cache hits, misses, hit rate, bytes copied, evictions, prediction
        recall, time spent bringing the routed ids to the host, whole-layer copies, steps taken on the
        device path and, with ids_path="device", steps too wide for their region (taken on the host path)
        (policy on_demand; '' otherwise)."""
        if self.policy not in ("on_demand", "auto") or self.streamer is None:
            return ""
        stats = self.streamer.stats()
        header = ("layer", "hits", "misses", "hit rate", "copied", "evictions", "predicted", "recall", "ids->host",
                  "whole-layer copies", "device steps", "wide steps")
        rows = []
        for position, entry in zip(self.streamed_layers, stats["layers"]):
            rows.append((str(position), str(entry["expert_hits"]), str(entry["expert_misses"]),
                         f"{100 * entry['hit_rate']:.1f}%", format_bytes(entry["bytes_copied"]),
                         str(entry["evictions"]), str(entry["predicted"]),
                         f"{100 * entry['prediction_recall']:.1f}%", f"{entry['ids_to_host_ms']:.2f} ms",
                         str(entry["layer_copies"]), str(entry["device_steps"]), str(entry["wide_steps"])))
        rows.append(("all", str(stats["expert_hits"]), str(stats["expert_misses"]), f"{100 * stats['hit_rate']:.1f}%",
                     format_bytes(stats["bytes_copied"]), str(stats["evictions"]), str(stats["predicted"]),
                     f"{100 * stats['prediction_recall']:.1f}%", f"{stats['ids_to_host_ms']:.2f} ms",
                     str(stats["layer_copies"]), str(stats["device_steps"]), str(stats["wide_steps"])))
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        fmt = lambda r: "  " + "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
        return "\n".join(["expert cache per streamed layer", fmt(header)] + [fmt(r) for r in rows])


def _ranges(indices: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts)


class _LayerExperts:
    """Where one MoE layer's experts live: a streamer index, or tensors on the holding module.

    A plain object (not a Module) so that it is not moved, saved or traversed with the model.
    """

    def __init__(self, activation: str, streamer=None, index: Optional[int] = None,
                 w13_name: str = "", w2_name: str = "", op_kwargs: Optional[dict] = None, has_bias: bool = False,
                 forward_args: tuple[str, ...] = ()):
        self.activation = activation
        self.streamer = streamer
        self.index = index
        self.w13_name = w13_name
        self.w2_name = w2_name
        self.op_kwargs = dict(op_kwargs or {})  # fused_moe's layout arguments (gated, swiglu_alpha, ...)
        self.has_bias = has_bias  # biases are buffers of the holding module (_BIAS_NAMES), on the device
        self.forward_args = forward_args  # 5.x: the experts forward's (hidden, ids, weights) parameter names
        # on_demand prediction: the next MoE layer's router weight [E, H] and its streamer index
        self.next_router: Optional[nn.Module] = None
        self.next_index: Optional[int] = None
        self.next_top_k = 0

    def run(self, holder: nn.Module, hidden: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor) -> torch.Tensor:
        weights = topk_weights.to(torch.float32)
        ids = topk_ids.to(torch.int32)
        kwargs = self.op_kwargs
        if self.has_bias:
            kwargs = dict(kwargs, w13_bias=getattr(holder, _BIAS_NAMES[0]), w2_bias=getattr(holder, _BIAS_NAMES[1]))
        if self.streamer is None:
            return fused_moe(hidden, getattr(holder, self.w13_name), getattr(holder, self.w2_name),
                             weights, ids, activation=self.activation, **kwargs)
        # one op per step, every policy: acquire, fused_moe, release
        if self.next_router is None:
            return self.streamer.moe(self.index, hidden, weights, ids, self.activation, **kwargs)
        # the next layer's router on this layer's input: its likely experts copy under this layer's
        # compute (the streamer orders them after this step's own copies)
        logits = F.linear(hidden, self.next_router.weight.to(hidden.dtype))
        guess = torch.topk(logits, self.next_top_k, dim=-1).indices
        return self.streamer.moe(self.index, hidden, weights, ids, self.activation, next_layer=self.next_index,
                                 next_ids=guess, **kwargs)


# buffers of a 5.x experts module after offload: its resident experts and its biases, in fused_moe's layout
_RESIDENT_NAMES = ("experts_w13", "experts_w2")
_BIAS_NAMES = ("experts_w13_bias", "experts_w2_bias")


def moe_swap_experts_forward(self: nn.Module, *args, **kwargs) -> torch.Tensor:
    """The ``"moe_swap"`` entry of transformers' ``ALL_EXPERTS_FUNCTIONS`` (5.x experts modules), called with
    the arguments of the module's own forward: (hidden states, top-k ids, top-k weights), by its names."""
    layer = getattr(self, "_moe_swap_experts", None)
    if layer is None:
        raise RuntimeError(
            f"experts_implementation='{EXPERTS_IMPLEMENTATION}' is set on a {type(self).__name__} that "
            f"moe_swap.offload() has not prepared; call moe_swap.offload(model) instead of setting it")
    names = layer.forward_args
    if len(args) + len(kwargs) != 3 or set(kwargs) - set(names[len(args):]):
        raise TypeError(f"{type(self).__name__}.forward takes ({', '.join(names)}), got {len(args)} positional "
                        f"and keyword arguments {sorted(kwargs)}")
    hidden_states, top_k_index, top_k_weights = list(args) + [kwargs[n] for n in names[len(args):]]
    return layer.run(self, hidden_states, top_k_weights, top_k_index)


def _register_experts_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, moe_swap_experts_forward)


def _sparse_block_forward(self: nn.Module, hidden_states: torch.Tensor):
    """Replacement forward of a transformers 4.x sparse MoE block: router, topk_route, fused_moe."""
    state = self._moe_swap_block
    routing: models.Routing = state.routing
    batch, seq, hidden = hidden_states.shape
    x = hidden_states.reshape(-1, hidden)
    gate_weight = self.gate.weight
    if routing.router_in_float32:
        router_logits = F.linear(x.float(), gate_weight.float())
    else:
        router_logits = F.linear(x, gate_weight)
    bias = self.gate.e_score_correction_bias if routing.uses_correction_bias else None
    topk_weights, topk_ids = topk_route(
        router_logits, routing.top_k, routing.scoring, routing.renormalize, routing.num_expert_group,
        routing.topk_group, bias, routing.routed_scaling_factor)
    out = state.experts.run(self, x, topk_weights, topk_ids)
    family: Family = state.family
    if family.shared_expert is not None:
        shared = getattr(self, family.shared_expert)(x)
        if family.shared_expert_gate is not None:
            shared = torch.sigmoid(getattr(self, family.shared_expert_gate)(x)) * shared
        out = out + shared
    out = out.reshape(batch, seq, hidden)
    return (out, router_logits) if family.returns_router_logits else out


def _check_device(device: Union[str, torch.device]) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch.cuda.is_available() is False; pass device='cpu' "
                             f"to run on the CPU backend")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")
    return dev


def _check_schedule(slots, prefetch_depth) -> None:
    """slots: an int >= 2; prefetch_depth: an int in [0, slots - 1] (checked up front, whether or not a
    layer ends up streamed, so a bad value never passes silently)."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 2:
        raise ValueError(f"slots must be an int >= 2 (one slot computing while the next fills), got {slots!r}")
    if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or not 0 <= prefetch_depth < slots:
        raise ValueError(f"prefetch_depth must be an int in [0, slots - 1] = [0, {slots - 1}], got {prefetch_depth!r}")


# offload, load and the CLI check the streamer's choices where WeightStreamer does
_check_policy_and_mode = check_policy_options


def check_dtype(dtype, name: str = "dtype") -> Optional[torch.dtype]:
    """None, a floating torch.dtype, or its name as transformers and the CLI spell it ("bfloat16",
    "torch.float16", "float32"; "auto" is None: the checkpoint's) -> a torch.dtype or None."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
        raise ValueError(f"{name} must be None or 'auto' (the checkpoint's), or a floating dtype such as "
                         f"torch.bfloat16 or 'bfloat16', got {dtype!r}")
    return resolved


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


ExpertSource = Callable[[MoELayer], "tuple[torch.Tensor, torch.Tensor]"]


def _offload(
    model: nn.Module,
    family: Optional[Family],
    layers: list[MoELayer],
    expert_source: ExpertSource,
    expert_element_size: int,
    device: torch.device,
    gpu_budget,
    policy: str,
    mode: str,
    slots: int,
    prefetch_depth: int,
    move_rest: bool,
    add_streamed: Optional[Callable] = None,
    eviction: str = "flru",
    predict: bool = False,
    ids_path: str = "host",
    copy_cost: Optional[tuple[float, float]] = None,
) -> OffloadReport:
    """Shared by offload() (experts read from the model) and load() (experts read from a checkpoint).

    ``expert_source(layer) -> (w13, w2)`` gives a layer's experts; ``add_streamed(layer, streamer) ->
    index``, when given, fills a streamed layer into the HostStore itself (tensor by tensor)."""
    config = model.config
    activation = models.expert_activation(config) if family is not None else ""
    expert_params = {id(p) for layer in layers for p in models.expert_parameters(layer, family)}
    base_bytes = sum(_tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers())
                     if id(t) not in expert_params)
    layer_bytes = [layer.expert_numel() * expert_element_size for layer in layers]
    plan = plan_placement(layer_bytes, base_bytes, gpu_budget, slots, policy=policy, ids_path=ids_path)
    cache_bytes = plan.cache_bytes
    streamer = None
    if plan.streamed:
        if policy != "full":
            # the ring is unused on demand; its two event channels carry demand and predicted copies
            streamer = WeightStreamer(device=str(device), slots=2, prefetch_depth=1, mode=mode, policy=policy,
                                      cache_bytes=cache_bytes, eviction=eviction, ids_path=ids_path,
                                      copy_cost=copy_cost)
        else:
            streamer = WeightStreamer(device=str(device), slots=plan.slots, prefetch_depth=prefetch_depth,
                                      mode=mode)

    streamed = set(plan.streamed)
    if layers and layers[0].layout is not None:
        _register_experts_implementation()
    states: dict[int, _LayerExperts] = {}
    for position, layer in enumerate(layers):
        layout = layer.layout
        layer_kwargs = dict(activation=layout.activation if layout is not None else activation,
                            op_kwargs=layout.op_kwargs() if layout is not None else None,
                            has_bias=layout is not None and layout.has_bias,
                            forward_args=layout.forward_args if layout is not None else ())
        if layout is not None and layout.has_bias:
            _convert_biases(layer)
        if position in streamed:
            if add_streamed is not None:
                index = add_streamed(layer, streamer)
            else:
                w13, w2 = expert_source(layer)
                index = streamer.add_layer(w13, w2)
                del w13, w2
            state = _LayerExperts(streamer=streamer, index=index, **layer_kwargs)
            states[position] = state
            models.drop_expert_parameters(layer)
            _install(layer, family, config, state)
            continue
        w13, w2 = expert_source(layer)
        models.drop_expert_parameters(layer)
        holder = layer.block  # 5.x: the experts module; 4.x: the sparse block
        holder.register_buffer(_RESIDENT_NAMES[0], w13.to(device).contiguous(), persistent=False)
        holder.register_buffer(_RESIDENT_NAMES[1], w2.to(device).contiguous(), persistent=False)
        del w13, w2
        state = _LayerExperts(w13_name=_RESIDENT_NAMES[0], w2_name=_RESIDENT_NAMES[1], **layer_kwargs)
        _install(layer, family, config, state)

    if move_rest:
        model.to(device)
    if streamer is not None and ids_path == "device":
        streamer.prepare_device_cache()  # allocated now, not inside a compiled or captured forward
        if all(r is None for r in streamer.cache_state()["device_regions"]):
            plan.warnings.append(
                f"ids_path='device' but the expert cache ({format_bytes(cache_bytes)}) leaves no region "
                f"after the host path's room for wide steps ({'two layers' if policy == 'auto' else 'one layer'}): "
                f"every step takes the host path; give a larger gpu_budget")
    if predict and policy != "full":
        for position, state in states.items():
            following = states.get(position + 1)  # the next MoE layer, when it streams too
            if following is not None:
                state.next_router = models.router_module(layers[position + 1], family, model)
                state.next_index = following.index
                state.next_top_k = models.routed_top_k(layers[position + 1], config, family, model)
    model._moe_swap_streamer = streamer  # keeps the HostStore and ring alive as long as the model

    device_bytes = sum(_tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))
    # the ring or the expert cache (allocated at the first step), as the streamer's stats() report it
    placement = streamer.placement() if streamer is not None else {"slots": 0, "slot_bytes": 0, "cache_bytes": 0,
                                                                  "device_bytes": 0}
    device_bytes += placement["device_bytes"]
    streamed_expert_bytes = sum(layer_bytes[i] for i in plan.streamed)
    report = OffloadReport(
        model_type=config.model_type,
        device=str(device),
        policy=policy,
        mode=mode,
        moe_layers=[layer.layer_index for layer in layers],
        resident_layers=[layers[i].layer_index for i in plan.resident],
        streamed_layers=[layers[i].layer_index for i in plan.streamed],
        slots=placement["slots"],
        slot_bytes=placement["slot_bytes"],
        device_bytes=device_bytes,
        pinned_bytes=int(streamer.host_bytes) if streamer is not None else 0,
        streamed_bytes_per_forward=streamed_expert_bytes if policy == "full" else None,
        expert_bytes=sum(layer_bytes),
        streamed_expert_bytes=streamed_expert_bytes,
        gpu_budget=plan.budget,
        warnings=list(plan.warnings),
        streamer=streamer,
        cache_bytes=placement["cache_bytes"],
        eviction=eviction if policy != "full" else "",
        predict=bool(predict and policy != "full"),
        ids_path=ids_path if policy != "full" else "",
    )
    model.moe_swap_report = report
    for message in report.warnings:
        warnings.warn(f"moe_swap.offload: {message}", UserWarning, stacklevel=3)
    return report


def _convert_biases(layer: MoELayer) -> None:
    """A 5.x experts module's biases -> buffers in fused_moe's layout (gate entries then up entries), which
    stay with the module (on the device) whether its experts stream or not."""
    experts, layout = layer.block, layer.layout
    w13_bias, w2_bias = (getattr(experts, name) for name in layout.bias_names)
    if w13_bias.is_meta or w2_bias.is_meta:
        raise ValueError(f"{layer.experts_name}: its biases {layout.bias_names} have no data (meta)")
    w13_bias = models.bias_to_fused_layout(layout, w13_bias.detach())
    w2_bias = w2_bias.detach().contiguous()
    for name in layout.bias_names:
        delattr(experts, name)
    experts.register_buffer(_BIAS_NAMES[0], w13_bias, persistent=False)
    experts.register_buffer(_BIAS_NAMES[1], w2_bias, persistent=False)


def _install(layer: MoELayer, family: Optional[Family], config, state: _LayerExperts) -> None:
    """Point the layer's experts computation at moe_swap."""
    if layer.layout is not None:
        experts = layer.block
        experts._moe_swap_experts = state
        # a per-module copy of the config selects the implementation for this module only, so the
        # user's config (possibly shared with other models) keeps its own choice
        experts.config = copy.copy(experts.config)
        experts.config._experts_implementation_internal = EXPERTS_IMPLEMENTATION
    else:
        layer.block._moe_swap_block = types.SimpleNamespace(
            routing=family.routing(config), family=family, experts=state)
        layer.block.forward = types.MethodType(_sparse_block_forward, layer.block)


def offload(
    model: nn.Module,
    device: Union[str, torch.device] = "cuda",
    gpu_budget: Union[None, int, str] = None,
    policy: str = "full",
    slots: int = 2,
    prefetch_depth: int = 1,
    mode: str = "full",
    eviction: str = "flru",
    predict: bool = False,
    ids_path: str = "host",
    copy_cost: Optional[tuple[float, float]] = None,
) -> OffloadReport:
    """Stream a Hugging Face MoE model's experts from host memory; returns a report.

    Args:
        model: a causal LM whose experts go through transformers' experts interface (transformers 5.x, any
            family; layouts moe_swap cannot compute exactly raise, naming the module and the attribute), or
            of a 4.x family in ``moe_swap.models.SUPPORTED_MODEL_TYPES``; its weights on the CPU (or any
            device), in any float dtype.
        device: where the model runs: ``"cuda"``/``"cuda:N"`` (experts in pinned host memory), or
            ``"cpu"`` (the streamer's CPU backend).
        gpu_budget: bytes for weights on the device (int, or a string such as ``"20GiB"``): the planner
            keeps as many layers' experts resident as fit and streams the rest. None streams every
            MoE layer.
        policy: ``"full"`` streams whole layers through the ring; ``"on_demand"`` copies only the
            experts each step routes to, into a device expert cache that gets every byte of
            ``gpu_budget`` the planner leaves over (see :func:`moe_swap.planner.plan_placement`);
            ``"auto"``: on demand, but a step that misses most experts (a prefill) copies the whole
            layer in one copy, by a cost model measured on this machine.
        slots: ScratchRing slots (>= 2).
        prefetch_depth: streamed layers copied ahead (1..slots-1).
        mode: the streamer's mode: ``"full"`` (double-buffered), or the ``"sync"``/``"uva"`` baselines.
        eviction: on_demand: the cache's eviction policy, ``"flru"`` (default; frequency-weighted
            LRU), ``"lru"`` or ``"lfu"`` (see :class:`moe_swap.WeightStreamer`).
        predict: on_demand: apply the next MoE layer's router to this layer's input and start copying
            its likely experts during this layer's compute (recall in ``report.cache_table()``).
        ids_path: on_demand: ``"host"`` (default; the host reads each step's routed ids -- a sync on
            CUDA -- and issues copy-engine copies) or ``"device"`` (``expert_cache_pull`` reads them on
            the device and pulls from mapped pinned memory: no sync; the cache is split into the host
            path's room for wide steps and a region per layer, see :class:`moe_swap.WeightStreamer`; with
            no ``gpu_budget`` the regions get what ``slots`` ring slots would and the room comes on top).
        copy_cost: policy auto: its cost model ``(overhead_us, gb_per_s)`` instead of measuring it when
            the cache is first allocated (see :class:`moe_swap.WeightStreamer`).

    The expert parameters are removed from the model (their memory is freed once nothing else holds
    them); the model is modified in place and keeps working with ``model.generate`` and
    ``torch.compile``. The report is also at ``model.moe_swap_report``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    if getattr(model, "moe_swap_report", None) is not None:
        raise ValueError("this model has already been offloaded by moe_swap; offload a fresh model")
    _check_policy_and_mode(policy, mode, eviction, ids_path, copy_cost)
    _check_schedule(slots, prefetch_depth)
    dev = _check_device(device)
    family, layers = models.model_experts(model)
    if any(p.is_meta for layer in layers for p in models.expert_parameters(layer, family)):
        raise ValueError("the model's experts are on the meta device (no data); build it with real "
                         "weights, or use moe_swap.load(path) for a checkpoint folder")
    element_size = models.expert_parameters(layers[0], family)[0].element_size() if layers else 0
    with torch.no_grad():
        return _offload(model, family, layers, lambda layer: models.take_expert_weights(layer, family),
                        element_size, dev, gpu_budget, policy, mode, slots, prefetch_depth, move_rest=True,
                        eviction=eviction, predict=predict, ids_path=ids_path, copy_cost=copy_cost)
