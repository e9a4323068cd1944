"""Weight-streaming benchmark: full (double-buffered ring) against the sync and uva baselines.

A stack of L synthetic MoE layers with realistic shapes (Mixtral-8x7B: H=4096, I=14336, E=8;
Qwen3-30B-A3B: H=2048, I=768, E=128; H and I scaled down on CPU) is streamed through a
WeightStreamer, with a compute workload on each acquired slot that is tuned from copy-bound to
compute-bound (`--ratios`: compute time / copy time per layer). For each mode and ratio it reports
the step time (one pass over the L layers), bytes moved, achieved GB/s and the overlap ratio
step / max(copy, compute) (1.0 = perfect overlap; sum/max = no overlap), plus the peak copy rate of
one large copy (GPU: pinned host-to-device; CPU: a large single-thread memcpy), the copy ceiling.
On CPU it also reports the best overlap ratio the machine allows at that moment (a plain memcpy
thread beside the compute, no streamer): on a shared 2-core machine, the two threads may not get
two cores, and no streamer can beat that number.

Output: a table on stdout, JSON and a PNG timeline (copy and compute spans per layer over time)
in --out.

  python benchmarks/bench_stream.py --device cpu               # 1 compute thread + the copy thread
  python benchmarks/bench_stream.py --device cuda --model both
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import moe_swap  # noqa: E402
from moe_swap import WeightStreamer  # noqa: E402

MODELS = {  # name: (H, I, E) of the real model
    "mixtral": (4096, 14336, 8),
    "qwen3": (2048, 768, 128),
}
MODES = ("full", "sync", "uva")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_layer(H, I, E, dtype):
    """One random layer; the benchmark streams L copies of it (contents don't change the timing)."""
    gen = torch.Generator().manual_seed(0)
    w13 = torch.empty(E, 2 * I, H, dtype=dtype).uniform_(-0.05, 0.05, generator=gen)
    w2 = torch.empty(E, H, I, dtype=dtype).uniform_(-0.05, 0.05, generator=gen)
    return w13, w2


def compute_fn(kind: str):
    """The compute on one acquired layer: every token through every expert (a dense MoE, reading all
    of the slot's weights), or moe_swap.fused_moe with uniform routing when --compute fused_moe."""
    if kind == "fused_moe":
        def run(x, w13, w2, routing):
            return moe_swap.fused_moe(x, w13, w2, *routing)
        return run

    def run(x, w13, w2, routing):
        inter = w13.shape[1] // 2
        h = torch.matmul(x.unsqueeze(0), w13.transpose(1, 2))      # [E, T, 2I]
        a = torch.nn.functional.silu(h[..., :inter]) * h[..., inter:]
        return torch.matmul(a, w2.transpose(1, 2)).sum(0)          # [T, H]
    return run


def make_routing(tokens, num_experts, device):
    top_k = min(2, num_experts)
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)]).to(torch.int32)
    return torch.full((tokens, top_k), 1.0 / top_k, device=device), ids.to(device)


def time_fn(fn, device, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def peak_copy_rate(device: str, nbytes: int) -> float:
    """GB/s of one large copy: pinned host -> device on GPU; a plain memcpy (1 thread) on CPU."""
    if device.startswith("cuda"):
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(5):
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return nbytes / best / 1e9
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, repeats=5)
    return nbytes / seconds / 1e9


def stream_pass(s, num_layers, x, compute, routing):
    """One forward pass: acquire, compute on the slot's weights, release, for every layer."""
    for i in range(num_layers):
        w13, w2 = s.acquire(i)
        compute(x, w13, w2, routing)
        s.release(i)


def copy_pass(s, num_layers):
    """The copies alone: a sync streamer acquiring and releasing with no compute."""
    for i in range(num_layers):
        s.acquire(i)
        s.release(i)


def last_passes_spans(stats, num_layers, passes=2):
    holds = sorted(sp["start_us"] for sp in stats["trace"] if sp["kind"] == "hold")
    since = holds[-passes * num_layers] if len(holds) >= passes * num_layers else holds[0]
    return [sp for sp in stats["trace"] if sp["end_us"] >= since - 1]


def machine_parallel_pass(num_layers, src, dst, compute, x, resident, routing):
    """CPU only: plain threads, no streamer: L layer-sized memcpys in one thread while the main thread
    computes L layers. Divided by max(copy, compute) it is the best overlap ratio this machine allows
    right now (on a busy shared machine the two threads may not get two cores)."""
    import threading

    def copies():
        for _ in range(num_layers):
            dst.copy_(src)  # torch releases the GIL inside ops

    t = threading.Thread(target=copies)
    t.start()
    for _ in range(num_layers):
        compute(x, *resident, routing)
    t.join()


MAX_TOKENS = 32768  # bounds the [E, T, 2I] intermediate of the dense workload


def calibrate_tokens(layer, device, compute, dtype, ratio, copy_layer_s):
    """Tokens for which compute on one layer takes about ratio * (copy time of one layer). Refined a
    few times: at small T the workload is bound by reading the weights, not linear in T."""
    H, E = layer[0].shape[2], layer[0].shape[0]
    target = ratio * copy_layer_s
    tokens = 64
    for _ in range(4):
        x = torch.randn(tokens, H, dtype=dtype, device=device)
        routing = make_routing(tokens, E, device)
        seconds = time_fn(lambda: compute(x, *layer, routing), device, repeats=2)
        new = max(1, min(MAX_TOKENS, int(round(tokens * target / seconds))))
        if abs(new - tokens) <= max(1, tokens // 20):
            return new
        tokens = new
    return tokens


class Budget:
    """Wall-clock budget (GPU check: the script has a hard timeout); a run that would not fit in its
    share is cut to fewer passes or skipped, and says so in the JSON."""

    def __init__(self, seconds):
        self.deadline = None if seconds is None else time.perf_counter() + seconds

    def share(self, runs_left):
        if self.deadline is None:
            return float("inf")
        return max(0.0, self.deadline - time.perf_counter()) / max(1, runs_left)

    def passes_for(self, est_round_s, runs_left, wanted):
        if self.deadline is None:
            return wanted
        return min(wanted, int(self.share(runs_left) / max(est_round_s, 1e-6)) - 1)  # -1: the warm-up round


def probe_pass_time(s, num_layers, device, x, compute, routing):
    """One layer acquired, computed and released, times L: a cheap estimate of one pass."""
    synchronize(device)
    t0 = time.perf_counter()
    w13, w2 = s.acquire(0)
    compute(x, w13, w2, routing)
    s.release(0)
    synchronize(device)
    return (time.perf_counter() - t0) * num_layers


def plot_timeline(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    modes = [m for m in MODES if m in results]
    fig, axes = plt.subplots(len(modes), 1, figsize=(14, 2.3 * len(modes) + 0.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    t0 = min(sp["start_us"] for m in modes for sp in results[m]["spans"]) if modes else 0
    for ax, mode in zip(axes[:, 0], modes):
        spans = results[mode]["spans"]
        m0 = min(sp["start_us"] for sp in spans)
        lanes = {"copy": 1.0, "hold": 0.0}
        for sp in spans:
            start = (sp["start_us"] - m0) / 1e3
            width = max((sp["end_us"] - sp["start_us"]) / 1e3, 1e-3)
            if sp["kind"] == "wait":
                if width > 0.02:
                    ax.broken_barh([(start, width)], (-0.62, 0.16), facecolors="red")
                continue
            y = lanes[sp["kind"]]
            ax.broken_barh([(start, width)], (y - 0.35, 0.7), facecolors=cmap(sp["layer"] % 10),
                           edgecolors="black", linewidth=0.4)
            if width > 0:
                ax.text(start + width / 2, y, f"L{sp['layer']}", ha="center", va="center", fontsize=7, clip_on=True)
        r = results[mode]
        ax.set_yticks([-0.54, 0, 1], ["waiting", "compute\n(acquire→release)", "copy engine" if mode == "full" else
                               ("copy (compute stream)" if mode == "sync" else "copy (none)")])
        ax.set_ylim(-0.75, 1.5)
        label = {"full": "full (ring + prefetch)", "sync": "sync BASELINE (vLLM legacy cpu_offload_gb)",
                 "uva": "uva BASELINE (kernels read pinned host memory)"}[mode]
        ax.set_title(f"{label}: step {r['step_s'] * 1e3:.1f} ms, overlap ratio {r['overlap_ratio']:.2f}",
                     fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("time (ms), two consecutive forward passes")
    fig.legend(handles=[Patch(color="red", label="compute waiting on a copy")], loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=[*MODELS, "both"], default="both")
    p.add_argument("--layers", type=int, default=None, help="streamed layers (default 4)")
    p.add_argument("--scale", type=int, default=None,
                   help="divide H and I by this (default: 1 on GPU, 16 for mixtral / 8 for qwen3 on CPU)")
    p.add_argument("--ratios", default="0.25,1,4", help="compute/copy time ratios to run (copy-bound..compute-bound)")
    p.add_argument("--passes", type=int, default=None,
                   help="timed passes per kind (default 5 on GPU; 15 on CPU, where other processes' load is noisy)")
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--prefetch-depth", type=int, default=1)
    p.add_argument("--compute", choices=["auto", "matmul", "fused_moe"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch compute threads on CPU (the copy engine is one more)")
    p.add_argument("--out", default="bench_results/stream", help="folder, or a .json file path")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="wall-clock budget; runs that would not fit get fewer passes or are skipped "
                        "(default: 75 on GPU, for scripts/gpu_check.sh's 90 s timeout; none on CPU)")
    args = p.parse_args(argv)

    device = args.device
    on_gpu = device.startswith("cuda")
    if args.passes is None:
        args.passes = 5 if on_gpu else 15
    if args.max_seconds is None:
        args.max_seconds = 75.0 if on_gpu else 0.0
    if not on_gpu:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    compute_kind = args.compute
    if compute_kind == "auto":
        compute_kind = "matmul"
        try:  # use the real MoE kernel once it is merged in
            x = torch.randn(2, 8, dtype=dtype, device=device)
            moe_swap.fused_moe(x, torch.randn(2, 8, 8, dtype=dtype, device=device),
                               torch.randn(2, 8, 4, dtype=dtype, device=device),
                               torch.ones(2, 1, device=device), torch.zeros(2, 1, dtype=torch.int32, device=device))
            compute_kind = "fused_moe"
        except Exception:
            pass
    compute = compute_fn(compute_kind)
    ratios = [float(r) for r in args.ratios.split(",")]
    out = Path(args.out)  # a folder, or a .json path (PNGs go beside it)
    json_path = out if out.suffix == ".json" else out / f"bench_stream_{'gpu' if device.startswith('cuda') else 'cpu'}.json"
    png_dir = json_path.parent
    png_dir.mkdir(parents=True, exist_ok=True)
    models = list(MODELS) if args.model == "both" else [args.model]

    report = {"device": device, "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
              "torch": torch.__version__, "compute": compute_kind, "threads": None if on_gpu else args.threads,
              "slots": args.slots, "prefetch_depth": args.prefetch_depth, "passes": args.passes, "models": {}}
    peak_bytes = (1 << 30) if on_gpu else (256 << 20)
    report["peak_copy_GBps"] = peak = peak_copy_rate(device, peak_bytes)
    print(f"peak copy rate ({'pinned H2D, 1 GiB' if on_gpu else 'memcpy 256 MiB, 1 thread'}): {peak:.2f} GB/s")

    budget = Budget(args.max_seconds if args.max_seconds > 0 else None)
    runs_left = len(models) * len(ratios)
    for model in models:
        if budget.share(1) < 15.0:  # setting up a model (pinning and filling its layers) takes seconds
            print(f"\n== {model}: skipped (time budget)")
            report["models"][model] = {"skipped": "time budget"}
            runs_left -= len(ratios)
            continue
        H, I, E = MODELS[model]
        scale = args.scale or (1 if on_gpu else (16 if model == "mixtral" else 8))
        H, I = H // scale, I // scale
        L = args.layers or 4
        w13, w2 = make_layer(H, I, E, dtype)
        layer_bytes = w13.nbytes + w2.nbytes
        resident = (w13.to(device), w2.to(device))  # for the compute-only reference
        print(f"\n== {model}: L={L} H={H} I={I} E={E} {dtype} ({layer_bytes / 2**20:.1f} MiB/layer, "
              f"{L * layer_bytes / 2**30:.2f} GiB streamed per step), compute={compute_kind}")
        rows = {ratio: {"ratio_target": ratio, "modes": {}} for ratio in ratios}
        spans = {ratio: {} for ratio in ratios}
        streamers = {}
        try:
            for mode in MODES:
                streamers[mode] = WeightStreamer(device, slots=args.slots, prefetch_depth=args.prefetch_depth,
                                                 mode=mode, trace=True)
                for _ in range(L):
                    streamers[mode].add_layer(w13, w2)
            sync_s = streamers["sync"]
            copy_pass(sync_s, L)
            copy_probe_s = time_fn(lambda: copy_pass(sync_s, L), device, repeats=2)
            if not on_gpu:
                src = torch.empty(layer_bytes, dtype=torch.uint8).fill_(1)
                dst = torch.empty_like(src)
            for ratio in ratios:
                row = rows[ratio]
                runs_left -= 1
                row["tokens"] = tokens = calibrate_tokens(resident, device, compute, dtype, ratio, copy_probe_s / L)
                x = torch.randn(tokens, H, dtype=dtype, device=device)
                routing = make_routing(tokens, E, device)
                # Every kind of pass, interleaved round-robin below so that a shared machine's changing
                # load falls on all of them alike; each reports its best pass.
                kinds = {"copy": lambda: copy_pass(sync_s, L),
                         "compute": lambda: [compute(x, *resident, routing) for _ in range(L)]}
                if not on_gpu:
                    kinds["machine"] = lambda: machine_parallel_pass(L, src, dst, compute, x, resident, routing)
                for mode in MODES:
                    kinds[mode] = (lambda s: lambda: stream_pass(s, L, x, compute, routing))(streamers[mode])
                estimate = {k: time_fn(f, device, repeats=1) for k, f in kinds.items() if k not in MODES}
                share = budget.share(runs_left + 1)
                for mode in MODES:
                    if mode == "uva" and on_gpu:
                        # A GEMM re-reads each weight tile about once per 128 tokens; in uva each read
                        # crosses PCIe. Don't even probe when that alone would blow the budget.
                        guess = L * layer_bytes * max(1.0, tokens / 128) / (peak * 1e9)
                        if guess * 3 > share:
                            estimate[mode] = guess
                            continue
                    estimate[mode] = probe_pass_time(streamers[mode], L, device, x, compute, routing)
                # uva on a GPU re-reads host memory over PCIe for every tile and can be very slow: when a
                # warm-up and two passes of everything would not fit the budget, it is left out first.
                if sum(estimate.values()) * 3 > share:
                    row["modes"]["uva"] = {"skipped": f"time budget: a pass takes ~{estimate['uva']:.1f} s"}
                    print(f"  uva at compute/copy {ratio:g}: skipped (a pass takes ~{estimate['uva']:.1f} s)")
                    del kinds["uva"], estimate["uva"]
                passes = budget.passes_for(sum(estimate.values()), runs_left + 1, args.passes)
                if passes < 1:
                    print(f"  compute/copy {ratio:g}: skipped (time budget)")
                    row["skipped"] = "time budget"
                    continue
                for f in kinds.values():
                    f()  # warm-up round: fills every pipeline
                synchronize(device)
                times = {k: [] for k in kinds}
                moved = {m: [0, 0.0] for m in MODES}  # bytes copied, compute-stream wait ms: streamed passes only
                order = list(kinds)
                for p in range(passes):
                    for k in order[p % len(order):] + order[:p % len(order)]:
                        before = streamers[k].stats() if k in MODES else None
                        synchronize(device)
                        t0 = time.perf_counter()
                        kinds[k]()
                        synchronize(device)
                        times[k].append(time.perf_counter() - t0)
                        if before is not None:  # (the copy-only passes also run on the sync streamer)
                            after = streamers[k].stats()
                            moved[k][0] += after["bytes_copied"] - before["bytes_copied"]
                            moved[k][1] += after["wait_ms"] - before["wait_ms"]
                row["copy_s"], row["compute_s"] = min(times["copy"]), min(times["compute"])
                row["copy_GBps"] = L * layer_bytes / row["copy_s"] / 1e9
                ideal = max(row["copy_s"], row["compute_s"])
                if "machine" in times:
                    row["machine_best_overlap_ratio"] = min(times["machine"]) / ideal
                for mode in MODES:
                    if mode not in kinds:
                        continue
                    s = streamers[mode]
                    synchronize(device)
                    for _ in range(2):  # two consecutive passes for the timeline (the timed ones are interleaved)
                        stream_pass(s, L, x, compute, routing)
                    synchronize(device)
                    s.synchronize()
                    after = s.stats()
                    step = min(times[mode])
                    r = {"step_s": step, "step_s_median": statistics.median(times[mode]), "step_s_all": times[mode],
                         "passes": passes,
                         "bytes_per_step": moved[mode][0] / passes, "wait_ms_per_step": moved[mode][1] / passes,
                         "overlap_ratio": step / ideal, "host_bytes": s.host_bytes, "device_bytes": s.device_bytes}
                    r["GBps"] = r["bytes_per_step"] / step / 1e9
                    row["modes"][mode] = r
                    spans[ratio][mode] = dict(r, spans=last_passes_spans(after, L))
        finally:
            for st in streamers.values():
                st.close()
        for ratio in ratios:
            row = rows[ratio]
            if "step_s" in row["modes"].get("sync", {}) and "step_s" in row["modes"].get("full", {}):
                row["speedup_full_vs_sync"] = row["modes"]["sync"]["step_s"] / row["modes"]["full"]["step_s"]
            if "copy_s" not in row:
                continue
            png = png_dir / f"timeline_{model}_ratio{ratio:g}_{'gpu' if on_gpu else 'cpu'}.png"
            plot_timeline(spans[ratio], png, f"{model} (H={H}, I={I}, E={E}, L={L}, {dtype}), compute/copy = "
                          f"{row['compute_s'] / row['copy_s']:.2f}, {report['device_name']}")
            row["timeline_png"] = str(png)
        rows = [rows[r] for r in ratios]
        report["models"][model] = {"H": H, "I": I, "E": E, "layers": L, "scale": scale, "layer_bytes": layer_bytes,
                                   "rows": rows}
        print(f"{'compute/copy':>12} {'tokens':>6} {'copy ms':>8} {'comp ms':>8} | "
              + " | ".join(f"{m + ' step ms':>13} {'GB/s':>6} {'overlap':>7}" for m in MODES)
              + " | full vs sync" + ("" if on_gpu else " | machine best overlap"))
        for row in rows:
            if "copy_s" not in row:
                print(f"{row['ratio_target']:>12} skipped: {row.get('skipped')}")
                continue
            cells = []
            for m in MODES:
                r = row["modes"].get(m, {})
                cells.append(f"{r['step_s'] * 1e3:>13.2f} {r['GBps']:>6.2f} {r['overlap_ratio']:>7.2f}" if "step_s" in r
                             else f"{'skipped':>13} {'':>6} {'':>7}")
            speedup = f"{row['speedup_full_vs_sync']:.2f}x" if "speedup_full_vs_sync" in row else "-"
            print(f"{row['compute_s'] / row['copy_s']:>12.2f} {row['tokens']:>6} {row['copy_s'] * 1e3:>8.2f} "
                  f"{row['compute_s'] * 1e3:>8.2f} | " + " | ".join(cells) + f" | {speedup}"
                  + (f" | {row['machine_best_overlap_ratio']:.2f}" if "machine_best_overlap_ratio" in row else ""))
        json_path.write_text(json.dumps(report, indent=1))  # after each model: a timeout keeps what finished
        del resident

    json_path.write_text(json.dumps(report, indent=1))
    print(f"\nJSON: {json_path}\nPNG timelines: {png_dir}/timeline_*.png")
    return report


if __name__ == "__main__":
    main()
