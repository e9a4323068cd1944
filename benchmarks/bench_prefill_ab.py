"""Prefill under policy `auto` against `full`, A/B in one process (bench_expert's prefill step).

A `full` and an `auto` WeightStreamer live side by side over the same layers; prefill passes
(`--tokens` uniform-routed tokens through `--layers` layers, every expert touched) alternate
full/auto, auto/full, ... so that a shared machine's load falls on both alike. Per pass: wall time
and the main thread's CPU time (time.thread_time: the compute and the streamer's host work, not the
copy engine's thread). Reported: medians, minima and the median of the per-pair auto/full ratios.

  python benchmarks/bench_prefill_ab.py                    # CPU, bench_expert's shapes scaled by 16
  python benchmarks/bench_prefill_ab.py --shapes qwen3 --pairs 600
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_expert  # noqa: E402


def ab(shape: str, pairs: int, layers: int, tokens: int, scale: int, dtype: torch.dtype, device: str) -> dict:
    (H, I, E, top_k), _ = bench_expert.SHAPES[shape]
    H, I = H // scale, I // scale
    weights = bench_expert.make_layers(H, I, E, layers, dtype)
    expert_bytes = 3 * H * I * dtype.itemsize
    cache_bytes = int(bench_expert.CACHE_SHARE * layers * E) * expert_bytes
    trace = bench_expert.synthetic_trace("uniform", layers, E, top_k, tokens, 1, seed=7)
    hidden = (torch.randn(tokens, H) * 0.1).to(dtype).to(device)
    load = os.getloadavg()[0]
    streamers = {p: bench_expert.make_streamer(p, device, weights, cache_bytes) for p in ("full", "auto")}
    try:
        for policy, s in streamers.items():  # warm-up: pool, calibration, first copies
            for _ in range(3):
                bench_expert.run_steps(s, policy, trace, hidden, device)
        wall = {"full": [], "auto": []}
        cpu = {"full": [], "auto": []}
        for i in range(pairs):
            for policy in (("full", "auto") if i % 2 == 0 else ("auto", "full")):
                bench_expert.synchronize(device)
                t, c = time.perf_counter(), time.thread_time()
                bench_expert.run_steps(streamers[policy], policy, trace, hidden, device)
                bench_expert.synchronize(device)
                wall[policy].append((time.perf_counter() - t) * 1e3)
                cpu[policy].append((time.thread_time() - c) * 1e3)
        model = streamers["auto"].cache_state()
        stats = streamers["auto"].stats()
    finally:
        for s in streamers.values():
            s.close()
    med = statistics.median
    return {
        "shape": shape, "pairs": pairs, "load_before": load, "load_after": os.getloadavg()[0],
        "copy_overhead_us": model["copy_overhead_us"], "copy_gb_per_s": model["copy_gb_per_s"],
        "layer_copies": stats["layer_copies"], "predicted": stats["predicted"],
        **{f"{k}_{p}_ms": med(v[p]) for k, v in (("wall", wall), ("cpu", cpu)) for p in v},
        **{f"{k}_{p}_min_ms": min(v[p]) for k, v in (("wall", wall), ("cpu", cpu)) for p in v},
        "wall_ratio": med([a / f for a, f in zip(wall["auto"], wall["full"])]),
        "cpu_ratio": med([a / f for a, f in zip(cpu["auto"], cpu["full"])]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default="qwen3,mixtral")
    p.add_argument("--pairs", type=int, default=None, help="full/auto pass pairs (default: 300 qwen3, 60 mixtral)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--scale", type=int, default=16, help="divide the real H and I by this")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--threads", type=int, default=1, help="torch compute threads on CPU (the copy engine is one more)")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    for shape in args.shapes.split(","):
        pairs = args.pairs or (300 if shape == "qwen3" else 60)
        r = ab(shape, pairs, args.layers, args.tokens, args.scale, getattr(torch, args.dtype), args.device)
        print(f"{shape}: {pairs} pairs, load {r['load_before']:.2f} -> {r['load_after']:.2f}; auto's cost model "
              f"{r['copy_overhead_us']} us per copy, {r['copy_gb_per_s']:.1f} GB/s; whole-layer copies on demand "
              f"{r['layer_copies']}, experts copied ahead {r['predicted']}")
        for k in ("wall", "cpu"):
            print(f"  {k:4} ms: median full {r[f'{k}_full_ms']:.2f} auto {r[f'{k}_auto_ms']:.2f} (min "
                  f"{r[f'{k}_full_min_ms']:.2f} / {r[f'{k}_auto_min_ms']:.2f}); per-pair auto/full median "
                  f"{r[f'{k}_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
