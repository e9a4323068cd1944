"""The weight streamer's Python face: ``moe_swap.WeightStreamer``.

Streamed layers' experts live in a HostStore (exact-size host memory, pinned on CUDA) and are copied
into a ScratchRing of ``slots`` device buffers on a dedicated copy engine, ``prefetch_depth`` layers
ahead of compute, wrapping around to the next forward pass. The C++ side (``csrc/streaming``) owns
all of it; this module adds the typed API, safetensors loading and the fake kernels that let
``acquire``/``release`` trace under ``torch.compile(fullgraph=True)``.

Modes (one object, so benchmarks compare them side by side):
  ``"full"`` — the design: copy engine + ring + prefetch; copies overlap compute.
  ``"sync"`` — BASELINE, vLLM's legacy ``cpu_offload_gb``: each acquire copies the layer on the
      compute stream, then compute runs; no overlap.
  ``"uva"``  — BASELINE, vLLM's ``uva`` offload: acquire returns device views of mapped pinned host
      memory; kernels read over PCIe on every access; nothing is copied.
"""

from __future__ import annotations

import json
import math
import mmap
import numbers
import operator
import os
import struct
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from .ops import check_same_device
from .planner import split_device_cache

__all__ = ["WeightStreamer"]

# Per streamer handle: [(w13_shape, w2_shape, dtype, device)] per layer, for the fake kernels.
_LAYER_META: dict[int, list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]]] = {}

# streamer_stats' per-layer columns, as the library defines them (csrc/streaming/stats.h)
_STATS_COLUMNS = tuple(torch.ops.moe_swap.streamer_stats_columns())
# The one list of each choice (the C++ side parses the same names; offload, load and the CLI check here).
POLICIES = ("full", "on_demand", "auto")
MODES = ("full", "sync", "uva")
EVICTIONS = ("lru", "lfu", "flru")
IDS_PATHS = ("host", "device")
_SPAN_KINDS = ("copy", "wait", "hold")


def _layer_meta(op: str, handle: int, layer: int):
    """The fake kernels' view of a layer: (w13_shape, w2_shape, dtype, device), or the error the op
    itself would raise for an unknown handle or layer."""
    if handle not in _LAYER_META:
        raise RuntimeError(f"streamer handle {handle} is unknown or was destroyed (WeightStreamer used after close()?)")
    layers = _LAYER_META[handle]
    if not 0 <= layer < len(layers):  # no Python negative indexing: the op rejects a negative layer
        raise RuntimeError(f"{op}({layer}): layer must be in [0, {len(layers)}), got {layer}")
    return layers[layer]


def _check_after(op: str, after) -> None:
    # The fake kernels also serve real calls that pass a meta tensor (the dispatcher picks the Meta kernel
    # whenever any input is meta): there they would skip the op, so a meta tensor in `after` is an error.
    for t in after:
        if t.device.type == "meta":
            raise RuntimeError(f"{op}: `after` must hold tensors on a real device (they order the op in a compiled "
                               f"graph), got a meta tensor of shape {list(t.shape)}")


@torch.library.register_fake("moe_swap::streamer_acquire")
def _acquire_fake(handle, layer, after):
    w13_shape, w2_shape, dtype, device = _layer_meta("acquire", handle, layer)
    _check_after("acquire", after)
    return torch.empty(w13_shape, dtype=dtype, device=device), torch.empty(w2_shape, dtype=dtype, device=device)


@torch.library.register_fake("moe_swap::streamer_release")
def _release_fake(handle, layer, after):
    _layer_meta("release", handle, layer)
    _check_after("release", after)
    return None


@torch.library.register_fake("moe_swap::streamer_prefetch")
def _prefetch_fake(handle, layer):
    _layer_meta("prefetch", handle, layer)
    return None


# on_demand: which experts move depends on the routed ids (data), so the whole step -- acquire the
# routed experts, fused_moe on the cache, release -- is one opaque op; its output is shaped like the
# hidden states, so it traces under torch.compile(fullgraph=True) without a graph break.
@torch.library.register_fake("moe_swap::streamer_moe")
def _moe_fake(handle, layer, hidden_states, topk_weights, topk_ids, activation="silu", next_layer=-1, next_ids=None,
              w13_bias=None, w2_bias=None, gated=True, swiglu_alpha=1.702, swiglu_limit=7.0):
    torch._check(hidden_states.dim() == 2, lambda: f"hidden_states must be 2-D, got {hidden_states.dim()}-D")
    device = _layer_meta("streamer_moe", handle, layer)[3]
    if hidden_states.device != device:
        raise RuntimeError(f"streamer_moe({layer}): hidden_states must be on the streamer's device {device}, "
                           f"got {hidden_states.device}")
    check_same_device("streamer_moe", "hidden_states", dict(hidden_states=hidden_states, topk_weights=topk_weights,
                                                            topk_ids=topk_ids, next_ids=next_ids, w13_bias=w13_bias,
                                                            w2_bias=w2_bias))
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


@torch.library.register_fake("moe_swap::streamer_predict")
def _predict_fake(handle, layer, expert_ids):
    device = _layer_meta("predict", handle, layer)[3]
    if expert_ids.device.type != "cpu" and expert_ids.device != device:
        raise RuntimeError(f"predict({layer}): expert_ids must be on the CPU or on the streamer's device {device}, "
                           f"got {expert_ids.device}")
    return None


# acquire/prefetch/release act on the streamer, not only on their outputs: the graph must keep them
# (no dead-code elimination) even when a result is unused.
for _op in (torch.ops.moe_swap.streamer_acquire.default, torch.ops.moe_swap.streamer_prefetch.default,
            torch.ops.moe_swap.streamer_release.default, torch.ops.moe_swap.streamer_moe.default,
            torch.ops.moe_swap.streamer_predict.default):
    torch.fx.node.has_side_effect(_op)


class WeightStreamer:
    """Streams MoE layers' expert weights from host memory into a ring of device slots.

    Args:
        device: ``"cuda"``/``"cuda:N"`` or ``"cpu"`` (the CPU backend: ordinary memory for the slots
            and a worker thread as the copy engine; same semantics, runs without a GPU).
        slots: ring size N (each slot holds the largest added layer).
        prefetch_depth: how many layers ahead of the one being computed are copied, in ``[0, N-1]``
            (``full`` mode).
        mode: ``"full"`` (the design), ``"sync"`` or ``"uva"`` (baselines, see the module doc).
        trace: record copy / wait / hold spans per layer (``stats()["trace"]``), for timelines.
        timing: time the compute stream's waits on copies (CUDA events, read lazily in ``stats()``).
            Turn off to capture the forward in a CUDA graph.
        policy: ``"full"`` (whole layers through the ring) or ``"on_demand"``: only the experts the
            batch routed to move, into an expert cache (a pool of expert-sized device slots shared by
            every layer), and :meth:`moe` runs ``fused_moe`` on the pool with an ``expert_map``.
            ``"auto"``: as on_demand, but a step whose missing experts would cost at least as much as
            separate copies as the whole layer does as one copy (a cost model of per-copy overhead and
            bandwidth, measured when the cache is first allocated or set by ``copy_cost``; the tie,
            every expert missing and no overhead, goes to the whole layer) copies the whole layer into
            a region of ``E`` pool slots; the pool must hold ``E`` slots for that (else the step goes
            on demand). When the cache holds two layers (the memory full's two-slot ring takes), such a
            wide step (a prefill) uses two layer regions and copies the next layer whole into the
            other region while this one computes: full's double buffering. (With less, prefill layers
            go one at a time: the pool never grows past ``cache_bytes`` for the overlap.)
        copy_cost: policy auto's cost model as ``(overhead_us, gb_per_s)`` -- a copy of ``b`` bytes
            costs ``overhead_us`` microseconds plus ``b`` at ``gb_per_s`` GB/s -- instead of measuring
            it when the cache is first allocated (``None``, the default). For deterministic
            decisions (tests), or where the measurement is noisy (a busy GPU); e.g. ``(10.0, 25.0)``:
            10 us per copy, 25 GB/s. ``cache_state()`` reports the model in use.
        cache_bytes: on_demand: bytes of experts the cache keeps between steps (``0``: none). A step
            whose distinct experts exceed it still runs: the pool grows to the step's working set and
            the slots beyond the budget are emptied when the step ends.
        eviction: on_demand: ``"flru"`` (the default; frequency-weighted LRU: uses decayed with a
            half-life of 4 forward passes), ``"lru"`` or ``"lfu"`` (uses over the whole run). The pool is
            shared by all layers, so a cache smaller than one pass's working set makes LRU evict exactly
            what the next pass needs (bench_expert, 25% cache, skewed and recorded traces: LRU 0% at
            Qwen3 batch 8 and Mixtral batch 4, flru 2-41% there; at batch 1 within 4 points of LRU).
        ids_path: on_demand/auto: how the routed ids reach the copy. ``"host"`` (the default): the host
            reads them (on CUDA a device->host copy, i.e. a sync per layer-step; ``stats()`` times it)
            and issues copy-engine copies into the shared pool above. ``"device"``: the
            ``expert_cache_pull`` op reads them on the device and pulls the missing experts from mapped
            pinned memory itself -- no sync, so a decode step can live in a CUDA graph. ``cache_bytes``
            is then split: the host path keeps room for a wide step (one layer, two under ``auto`` for
            the prefill double buffering; at most ``cache_bytes``), and the rest is divided evenly into
            a region per layer (LRU within the layer; ``eviction`` applies to the host path only). A
            step with more ids than its layer's region has slots (a prefill) takes the host path --
            decided from shapes, so no sync either way. :meth:`predict` pulls into a layer's region
            (on CUDA on a side stream, under the previous layer's compute).

    Use: ``i = s.add_layer(w13, w2)`` for each layer, then per forward and layer
    ``w13, w2 = s.acquire(i)`` ... compute ... ``s.release(i)``. The views are valid until release.

    Inside ``torch.compile``: the ops trace with fake kernels (the handle and layer are constants);
    pass ``after=[input]`` to acquire and ``after=[output]`` to release so the graph orders them around
    the compute. acquire/prefetch/release never synchronise the host with the device. CUDA-graph
    capture of a forward is the aim but has not been tried: create the streamer with
    ``timing=False`` (no event queries), and the wrap-around prefetch of the next pass's first layer
    leaves the copy stream forked at the end of the forward.
    """

    def __init__(self, device: Union[str, torch.device] = "cuda", slots: int = 2, prefetch_depth: int = 1,
                 mode: str = "full", *, trace: bool = False, timing: bool = True, policy: str = "full",
                 cache_bytes: int = 0,
                 eviction: str = "flru", ids_path: str = "host",
                 copy_cost: Optional[tuple[float, float]] = None) -> None:
        self._handle: Optional[int] = None
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device={str(device)!r}: no CUDA GPU is available here; use device='cpu'")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.type != "cpu":
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
        overhead_us, gb_per_s = check_policy_options(policy, mode, eviction, ids_path, copy_cost)
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
        _check_int64("cache_bytes", cache_bytes)
        slots, prefetch_depth = _check_int64("slots", slots), _check_int64("prefetch_depth", prefetch_depth)
        self.policy = policy
        self.ids_path = ids_path
        self.cache_bytes = cache_bytes
        # ids_path "device": the per-layer regions, built by prepare_device_cache once every layer is
        # added; it also hands the C++ streamer (the host path) its share of cache_bytes, 0 until then.
        self._regions: Optional[list[Optional[_DeviceRegion]]] = None
        self.eviction = eviction
        self.device = dev
        self.mode = mode
        self.slots = slots
        self.prefetch_depth = prefetch_depth
        self._handle = torch.ops.moe_swap.streamer_create(
            str(dev), slots, prefetch_depth, mode, bool(trace), bool(timing), policy,
            0 if ids_path == "device" else cache_bytes, eviction, overhead_us, gb_per_s)
        _LAYER_META[self._handle] = []

    # ---- lifetime ----
    def close(self) -> None:
        """Wait for in-flight copies and free the host store and the slots. Idempotent."""
        handle, self._handle = self._handle, None
        regions, self._regions = self._regions, None  # the host views keep the host store's memory alive
        side = next((r.side_stream for r in regions or () if r is not None and r.side_stream is not None), None)
        if side is not None:
            # A prediction's pull may still be writing the regions' tensors on the side stream: their memory
            # goes back to torch's allocator in the current stream's order, so that stream waits for it. And
            # the pulls (there and on this stream) read the host store, freed below: the host waits for them.
            current = torch.cuda.current_stream(side.device)
            current.wait_stream(side)
            current.synchronize()
        del regions
        if handle is not None:
            _LAYER_META.pop(handle, None)
            torch.ops.moe_swap.streamer_destroy(handle)

    def __enter__(self) -> "WeightStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass

    @property
    def handle(self) -> int:
        """The integer naming this streamer in the ``torch.ops.moe_swap.streamer_*`` ops."""
        if self._handle is None:
            raise RuntimeError("this WeightStreamer is closed")
        return self._handle

    # ---- filling the host store ----
    def reserve_layer(self, w13_shape: Sequence[int], w2_shape: Sequence[int], dtype: torch.dtype) -> int:
        """Allocate a layer's exact-size host storage (``w13 [E, 2I, H]``, ``w2 [E, H, I]``); fill it
        with :meth:`write`. Returns the layer index."""
        if self._regions is not None:
            raise RuntimeError("reserve_layer/add_layer after prepare_device_cache(): the device cache is split "
                               "over the layers it was built for; add every layer first")
        layer = torch.ops.moe_swap.streamer_reserve_layer(self.handle, list(w13_shape), list(w2_shape), dtype)
        _LAYER_META[self.handle].append((tuple(int(d) for d in w13_shape), tuple(int(d) for d in w2_shape),
                                         dtype, self.device))
        return layer

    def write(self, layer: int, which: str, src: Tensor, expert: int = 0, row: int = 0) -> None:
        """Copy ``src`` (``[rows, cols]`` or ``[n, rows, cols]``, the layer's dtype, any strides or
        device) into ``which`` (``"w13"`` or ``"w2"``) at experts ``[expert, expert+n)``, rows
        ``[row, row+rows)``."""
        if which not in ("w13", "w2"):
            raise ValueError(f"which must be 'w13' or 'w2', got {which!r}")
        if self._regions is not None:
            # the device regions cache experts, and their pulls read the host store: new weights would be
            # torn by a pull in flight and then shadowed by the stale copies the regions keep
            raise RuntimeError("write() after prepare_device_cache(): the device regions cache this streamer's "
                               "experts; write every layer first")
        torch.ops.moe_swap.streamer_write(self.handle, layer, 0 if which == "w13" else 1, expert, row, src)

    def add_layer(self, w13: Tensor, w2: Tensor) -> int:
        """Copy one layer (``w13 [E, 2I, H]`` gate rows then up rows, or ``[E, I, H]`` up rows only for
        ungated experts; ``w2 [E, H, I]``) into the host store; returns its index. The caller's tensors may be freed afterwards."""
        if not isinstance(w13, Tensor) or not isinstance(w2, Tensor):
            raise TypeError(f"w13 and w2 must be tensors, got {type(w13).__name__} and {type(w2).__name__}")
        if w13.dim() != 3 or w2.dim() != 3:
            raise ValueError(f"w13 must be [E, 2I, H] (or [E, I, H]) and w2 [E, H, I], got shapes {tuple(w13.shape)} and "
                             f"{tuple(w2.shape)}")
        layer = self.reserve_layer(w13.shape, w2.shape, w13.dtype)
        self.write(layer, "w13", w13)
        self.write(layer, "w2", w2)
        return layer

    def load_safetensors(self, files: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]],
                         layers: Sequence[dict], progress: Optional[bool] = None) -> list[int]:
        """Add layers from safetensors file(s), one tensor at a time through a memory map.

        Each entry of ``layers`` names the tensors of one layer, either fused
        (``{"w13": name [E,2I,H], "w2": name [E,H,I]}``) or per expert
        (``{"gate": "...experts.{e}.gate_proj.weight", "up": ..., "down": ..., "num_experts": E}``
        with gate/up ``[I, H]`` and down ``[H, I]``). Each tensor is copied straight from the mapped
        file into the host store and its pages are dropped before the next, so resident memory stays
        near the host store's size plus one tensor. ``progress``: a tqdm bar over the bytes (default:
        when more than 1 GiB is loaded and tqdm is installed). Returns the new layers' indices.
        """
        reader = _SafetensorsReader(files)
        try:
            plans = [self._plan_layer(reader, spec, i) for i, spec in enumerate(layers)]
            total = sum(reader.nbytes(name) for plan in plans for _, _, _, _, name in plan[2])
            bar = _progress_bar(total, progress)
            indices = []
            for w13_shape, w2_shape, parts, dtype in plans:
                layer = self.reserve_layer(w13_shape, w2_shape, dtype)
                for which, expert, row, _, name in parts:
                    reader.copy_out(name, lambda t: self.write(layer, which, t, expert=expert, row=row))
                    if bar is not None:
                        bar.update(reader.nbytes(name))
                indices.append(layer)
            if bar is not None:
                bar.close()
            return indices
        finally:
            reader.close()

    @staticmethod
    def _plan_layer(reader: "_SafetensorsReader", spec: dict, index: int):
        # -> (w13_shape, w2_shape, [(which, expert, row, shape, name)], dtype)
        if not isinstance(spec, dict):
            raise ValueError(f"layers[{index}] must be a dict of tensor names, got {type(spec).__name__} {spec!r}")
        if "w13" in spec or "w2" in spec:
            if not {"w13", "w2"} <= spec.keys():
                raise ValueError(f"layers[{index}] names fused experts by both 'w13' and 'w2'; got keys {sorted(spec)}")
            w13, w2 = spec["w13"], spec["w2"]
            s13, s2 = reader.shape(w13), reader.shape(w2)
            dtype = reader.dtype(w13)
            if reader.dtype(w2) != dtype:
                raise ValueError(f"layers[{index}]: {w13} is {dtype} but {w2} is {reader.dtype(w2)}")
            return s13, s2, [("w13", 0, 0, s13, w13), ("w2", 0, 0, s2, w2)], dtype
        try:
            num_experts = spec["num_experts"]
            gate, up, down = spec["gate"], spec["up"], spec["down"]
        except KeyError as e:
            raise ValueError(f"layers[{index}] must have 'w13' and 'w2', or 'gate', 'up', 'down' and "
                             f"'num_experts'; missing {e}") from None
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"layers[{index}]: num_experts must be an int >= 1, got {num_experts!r}")

        def expert_name(pattern, e: int) -> str:
            try:
                return pattern.format(e=e)
            except (AttributeError, KeyError, IndexError, ValueError) as error:
                raise ValueError(f"layers[{index}]: {pattern!r} must be a tensor name with '{{e}}' where the expert "
                                 f"index goes ({type(error).__name__}: {error})") from None

        g0 = reader.shape(expert_name(gate, 0))
        d0 = reader.shape(expert_name(down, 0))
        if len(g0) != 2 or len(d0) != 2:
            raise ValueError(f"layers[{index}]: gate must be [I, H] and down [H, I], got {g0} and {d0}")
        inter, hidden = g0
        dtype = reader.dtype(expert_name(gate, 0))
        parts = []
        for e in range(num_experts):
            for which, row, name, want in (("w13", 0, expert_name(gate, e), (inter, hidden)),
                                           ("w13", inter, expert_name(up, e), (inter, hidden)),
                                           ("w2", 0, expert_name(down, e), (hidden, inter))):
                if reader.shape(name) != want:
                    raise ValueError(f"layers[{index}]: {name} must have shape {want}, got {reader.shape(name)}")
                if reader.dtype(name) != dtype:
                    raise ValueError(f"layers[{index}]: {name} is {reader.dtype(name)}, expected {dtype}")
                parts.append((which, e, row, want, name))
        return (num_experts, 2 * inter, hidden), (num_experts, hidden, inter), parts, dtype

    # ---- the schedule ----
    def acquire(self, layer: int, after: Sequence[Tensor] = ()) -> tuple[Tensor, Tensor]:
        """Views ``(w13 [E, 2I, H], w2 [E, H, I])`` of the layer, valid until :meth:`release`.

        The current stream waits for the layer's copy (issued now if it was never prefetched); the
        next layers' prefetch is issued. ``after``: tensors this call must come after in a compiled
        graph (e.g. the layer's input hidden states)."""
        return torch.ops.moe_swap.streamer_acquire(self.handle, layer, list(after))

    def prefetch(self, layer: int) -> None:
        """Start copying ``layer`` into a free slot if there is one (a hint; ``full`` mode only)."""
        torch.ops.moe_swap.streamer_prefetch(self.handle, layer)

    def release(self, layer: int, after: Sequence[Tensor] = ()) -> None:
        """The layer's slot is free once the work queued so far on the current stream finishes.
        ``after``: the tensors computed from the views (orders the release after them in a
        compiled graph)."""
        torch.ops.moe_swap.streamer_release(self.handle, layer, list(after))

    def synchronize(self) -> None:
        """Host waits for every copy in flight (tests, benchmarks; never needed in a forward)."""
        torch.ops.moe_swap.streamer_synchronize(self.handle)

    # ---- policy on_demand ----
    def acquire_experts(self, layer: int, topk_ids: Tensor, next_layer: Optional[int] = None,
                        next_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Copy the distinct experts in ``topk_ids`` that are not cached; returns the cache's pool
        ``(w13 [N, 2I, H], w2 [N, H, I])`` and ``expert_map`` int32 ``[E]`` (expert -> pool slot, -1
        when not routed this step), valid until :meth:`release_experts`; one step at a time (release
        the previous layer's step first). The host reads the ids (on CUDA a device->host copy, i.e. a
        sync). ``next_layer``/``next_ids``: see :meth:`moe`. Eager only (no fake kernel: the pool's
        size depends on the data); compiled code uses :meth:`moe`."""
        return torch.ops.moe_swap.streamer_acquire_experts(self.handle, layer, topk_ids,
                                                           *_next_guess(next_layer, next_ids))

    def release_experts(self, layer: int, after: Sequence[Tensor] = ()) -> None:
        """End the layer's step: its slots may be reused once the current stream's work so far is
        done; the cache is trimmed back to its budget."""
        torch.ops.moe_swap.streamer_release_experts(self.handle, layer, list(after))

    def moe(self, layer: int, hidden_states: Tensor, topk_weights: Tensor, topk_ids: Tensor,
            activation: str = "silu", next_layer: Optional[int] = None, next_ids: Optional[Tensor] = None, *,
            w13_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None, gated: bool = True,
            swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> Tensor:
        """One MoE step, any policy, one opaque op (traces under ``torch.compile(fullgraph=True)``):
        on_demand/auto acquire the routed experts, ``fused_moe`` on the cache with the ``expert_map``,
        release; full acquire the layer, ``fused_moe`` on its views, release (no ``next_layer``/
        ``next_ids``: the ring prefetches by its own schedule).
        ``w13_bias``, ``w2_bias``, ``gated``, ``swiglu_alpha``, ``swiglu_limit``: as :func:`fused_moe`;
        the biases ``[E, ...]`` are indexed by expert id and stay where the caller keeps them (on the
        streamer's device, whole: the cache never moves them). An ungated layer's w13 is ``[E, I, H]``.
        With ``ids_path="device"``: ``expert_cache_pull`` then ``fused_moe`` on the layer's region
        when the step fits it (two ops, no host sync), else the host path.

        ``next_layer``, ``next_ids``: a guess at another layer's next routing (e.g. that layer's router
        on this layer's input), predicted as by :meth:`predict`, but ordered for overlap: on the host
        path its copies are issued after this step's own (the copy engine runs copies in issue order,
        so a :meth:`predict` just before the step would delay it) and run under this step's compute;
        a device region's guess is pulled first, on its side stream, beside this step."""
        guess = _next_guess(next_layer, next_ids)
        region = self._region(layer)
        this_on_region = region is not None and region.fits(topk_ids)
        if next_ids is not None and (this_on_region or self._region(next_layer) is not None):
            # the guess is not the host path's to order after this step: predict it now
            self.predict(next_layer, next_ids)
            guess = (-1, None)
        if region is not None and not torch.compiler.is_compiling():  # a compiled graph decided at trace time
            self._count_region_step(layer, topk_ids, this_on_region)
        options = (w13_bias, w2_bias, gated, swiglu_alpha, swiglu_limit)
        if this_on_region:
            return region.moe(hidden_states, topk_weights, topk_ids, activation, *options)
        return torch.ops.moe_swap.streamer_moe(self.handle, layer, hidden_states, topk_weights, topk_ids,
                                               activation, *guess, *options)

    def _count_region_step(self, layer: int, topk_ids: Tensor, fits: bool) -> None:
        """A step with more ids than its layer's device region has slots takes the host path: expected for
        a prefill. When most steps of a layer do (decode at a large batch, a small region) the device path
        hardly runs: say so, once, and count them (``stats()``'s ``wide_steps``)."""
        if fits:
            self._region_steps[layer] += 1
            return
        self._wide_steps[layer] += 1
        if not self._warned_wide and self._wide_steps[layer] > max(8, self._region_steps[layer]):
            self._warned_wide = True
            warnings.warn(
                f"ids_path='device': {self._wide_steps[layer]} of layer {layer}'s {self._wide_steps[layer] + self._region_steps[layer]} "
                f"steps routed more ids (the last: {topk_ids.numel()}) than its device region's "
                f"{self._regions[layer].slots} slots and took the host path (a sync and copy-engine copies) "
                f"instead: give a larger gpu_budget or use a smaller batch. Shown once; stats()['wide_steps'] "
                f"counts them per layer.", UserWarning, stacklevel=3)

    def predict(self, layer: int, expert_ids: Tensor) -> None:
        """Start copying the experts in ``expert_ids`` (a guess at ``layer``'s next routing) that are
        not cached; a hint. Its recall shows in ``stats()`` (``predicted_used / routed_distinct``).
        For a layer with a device region (``ids_path="device"``) ``expert_cache_pull`` pulls them into
        the region, on CUDA on a side stream (no sync either way); a guess wider than the region is
        dropped."""
        region = self._region(layer)
        if region is not None:
            region.predict(expert_ids)
            return
        torch.ops.moe_swap.streamer_predict(self.handle, layer, expert_ids)

    def _region(self, layer: int) -> Optional["_DeviceRegion"]:
        """The layer's device region (``ids_path="device"``; None: the host path serves the layer; an
        invalid layer is left to the C++ op's check)."""
        if self.ids_path != "device":
            return None
        if self._regions is None:
            self.prepare_device_cache()
        return self._regions[layer] if 0 <= layer < len(self._regions) else None

    def prepare_device_cache(self) -> None:
        """``ids_path="device"``: give the host path its room for wide steps (see ``ids_path``), split
        the rest of ``cache_bytes`` evenly over the layers added so far and allocate each layer's region
        (``min(E, its share / bytes per expert)`` expert slots; none when that is 0). Called by the
        first :meth:`moe` if not before; call it before ``torch.compile`` or CUDA graph capture so that
        no allocation happens inside. Idempotent."""
        if self.ids_path != "device":
            raise RuntimeError(f"prepare_device_cache() is for ids_path='device'; this streamer has "
                               f"ids_path={self.ids_path!r}")
        if self._regions is not None:
            return
        meta = _LAYER_META[self.handle]
        if not meta:
            raise RuntimeError("prepare_device_cache(): the streamer has no layers; add_layer first")
        expert_bytes = [(math.prod(a[1:]) + math.prod(b[1:])) * dtype.itemsize for a, b, dtype, _ in meta]
        host_room, region_slots = split_device_cache(self.cache_bytes, self.policy, [a[0] for a, _, _, _ in meta],
                                                     expert_bytes)
        torch.ops.moe_swap.streamer_set_cache_bytes(self.handle, host_room)
        side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # for predictions
        regions: list[Optional[_DeviceRegion]] = []
        for layer, slots in enumerate(region_slots):
            regions.append(_DeviceRegion(self.handle, layer, slots, self.device, side_stream) if slots > 0 else None)
        self._regions = regions
        self._wide_steps = [0] * len(regions)  # steps that took the host path (too wide for the region)
        self._region_steps = [0] * len(regions)  # steps on the region
        self._warned_wide = False

    def cache_state(self) -> dict:
        """The expert cache: pool slots, capacity (slots kept between steps), occupied slots, bytes
        per expert, and ``(layer, expert)`` per slot (``-1, -1``: empty). ``ids_path="device"``: also
        ``device_regions``, per layer the region's ``(slots, expert per slot)`` (``None``: no region)."""
        info, table = torch.ops.moe_swap.streamer_cache_state(self.handle)
        out = {}
        if self._regions is not None:
            out["device_regions"] = [None if r is None else (r.slots, r.slot_expert.tolist()) for r in self._regions]
        return out | {"slots": info[0], "capacity": info[1], "occupied": info[2], "expert_bytes": info[3],
                # policy auto's cost model: as set by copy_cost, else measured (None until the cache is first allocated)
                "copy_overhead_us": info[4] / 1e3 if info[4] >= 0 else None,
                "copy_gb_per_s": info[5] / 1e9 if info[5] >= 0 else None,
                "entries": [tuple(r) for r in table.tolist()]}

    # ---- numbers ----
    def _info(self) -> list[int]:
        return torch.ops.moe_swap.streamer_info(self.handle)

    @property
    def num_layers(self) -> int:
        return self._info()[0]

    @property
    def host_bytes(self) -> int:
        """Bytes held in the host store (exactly the layers' weights, no rounding)."""
        return self._info()[1]

    @property
    def device_bytes(self) -> int:
        """Bytes of the scratch ring (``slots * slot_bytes``; allocated at the first acquire or
        prefetch, 0 before and in ``uva`` mode)."""
        return self._info()[2]

    @property
    def slot_bytes(self) -> int:
        return self._info()[3]

    def placement(self) -> dict:
        """What this streamer holds on the device, as planned (the ring and the expert cache are allocated
        at the first step): ring ``slots`` x ``slot_bytes`` under policy full (none in mode ``uva``), the
        expert cache's ``cache_bytes`` under on_demand/auto (their two copy channels hold no memory).
        The one source of these figures for :meth:`stats` and :class:`moe_swap.OffloadReport`."""
        layer_bytes = [(math.prod(w13) + math.prod(w2)) * torch.empty((), dtype=dtype).element_size()
                       for w13, w2, dtype, _ in _LAYER_META[self.handle]]
        ring = self.policy == "full" and self.mode != "uva"
        slots = self.slots if ring else 0
        slot_bytes = max(layer_bytes, default=0) if ring else 0
        cache_bytes = self.cache_bytes if self.policy != "full" else 0
        return {"policy": self.policy, "mode": self.mode, "slots": slots, "slot_bytes": slot_bytes,
                "cache_bytes": cache_bytes, "device_bytes": slots * slot_bytes + cache_bytes}

    def stats(self) -> dict:
        """Statistics: totals, per layer (bytes copied, copies and chunks issued, acquires, hits,
        demand copies, compute-stream wait time), and with ``trace=True`` the copy/wait/hold spans.
        ``policy``, ``mode``, ``slots``, ``slot_bytes``, ``cache_bytes`` and ``device_bytes`` are
        :meth:`placement`'s (planned); ``device_bytes_allocated`` is what is allocated now."""
        table, trace = torch.ops.moe_swap.streamer_stats(self.handle)
        info = self._info()
        layers = []
        device_rows = [None] * len(table)
        if self._regions is not None:
            device_rows = [None if r is None else r.counts() for r in self._regions]
        for row, device_row in zip(table.tolist(), device_rows):
            entry = dict(zip(_STATS_COLUMNS, row))
            entry["device_steps"] = 0
            entry["wide_steps"] = self._wide_steps[len(layers)] if self._regions is not None else 0
            if device_row is not None:  # the device path's steps (their counts live on the device)
                entry["device_steps"] = device_row.pop("device_steps")
                for key, value in device_row.items():
                    entry[key] += value
                entry["routed_distinct"] += device_row["expert_hits"] + device_row["expert_misses"]
            entry["wait_ms"] = entry.pop("wait_ns") / 1e6
            entry["ids_to_host_ms"] = entry.pop("ids_to_host_ns") / 1e6
            lookups = entry["expert_hits"] + entry["expert_misses"]
            entry["hit_rate"] = entry["expert_hits"] / lookups if lookups else 0.0
            entry["prediction_recall"] = (entry["predicted_used"] / entry["routed_distinct"]
                                          if entry["routed_distinct"] else 0.0)
            layers.append(entry)
        out = {
            **self.placement(), "device": str(self.device), "prefetch_depth": info[5], "host_bytes": info[1],
            "device_bytes_allocated": info[2],
            "bytes_copied": sum(l["bytes_copied"] for l in layers),
            "copies_issued": sum(l["copies_issued"] for l in layers),
            "wait_ms": sum(l["wait_ms"] for l in layers),
            "untimed_spans": info[6],
            "layers": layers,
        }
        if self.policy in ("on_demand", "auto"):
            hits = sum(l["expert_hits"] for l in layers)
            misses = sum(l["expert_misses"] for l in layers)
            routed = sum(l["routed_distinct"] for l in layers)
            out.update(eviction=self.eviction, ids_path=self.ids_path,
                       device_steps=sum(l["device_steps"] for l in layers),
                       wide_steps=sum(l["wide_steps"] for l in layers), expert_hits=hits, expert_misses=misses,
                       evictions=sum(l["evictions"] for l in layers), hit_rate=hits / (hits + misses) if hits + misses else 0.0,
                       predicted=sum(l["predicted"] for l in layers),
                       prediction_recall=sum(l["predicted_used"] for l in layers) / routed if routed else 0.0,
                       ids_to_host_ms=sum(l["ids_to_host_ms"] for l in layers),
                       layer_copies=sum(l["layer_copies"] for l in layers))
        out["trace"] = [{"layer": int(r[0]), "slot": int(r[1]), "kind": _SPAN_KINDS[int(r[2])], "start_us": r[3],
                         "end_us": r[4]} for r in trace.tolist()]
        return out

    def __repr__(self) -> str:
        if self._handle is None:
            return "WeightStreamer(closed)"
        return (f"WeightStreamer(device={str(self.device)!r}, slots={self.slots}, prefetch_depth={self.prefetch_depth}, "
                f"mode={self.mode!r}, policy={self.policy!r}, layers={self.num_layers}, host_bytes={self.host_bytes})")


def _next_guess(next_layer: Optional[int], next_ids: Optional[Tensor]) -> tuple[int, Optional[Tensor]]:
    """``(next_layer, next_ids)`` as the ops take them: both given, or neither (``-1, None``)."""
    if (next_layer is None) != (next_ids is None):
        raise ValueError(f"next_layer and next_ids go together: got next_layer={next_layer!r} and next_ids "
                         f"{'None' if next_ids is None else 'a tensor'}")
    if next_layer is None:
        return -1, None
    return _check_int64("next_layer", next_layer), next_ids


class _DeviceRegion:
    """One layer's region of the device-side expert cache (``ids_path="device"``): ``slots`` expert
    slots, their state as tensors on the device (which expert each holds, last use, the layer's clock,
    the hit/miss counters) and zero-copy device views of the layer's host-store weights to pull from.

    Predictions pull into the region too (the predicted experts become its most recent); on CUDA on a
    side stream that forks from the current one, so the pull runs under the previous layer's compute,
    and the layer's step joins it first. Every count stays on the device (no sync, capturable)."""

    def __init__(self, handle: int, layer: int, slots: int, device: torch.device,
                 side_stream: Optional["torch.cuda.Stream"]) -> None:
        self.host_w13, self.host_w2 = torch.ops.moe_swap.streamer_host_device_views(handle, layer)
        self.num_experts = E = self.host_w13.shape[0]
        self.slots = slots
        self.expert_bytes = (self.host_w13[0].numel() + self.host_w2[0].numel()) * self.host_w13.element_size()
        dtype = self.host_w13.dtype
        self.pool_w13 = torch.empty((slots, *self.host_w13.shape[1:]), dtype=dtype, device=device)
        self.pool_w2 = torch.empty((slots, *self.host_w2.shape[1:]), dtype=dtype, device=device)
        self.slot_expert = torch.full((slots,), -1, dtype=torch.int32, device=device)
        self.slot_stamp = torch.zeros(slots, dtype=torch.int64, device=device)
        self.clock = torch.zeros(1, dtype=torch.int64, device=device)  # one tick per step and per prediction
        self.expert_map = torch.empty(E, dtype=torch.int32, device=device)
        self.counters = torch.zeros(2, dtype=torch.int64, device=device)  # the steps' hits, misses
        # predictions: [predictions, experts already there, experts copied ahead, predicted and then routed]
        self.predict_counts = torch.zeros(4, dtype=torch.int64, device=device)
        self.predict_counters = self.predict_counts[1:3]  # the pull's (hits, misses) view
        self.predict_map = torch.empty(E, dtype=torch.int32, device=device)
        self.predicted = torch.zeros(E, dtype=torch.bool, device=device)  # this step's predicted experts
        self.side_stream = side_stream
        self._joined = True  # the step has waited for the last prediction's side-stream pull
        self._predicted = False  # a prediction came since the last step (its recall is to be counted)

    def fits(self, topk_ids: Tensor) -> bool:
        # From the shape alone, no sync: a step has at most as many distinct experts as ids (the pull
        # needs min(E, ids) slots). A region of all E experts still sends a wider step (a prefill) to
        # the host path, whose copy engine and double buffering move whole layers faster than SM reads.
        return topk_ids.numel() <= self.slots

    def _pull(self, topk_ids: Tensor, expert_map: Tensor, counters: Tensor) -> None:
        torch.ops.moe_swap.expert_cache_pull(topk_ids, self.host_w13, self.host_w2, self.pool_w13, self.pool_w2, 0,
                                             self.slot_expert, self.slot_stamp, self.clock, expert_map, counters)

    def _routed(self, ids: Tensor) -> Tensor:
        # [E] bool: the experts in `ids`. An id outside [0, E) marks a spare entry instead: index_fill_
        # would fail on it with a device-side assert on CUDA (the CUDA context is lost), while the pull
        # skips it there (and raises on CPU, with a message naming it).
        ids = ids.flatten().long()
        ids = torch.where((ids >= 0) & (ids < self.num_experts), ids, self.num_experts)
        return torch.zeros(self.num_experts + 1, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)[:-1]

    def _on_device(self, ids: Tensor) -> Tensor:
        # ids may come from the CPU, as the host path takes them (the pull reads them on the pool's device)
        return ids if ids.device == self.pool_w13.device else ids.to(self.pool_w13.device, non_blocking=True)

    def predict(self, expert_ids: Tensor) -> None:
        if not self.fits(expert_ids):
            return  # a hint: a guess wider than the region is not pulled
        expert_ids = self._on_device(expert_ids)
        def pull() -> None:
            self._pull(expert_ids, self.predict_map, self.predict_counters)
            self.predicted |= self._routed(expert_ids)
            self.predict_counts[0] += 1
        if self.side_stream is not None and not torch.compiler.is_compiling():
            self.side_stream.wait_stream(torch.cuda.current_stream(self.side_stream.device))
            expert_ids.record_stream(self.side_stream)  # read there: not to be reused before
            with torch.cuda.stream(self.side_stream):
                pull()
            self._joined = False
        else:
            pull()
        self._predicted = True

    def moe(self, hidden_states: Tensor, topk_weights: Tensor, topk_ids: Tensor, activation: str,
            w13_bias: Optional[Tensor], w2_bias: Optional[Tensor], gated: bool, swiglu_alpha: float,
            swiglu_limit: float) -> Tensor:
        topk_ids = self._on_device(topk_ids)
        if not self._joined:
            torch.cuda.current_stream(self.side_stream.device).wait_stream(self.side_stream)
            self._joined = True
        if self._predicted:  # recall: the routed experts that were predicted, counted on the device
            self.predict_counts[3] += (self._routed(topk_ids) & self.predicted).sum()
            self.predicted.zero_()
            self._predicted = False
        self._pull(topk_ids, self.expert_map, self.counters)
        return torch.ops.moe_swap.fused_moe(hidden_states, self.pool_w13, self.pool_w2, topk_weights, topk_ids,
                                            self.expert_map, activation, w13_bias, w2_bias, gated, swiglu_alpha,
                                            swiglu_limit)

    def counts(self) -> dict:
        """The region's statistics, read from the device. A miss fills an empty slot or evicts, and a slot
        never empties again: evictions = misses (the steps' and the predictions') - slots ever filled."""
        if self.side_stream is not None:  # a prediction's pull may still be running there
            torch.cuda.current_stream(self.side_stream.device).wait_stream(self.side_stream)
        hits, misses = self.counters.tolist()
        predictions, _, copied_ahead, predicted_used = self.predict_counts.tolist()
        filled = int((self.slot_expert >= 0).sum())
        return {"device_steps": int(self.clock.item()) - predictions, "expert_hits": hits, "expert_misses": misses,
                "evictions": misses + copied_ahead - filled, "predicted": copied_ahead,
                "predicted_used": predicted_used, "bytes_copied": (misses + copied_ahead) * self.expert_bytes}


def _check_int64(name: str, value) -> int:
    """An integer argument as a Python int: any integer type but bool (no silent truncation of 2.5 or
    parsing of "3"), within int64 (what the op takes)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def check_policy_options(policy: str, mode: str, eviction: str = "flru", ids_path: str = "host",
                         copy_cost=None) -> tuple[Optional[float], Optional[float]]:
    """The streamer's choices, checked once for every entry point (WeightStreamer, offload, load, the CLI);
    returns ``copy_cost`` as (overhead_us, gb_per_s), both None when it is None."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (full: double-buffered streaming; sync: "
                         f"copy then compute, vLLM's legacy cpu offload; uva: kernels read pinned host "
                         f"memory), got {mode!r}")
    if policy != "full" and mode != "full":
        raise ValueError(f"policy={policy!r} needs mode='full' (copies on the copy engine), got mode={mode!r}")
    if eviction not in EVICTIONS:
        raise ValueError(f"eviction must be one of {', '.join(EVICTIONS)}, got {eviction!r}")
    if ids_path not in IDS_PATHS:
        raise ValueError(f"ids_path must be one of {', '.join(IDS_PATHS)}, got {ids_path!r}")
    if ids_path == "device" and policy == "full":
        raise ValueError("ids_path='device' needs policy 'on_demand' or 'auto' (policy 'full' moves whole "
                         "layers and reads no ids)")
    return _check_copy_cost(copy_cost, policy)


def _check_copy_cost(copy_cost, policy: str) -> tuple[Optional[float], Optional[float]]:
    """``copy_cost`` -> (overhead_us, gb_per_s), both None when it is None."""
    if copy_cost is None:
        return None, None
    if policy != "auto":
        raise ValueError(f"copy_cost is the cost model of policy 'auto'; got it with policy {policy!r}")
    if (isinstance(copy_cost, (str, bytes)) or not hasattr(copy_cost, "__len__") or len(copy_cost) != 2
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in copy_cost)):
        raise ValueError(f"copy_cost must be (overhead_us, gb_per_s), two numbers, got {copy_cost!r}")
    overhead_us, gb_per_s = float(copy_cost[0]), float(copy_cost[1])
    # bounds no machine comes near (a second per copy, 10 TB/s): beyond them the model's arithmetic and
    # cache_state()'s report of it stop meaning anything
    if not 0 <= overhead_us <= 1e6:
        raise ValueError(f"copy_cost: overhead_us (microseconds per copy) must be in [0, 1e6], got {copy_cost[0]!r}")
    if not 0 < gb_per_s <= 1e4:
        raise ValueError(f"copy_cost: gb_per_s (copy bandwidth, GB/s) must be in (0, 1e4], got {copy_cost[1]!r}")
    return overhead_us, gb_per_s


# ---- safetensors through a memory map ----

# What load_safetensors takes into the host store: floating and signed integer experts (and raw bytes).
_READER_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8")
# The one safetensors dtype table (the loader reads through it too); each reader decides what it accepts.
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64,
    "U64": torch.uint64, "F64": torch.float64,
}


def read_safetensors_header(path) -> tuple[int, dict[str, dict]]:
    """A safetensors file's header, checked against the file: ``(data_start, {name: entry})``, each
    entry's ``shape`` a list of ints >= 0 and its ``data_offsets`` ``[begin, end]`` inside the data,
    ``end - begin`` the shape's bytes. A corrupt or truncated file is a ValueError naming the file
    and the tensor, never a read outside a tensor's bytes."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise ValueError(f"{path}: safetensors header length {header_len} is past the end of the file "
                             f"({size} bytes): truncated or not a safetensors file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise ValueError(f"{where} must have 'dtype', 'shape' and 'data_offsets', got {meta!r}")
        shape, offsets = meta["shape"], meta["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{where}: shape must be a list of ints >= 0, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise ValueError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end <= {data_len} "
                             f"(the file's data bytes), got {offsets!r}")
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        itemsize = dtype.itemsize if dtype is not None else None
        if itemsize is not None and offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise ValueError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes but shape {shape} "
                             f"of {meta['dtype']} needs {math.prod(shape) * itemsize}")
        entries[name] = meta
    return data_start, entries


class _SafetensorsReader:
    """Reads safetensors files (header: u64 length + JSON; then the data) through a private memory
    map, handing out one zero-copy tensor at a time and dropping its pages after use."""

    def __init__(self, files) -> None:
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        self._maps: list[tuple[object, mmap.mmap, int]] = []
        self._index: dict[str, tuple[int, dict]] = {}
        try:
            for path in files:
                path = Path(path)
                data_start, header = read_safetensors_header(path)
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                self._maps.append((path, mm, data_start))
                for name, meta in header.items():
                    self._index[name] = (len(self._maps) - 1, meta)
        except Exception:
            self.close()
            raise

    def _meta(self, name: str) -> tuple[int, dict]:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the safetensors file(s) "
                           f"{[str(p) for p, _, _ in self._maps]}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._meta(name)[1]["dtype"]
        if code not in _READER_CODES:
            raise ValueError(f"tensor {name!r} has safetensors dtype {code}, not supported")
        return SAFETENSORS_DTYPES[code]

    def nbytes(self, name: str) -> int:
        begin, end = self._meta(name)[1]["data_offsets"]
        return end - begin

    def copy_out(self, name: str, consume) -> None:
        file_index, meta = self._meta(name)
        _, mm, data_start = self._maps[file_index]
        begin, end = meta["data_offsets"]
        dtype = self.dtype(name)
        count = (end - begin) // dtype.itemsize
        tensor = torch.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin).view(self.shape(name))
        consume(tensor)
        del tensor
        # Drop the pages just read: a mapped file's touched pages count as resident until unmapped.
        page = mmap.PAGESIZE
        lo = (data_start + begin) // page * page
        if end > begin:
            mm.madvise(mmap.MADV_DONTNEED, lo, data_start + end - lo)

    def close(self) -> None:
        for _, mm, _ in self._maps:
            mm.close()
        self._maps = []


def _progress_bar(total_bytes: int, progress: Optional[bool]):
    if progress is False or (progress is None and total_bytes < (1 << 30)):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="host store")
