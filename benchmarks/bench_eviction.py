"""Hit rate of the on_demand expert cache per eviction policy (lru, lfu, flru), on bench_expert's traces.

Hit rates depend only on the routing and the cache size, not on the expert shapes, so the experts
here are tiny and no compute runs: each step is acquire_experts/release_experts per layer, with a
cache of bench_expert.CACHE_SHARE (25%) of all streamed experts, as in bench_expert.

    python benchmarks/bench_eviction.py [--out bench_results/eviction.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_expert  # noqa: E402  (same traces and shapes as the streaming benchmark)

from moe_swap import WeightStreamer  # noqa: E402

EVICTIONS = ("lru", "lfu", "flru")


def trace_for(kind: str, shape: str, layers: int, experts: int, top_k: int, batch: int, steps: int):
    if kind != "recorded":
        return bench_expert.synthetic_trace(kind, layers, experts, top_k, batch, steps, seed=batch)
    trace, _ = bench_expert.recorded_trace(shape, batch, steps)
    repeats = -(-layers // trace.shape[1])  # the demo model may have fewer layers: cycle them
    return trace.repeat(1, repeats, 1, 1)[:, :layers]


def hit_rate(trace: torch.Tensor, eviction: str, experts: int, layers: int, warm_steps: int) -> float:
    w13, w2 = torch.randn(experts, 16, 16), torch.randn(experts, 16, 8)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    cache_bytes = int(bench_expert.CACHE_SHARE * layers * experts) * expert_bytes
    with WeightStreamer("cpu", policy="on_demand", cache_bytes=cache_bytes, eviction=eviction) as s:
        for _ in range(layers):
            s.add_layer(w13, w2)
        for step in range(trace.shape[0]):
            if step == warm_steps:  # count after the warm-up, as bench_expert does
                warm = s.stats()
            for layer in range(layers):
                s.acquire_experts(layer, trace[step, layer])
                s.release_experts(layer)
        end = s.stats()
    hits = end["expert_hits"] - warm["expert_hits"]
    misses = end["expert_misses"] - warm["expert_misses"]
    return 100.0 * hits / max(hits + misses, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warm-steps", type=int, default=8)
    parser.add_argument("--out", default="bench_results/eviction.json")
    args = parser.parse_args()
    rows = []
    print("| shape | trace | batch | " + " | ".join(f"{e} hit %" for e in EVICTIONS) + " |")
    print("|---|---|---|" + "---|" * len(EVICTIONS))
    for shape in ("mixtral", "qwen3"):
        (_, _, experts, top_k), _ = bench_expert.SHAPES[shape]
        for batch in (1, 4, 8):
            for kind in ("skewed", "recorded", "uniform"):
                trace = trace_for(kind, shape, args.layers, experts, top_k, batch, args.steps)
                rates = {e: hit_rate(trace, e, experts, args.layers, args.warm_steps) for e in EVICTIONS}
                rows.append(dict(shape=shape, trace=kind, batch=batch, **rates))
                print(f"| {shape} | {kind} | {batch} | " + " | ".join(f"{rates[e]:.1f}" for e in EVICTIONS) + " |",
                      flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(cache_share=bench_expert.CACHE_SHARE, layers=args.layers, steps=args.steps,
                                   warm_steps=args.warm_steps, rows=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
