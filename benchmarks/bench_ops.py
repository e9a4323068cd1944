"""fused_moe side by side with transformers' own experts forward, and the machine's ceilings.

One run measures everything it compares, so the ratios are between numbers taken under the same
conditions:

CPU  fused_moe vs transformers' experts forward (`eager`, `grouped_mm`) on the same weights, at
     decode (T=1, 4), middle (T=64) and prefill (T=512), Mixtral-like and Qwen3-like shapes, plus a
     plain matmul of the same FLOPs and a plain memory copy as ceilings.
GPU  (when CUDA is available) decode bandwidth over the selected experts' bytes as a fraction of a
     device-to-device copy; prefill TFLOP/s as a fraction of a large bf16 matmul; vs `grouped_mm`.

Every call gets a fresh routing (cycled from a pre-drawn set), so weights come from memory as they
would in a model, not from a cache warmed by the previous call. Implementations are interleaved call
by call, so load from other processes hits them alike. Times are medians.

    python benchmarks/bench_ops.py                      # GPU if present, else CPU (both dtypes)
    python benchmarks/bench_ops.py --sections cpu,gpu   # both
    python benchmarks/bench_ops.py --dtypes bfloat16 --out bench_results/cpu_bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import moe_swap  # noqa: E402

CPU_SHAPES = {
    # name: (hidden H, intermediate I, experts E, top_k k)
    "mixtral-like": (1024, 2816, 8, 2),
    "qwen3-like": (1024, 384, 64, 8),
}
CPU_TOKENS = {"decode": [1, 4], "middle": [64], "prefill": [512]}
GPU_SHAPES = {
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}
GPU_TOKENS = {"decode": [1, 4], "prefill": [4096]}
NUM_ROUTINGS = 8


def hf_experts(hidden, inter, num_experts, top_k, w13, w2):
    """transformers' Mixtral experts module holding w13/w2 (the same [E,2I,H] / [E,H,I] layout)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
                           num_experts_per_tok=top_k)
    module = MixtralExperts(config).to(device=w13.device, dtype=w13.dtype)
    module.gate_up_proj.data = w13
    module.down_proj.data = w2
    module.requires_grad_(False)

    def run(implementation):
        def forward(x, weights, ids):
            module.config._experts_implementation = implementation
            return module(x, ids, weights)
        return forward
    return {"hf_eager": run("eager"), "hf_grouped_mm": run("grouped_mm")}


def make_routings(num_tokens, num_experts, top_k, device, count=NUM_ROUTINGS):
    routings = []
    for _ in range(count):
        probs = torch.rand(num_tokens, num_experts, device=device)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        # int32 ids for fused_moe, int64 for transformers (its one_hot needs them), made once here.
        routings.append(((weights / weights.sum(-1, keepdim=True)).float(), ids.int(), ids.long()))
    return routings


def time_interleaved(fns, args_cycle, sync, min_runs=5, min_seconds=1.0, max_runs=200, warmup=2):
    """Median seconds per call of each fn, the fns interleaved call by call."""
    samples = {name: [] for name in fns}
    for i in range(warmup):
        for fn in fns.values():
            fn(*args_cycle[i % len(args_cycle)])
    sync()
    start = time.perf_counter()
    i = 0
    while i < max_runs and (i < min_runs or time.perf_counter() - start < min_seconds * len(fns)):
        args = args_cycle[i % len(args_cycle)]
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn(*args)
            sync()
            samples[name].append(time.perf_counter() - t0)
        i += 1
    return {name: statistics.median(s) for name, s in samples.items()}, i


def time_cuda(fn, runs=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def selected_expert_bytes(routings, w13, w2):
    per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    distinct = [len(torch.unique(r[1])) for r in routings]
    return statistics.mean(distinct) * per_expert


def run_cpu(dtypes, quick):
    records = []
    dev = "cpu"
    # Ceiling 1: a plain memory copy, bigger than the last-level cache.
    copy_bytes = 512 * 2**20
    src = torch.empty(copy_bytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    copy_time, _ = time_interleaved({"copy": lambda: dst.copy_(src)}, [()], lambda: None, min_seconds=0.5)
    copy_rate = 2 * copy_bytes / copy_time["copy"]  # bytes read + written per second
    del src, dst
    print(f"\nCPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; copy {copy_rate / 1e9:.1f} GB/s (read+write)")
    header = (f"{'shape':13} {'dtype':8} {'T':>4} | {'fused_moe ms':>12} {'hf_eager ms':>11} {'hf_grouped ms':>13} "
              f"| {'x eager':>7} {'x grouped':>9} | {'GFLOP/s':>8} {'mm f32':>7} {'mm dt':>7} {'%mm':>5} | "
              f"{'GB/s':>6} {'%copy':>5}")
    print(header)
    print("-" * len(header))
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for shape_name, (hidden, inter, num_experts, top_k) in CPU_SHAPES.items():
            w13 = (torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5).to(dtype)
            w2 = (torch.randn(num_experts, hidden, inter) / inter**0.5).to(dtype)
            peers = hf_experts(hidden, inter, num_experts, top_k, w13, w2)
            for phase, token_counts in CPU_TOKENS.items():
                for num_tokens in token_counts:
                    if quick and num_tokens > 64:
                        continue
                    x = torch.randn(num_tokens, hidden).to(dtype)
                    routings = make_routings(num_tokens, num_experts, top_k, dev)
                    fns = {
                        "fused_moe": lambda w, i32, i64: moe_swap.fused_moe(x, w13, w2, w, i32),
                        "hf_eager": lambda w, i32, i64: peers["hf_eager"](x, w, i64),
                        "hf_grouped_mm": lambda w, i32, i64: peers["hf_grouped_mm"](x, w, i64),
                    }
                    # The same numbers from each, first.
                    ours = fns["fused_moe"](*routings[0]).float()
                    diffs = {n: (fns[n](*routings[0]).float() - ours).abs().max().item()
                             for n in ("hf_eager", "hf_grouped_mm")}
                    min_seconds = 0.3 if quick else 1.0
                    times, runs = time_interleaved(fns, routings, lambda: None, min_seconds=min_seconds)
                    flops = 2 * num_tokens * top_k * 3 * hidden * inter
                    # Ceiling 2: one plain matmul of the same FLOPs ([T*k, H] @ [H, 3I]), float32 and dtype.
                    a32 = torch.randn(num_tokens * top_k, hidden)
                    b32 = torch.randn(hidden, 3 * inter)
                    a_dt, b_dt = a32.to(dtype), b32.to(dtype)
                    mm_times, _ = time_interleaved({"mm_f32": lambda: torch.mm(a32, b32),
                                                    "mm_dtype": lambda: torch.mm(a_dt, b_dt)}, [()], lambda: None,
                                                   min_seconds=min_seconds / 2)
                    weight_bytes = selected_expert_bytes(routings, w13, w2)
                    rec = {
                        "section": "cpu", "shape": shape_name, "dtype": dtype_name, "phase": phase,
                        "num_tokens": num_tokens, "hidden": hidden, "intermediate": inter,
                        "num_experts": num_experts, "top_k": top_k, "runs": runs,
                        "ms": {k: v * 1e3 for k, v in times.items()},
                        "max_abs_diff_vs_fused_moe": diffs,
                        "speedup_vs_hf_eager": times["hf_eager"] / times["fused_moe"],
                        "speedup_vs_hf_grouped_mm": times["hf_grouped_mm"] / times["fused_moe"],
                        "speedup_vs_faster_peer": min(times["hf_eager"], times["hf_grouped_mm"]) / times["fused_moe"],
                        "gflops": flops / times["fused_moe"] / 1e9,
                        "matmul_f32_gflops": flops / mm_times["mm_f32"] / 1e9,
                        "matmul_dtype_gflops": flops / mm_times["mm_dtype"] / 1e9,
                        "selected_weight_bytes": weight_bytes,
                        "weight_gbps": weight_bytes / times["fused_moe"] / 1e9,
                        "copy_gbps": copy_rate / 1e9,
                    }
                    rec["fraction_of_best_matmul"] = rec["gflops"] / max(rec["matmul_f32_gflops"],
                                                                         rec["matmul_dtype_gflops"])
                    rec["fraction_of_copy"] = rec["weight_gbps"] / rec["copy_gbps"]
                    records.append(rec)
                    print(f"{shape_name:13} {dtype_name:8} {num_tokens:>4} | {rec['ms']['fused_moe']:>12.3f} "
                          f"{rec['ms']['hf_eager']:>11.3f} {rec['ms']['hf_grouped_mm']:>13.3f} | "
                          f"{rec['speedup_vs_hf_eager']:>7.2f} {rec['speedup_vs_hf_grouped_mm']:>9.2f} | "
                          f"{rec['gflops']:>8.1f} {rec['matmul_f32_gflops']:>7.1f} {rec['matmul_dtype_gflops']:>7.1f} "
                          f"{100 * rec['fraction_of_best_matmul']:>5.0f} | {rec['weight_gbps']:>6.1f} "
                          f"{100 * rec['fraction_of_copy']:>5.0f}", flush=True)
            del w13, w2, peers
    return records


def run_gpu(quick):
    records = []
    dev = "cuda"
    props = torch.cuda.get_device_properties(0)
    # Ceilings: a device-to-device copy, and a large bf16 matmul.
    n = 1 << 28  # 512 MiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    copy_s = time_cuda(lambda: dst.copy_(src))
    copy_rate = 2 * src.numel() * src.element_size() / copy_s
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    mm_s = time_cuda(lambda: torch.mm(a, b))
    mm_tflops = 2 * m**3 / mm_s / 1e12
    del a, b
    print(f"\nGPU: {props.name}; copy {copy_rate / 1e9:.0f} GB/s (read+write), bf16 matmul {mm_tflops:.0f} TFLOP/s")
    header = (f"{'shape':14} {'T':>5} | {'fused_moe ms':>12} {'hf_grouped ms':>13} {'x grouped':>9} | "
              f"{'GB/s':>7} {'%copy':>5} | {'TFLOP/s':>7} {'%mm':>5}")
    print(header)
    print("-" * len(header))
    dtype = torch.bfloat16
    for shape_name, (hidden, inter, num_experts, top_k) in GPU_SHAPES.items():
        w13 = (torch.randn(num_experts, 2 * inter, hidden, device=dev) / hidden**0.5).to(dtype)
        w2 = (torch.randn(num_experts, hidden, inter, device=dev) / inter**0.5).to(dtype)
        peers = hf_experts(hidden, inter, num_experts, top_k, w13, w2)
        for phase, token_counts in GPU_TOKENS.items():
            for num_tokens in token_counts:
                if quick and num_tokens > 1024:
                    num_tokens = 1024
                x = torch.randn(num_tokens, hidden, device=dev).to(dtype)
                routings = make_routings(num_tokens, num_experts, top_k, dev)
                w0, i0, i0_long = routings[0]
                ours = moe_swap.fused_moe(x, w13, w2, w0, i0).float()
                diff = (peers["hf_grouped_mm"](x, w0, i0_long).float() - ours).abs().max().item()
                state = {"i": 0}

                def next_routing():
                    state["i"] += 1
                    return routings[state["i"] % len(routings)]

                t_ours = time_cuda(lambda: moe_swap.fused_moe(x, w13, w2, *next_routing()[:2]))
                t_peer = time_cuda(lambda: peers["hf_grouped_mm"](x, *next_routing()[::2]))
                flops = 2 * num_tokens * top_k * 3 * hidden * inter
                weight_bytes = selected_expert_bytes(routings, w13, w2)
                rec = {
                    "section": "gpu", "device": props.name, "shape": shape_name, "dtype": "bfloat16",
                    "phase": phase, "num_tokens": num_tokens, "hidden": hidden, "intermediate": inter,
                    "num_experts": num_experts, "top_k": top_k,
                    "ms": {"fused_moe": t_ours * 1e3, "hf_grouped_mm": t_peer * 1e3},
                    "max_abs_diff_vs_fused_moe": {"hf_grouped_mm": diff},
                    "speedup_vs_hf_grouped_mm": t_peer / t_ours,
                    "selected_weight_bytes": weight_bytes,
                    "weight_gbps": weight_bytes / t_ours / 1e9, "copy_gbps": copy_rate / 1e9,
                    "fraction_of_copy": weight_bytes / t_ours / copy_rate,
                    "tflops": flops / t_ours / 1e12, "matmul_tflops": mm_tflops,
                    "fraction_of_matmul": flops / t_ours / 1e12 / mm_tflops,
                }
                records.append(rec)
                print(f"{shape_name:14} {num_tokens:>5} | {t_ours * 1e3:>12.3f} {t_peer * 1e3:>13.3f} "
                      f"{rec['speedup_vs_hf_grouped_mm']:>9.2f} | {rec['weight_gbps']:>7.0f} "
                      f"{100 * rec['fraction_of_copy']:>5.0f} | {rec['tflops']:>7.1f} {100 * rec['fraction_of_matmul']:>5.0f}",
                      flush=True)
        del w13, w2, peers
        torch.cuda.empty_cache()
    return records


def summarize_targets(records):
    """The issue's targets, checked against this run's numbers."""
    lines = []
    cpu = [r for r in records if r["section"] == "cpu"]
    if cpu:
        slower = [r for r in cpu if r["speedup_vs_faster_peer"] < 1.0]
        lines.append(f"CPU never slower than the faster peer: {'yes' if not slower else 'NO'} "
                     f"(worst {min(r['speedup_vs_faster_peer'] for r in cpu):.2f}x)")
        mid = [r for r in cpu if r["num_tokens"] == 64]
        if mid:
            lines.append(f"CPU >= 1.3x eager at T=64: worst {min(r['speedup_vs_hf_eager'] for r in mid):.2f}x")
        pre = [r for r in cpu if r["phase"] == "prefill"]
        if pre:
            lines.append("CPU prefill >= 85% of the plain matmul: " + ", ".join(
                f"{r['shape']}/{r['dtype']} {100 * r['gflops'] / r['matmul_f32_gflops']:.0f}% of f32 mm, "
                f"{100 * r['gflops'] / r['matmul_dtype_gflops']:.0f}% of {r['dtype']} mm" for r in pre))
    gpu = [r for r in records if r["section"] == "gpu"]
    if gpu:
        dec = [r for r in gpu if r["phase"] == "decode"]
        pre = [r for r in gpu if r["phase"] == "prefill"]
        if dec:
            lines.append(f"GPU decode >= 60% of copy: worst {100 * min(r['fraction_of_copy'] for r in dec):.0f}%")
        if pre:
            lines.append(f"GPU prefill >= 50% of bf16 matmul: worst {100 * min(r['fraction_of_matmul'] for r in pre):.0f}%")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/bench_ops.json", help="where to write the JSON results")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="CPU dtypes, comma-separated")
    parser.add_argument("--sections", default="auto",
                        help="cpu, gpu or cpu,gpu; auto (default): gpu where CUDA is available, else cpu "
                             "(keeps scripts/gpu_check.sh inside its time limit)")
    parser.add_argument("--quick", action="store_true", help="shorter runs, no CPU prefill (a smoke test)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    records = []
    sections = args.sections.split(",")
    if sections == ["auto"]:
        sections = ["gpu"] if torch.cuda.is_available() else ["cpu"]
    if "gpu" in sections and not torch.cuda.is_available():
        parser.error("--sections gpu needs CUDA, and torch.cuda.is_available() is False")
    with torch.inference_mode():
        if "cpu" in sections:
            records += run_cpu([d for d in args.dtypes.split(",") if d], args.quick)
        if "gpu" in sections:
            records += run_gpu(args.quick)
    lines = summarize_targets(records)
    print("\n" + "\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "python": platform.python_version(),
                               "threads": torch.get_num_threads(), "cmdline": sys.argv,
                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "targets": lines,
                               "records": records}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
