"""The planner: from a GPU memory budget to a placement of MoE layers (pure Python, no torch).

Which layers' experts stay resident on the device, which are streamed from pinned host memory
through the ScratchRing, and how many slots the ring has. The budget covers the model's weights
(everything that is not a routed expert, the resident experts, and the ring's slots), not the
activations or the KV cache: leave room for those.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def parse_bytes(value: Union[int, str], name: str = "gpu_budget") -> int:
    """``20 * 2**30``, ``"20GiB"``, ``"512MB"``, ``"1.5 GB"``, ``"4096"`` -> bytes (int).

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB, and the bare
    K, M, G, T) powers of 1024.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a byte count (int) or a string such as '20GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 bytes, got {value}")
        return value
    if isinstance(value, float):
        if not (0 <= value < float("inf")):  # NaN fails this too
            raise ValueError(f"{name} must be a finite number of bytes >= 0, got {value}")
        if not value.is_integer():  # 1.5 is far more likely to mean 1.5 GiB than 1 byte
            raise ValueError(f"{name}={value!r} is not a whole number of bytes; give a size with its unit, e.g. "
                             f"'{value:g}GiB' or '{value:g}GB', or an int")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a byte count (int) or a string such as '20GiB', "
                         f"got {type(value).__name__} {value!r}")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{name}={value!r} is not a size; expected e.g. 20GiB, 512MB, 1.5GB or a "
                         f"number of bytes (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = float(match.group(1)) * _UNITS[unit]
    if size == float("inf"):
        raise ValueError(f"{name}={value!r} is too large to be a number of bytes")
    return int(size)


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``1536 -> '1.50 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def spread(num_layers: int, num_picked: int) -> list[int]:
    """``num_picked`` positions out of ``num_layers``, spaced as evenly as possible.

    Streamed layers are spread out so that each copy has the compute of the resident layers
    between them to hide under, instead of bunching the copies together.
    """
    if not 0 <= num_picked <= num_layers:
        raise ValueError(f"num_picked must be in [0, {num_layers}], got {num_picked}")
    return [int((i + 0.5) * num_layers / num_picked) for i in range(num_picked)]


@dataclass
class Plan:
    """Where each MoE layer's experts live. Layer positions index the list of MoE layers."""

    resident: list[int]
    streamed: list[int]
    slots: int  # ScratchRing slots (0 when nothing is streamed, and under policy on_demand)
    slot_bytes: int  # bytes of one slot: the largest streamed layer
    base_bytes: int  # non-expert weights on the device
    resident_expert_bytes: int
    budget: Optional[int]
    warnings: list[str] = field(default_factory=list)
    cache_bytes: int = 0  # policy on_demand: the expert cache (kept between steps)

    @property
    def device_bytes(self) -> int:
        """Planned device memory for weights: non-expert + resident experts + ring slots + expert cache."""
        return self.base_bytes + self.resident_expert_bytes + self.slots * self.slot_bytes + self.cache_bytes


def plan_placement(
    layer_bytes: Sequence[int],
    base_bytes: int,
    gpu_budget: Union[None, int, str] = None,
    slots: int = 2,
    policy: str = "full",
    ids_path: str = "host",
) -> Plan:
    """Decide which MoE layers stay resident and which are streamed.

    Args:
        layer_bytes: bytes of each MoE layer's routed experts, in forward order.
        base_bytes: bytes of everything that stays on the device regardless (embeddings, attention,
            norms, routers, shared experts, dense layers).
        gpu_budget: bytes for weights on the device (int or a string such as ``"20GiB"``), or None to
            stream every MoE layer.
        slots: ScratchRing slots (>= 2: one computing, one filling).
        policy: ``"full"`` (streamed layers pass through ``slots`` ring slots) or ``"on_demand"``
            (routed experts pass through an expert cache). On demand, the streamed layers need room
            for one step's working set -- at most one whole layer (a prefill touches every expert) --
            instead of ``slots`` layers, and every byte left over goes to the expert cache; with no
            budget the cache gets the bytes that ``full`` would give the ring (``slots`` layers).
        ids_path: ``"device"``: with no budget the cache also gets the host path's room for wide steps
            (see :func:`split_device_cache`), so that the device regions get ``slots`` layers' bytes.

    The fewest layers are streamed that make the rest fit; they are spread evenly. A budget that
    holds every expert streams nothing (with a warning); one too small for the non-expert weights
    plus ``slots`` copies (on demand: one copy) of the largest layer raises ``ValueError`` naming the
    minimum.
    """
    if policy not in ("full", "on_demand", "auto"):
        raise ValueError(f"policy must be 'full', 'on_demand' or 'auto', got {policy!r}")
    on_demand = policy != "full"  # auto places like on_demand
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 2:
        raise ValueError(f"slots must be an int >= 2 (one slot computing while the next fills), got {slots!r}")
    layer_bytes = [int(b) for b in layer_bytes]
    if any(b <= 0 for b in layer_bytes):
        raise ValueError(f"layer_bytes must all be > 0, got {layer_bytes}")
    if base_bytes < 0:
        raise ValueError(f"base_bytes must be >= 0, got {base_bytes}")
    num_layers = len(layer_bytes)
    if num_layers == 0:
        return Plan([], [], 0, 0, base_bytes, 0, None,
                    ["the model has no MoE layers; nothing was offloaded"])

    if gpu_budget is None:
        if on_demand:
            host_room = host_path_room(policy, max(layer_bytes)) if ids_path == "device" else 0
            return Plan([], list(range(num_layers)), 0, 0, base_bytes, 0, None,
                        cache_bytes=slots * max(layer_bytes) + host_room)
        return Plan([], list(range(num_layers)), slots, max(layer_bytes), base_bytes, 0, None)

    budget = parse_bytes(gpu_budget)
    everything = base_bytes + sum(layer_bytes)
    if budget >= everything:
        return Plan(list(range(num_layers)), [], 0, 0, base_bytes, sum(layer_bytes), budget,
                    [f"gpu_budget={format_bytes(budget)} ({budget:,} bytes) holds every expert (the whole model needs "
                     f"{format_bytes(everything)}); no layer is streamed, nothing was offloaded"])

    copies = 1 if on_demand else slots
    minimum = base_bytes + copies * max(layer_bytes)
    if budget < minimum:
        what = ("one step's working set (at most the largest MoE layer, " if on_demand
                else f"{slots} slots of the largest MoE layer (")
        raise ValueError(
            f"gpu_budget={format_bytes(budget)} ({budget} bytes) is too small: the non-expert weights "
            f"({format_bytes(base_bytes)}) plus {what}{format_bytes(max(layer_bytes))} each) need at least "
            f"{format_bytes(minimum)} ({minimum} bytes)"
        )

    for num_streamed in range(1, num_layers + 1):
        streamed = spread(num_layers, num_streamed)
        streamed_set = set(streamed)
        resident = [i for i in range(num_layers) if i not in streamed_set]
        slot_bytes = max(layer_bytes[i] for i in streamed)
        resident_bytes = sum(layer_bytes[i] for i in resident)
        if base_bytes + resident_bytes + copies * slot_bytes <= budget:
            if on_demand:
                return Plan(resident, streamed, 0, 0, base_bytes, resident_bytes, budget,
                            cache_bytes=budget - base_bytes - resident_bytes)
            return Plan(resident, streamed, slots, slot_bytes, base_bytes, resident_bytes, budget)
    raise AssertionError("streaming every layer fits by the minimum check above")


def host_path_room(policy: str, largest_layer_bytes: int) -> int:
    """ids_path="device": the bytes the host path keeps for wide steps (a prefill): one layer, two under
    auto (its double buffering)."""
    return (2 if policy == "auto" else 1) * largest_layer_bytes


def split_device_cache(cache_bytes: int, policy: str, layer_experts: Sequence[int],
                       expert_bytes: Sequence[int]) -> tuple[int, list[int]]:
    """ids_path="device": the expert cache's split, ``(host_bytes, region_slots)``: the host path first
    gets its room for wide steps (at most ``cache_bytes``), the rest is divided evenly over the layers,
    each layer's region ``min(E, its share // bytes per expert)`` slots (0: no region)."""
    largest = max(e * b for e, b in zip(layer_experts, expert_bytes))
    host_bytes = min(cache_bytes, host_path_room(policy, largest))
    share = (cache_bytes - host_bytes) // len(layer_experts)
    return host_bytes, [min(e, share // b) for e, b in zip(layer_experts, expert_bytes)]
