"""fused_moe side by side with transformers' own experts forward, and the machine's ceilings.

One run measures everything it compares, so the ratios are between numbers taken under the same
conditions:

CPU  per dtype and per build of the CPU inner loops this machine runs (avx512_bf16, avx512, avx2,
     generic; --kernels), on Mixtral-like, Qwen3-like and issue 14's Qwen3 (H 1024, I 768, 64
     experts, top-8) shapes, at decode (T=1, 2, 4), middle (T=64) and prefill (T=512):
       - tokens/s of fused_moe vs transformers' experts forward (`eager`, `grouped_mm`), same weights;
       - decode: GB/s of the selected experts' weights read, vs the machine's read ceiling measured in
         the same run (a multi-threaded streaming sum over a buffer far larger than the L3, and
         torch's own copy rate);
       - prefill: GFLOP/s vs torch's matmul in that dtype (F.linear, as a model calls it) and in float32.
     Rounds alternate the implementations (each round runs every one, in a rotated order); the
     report gives the median of the round medians and their spread (min-max).
GPU  (when CUDA is available) decode bandwidth over the selected experts' bytes as a fraction of a
     device-to-device copy; prefill TFLOP/s as a fraction of a large bf16 matmul; vs `grouped_mm`.

Every call gets a fresh routing (cycled from a pre-drawn set) and, on the CPU, the next of several
copies of the layer's weights (together several times the L3), so weights come from memory as they
would in a model, not from a cache warmed by the previous call.

    python benchmarks/bench_ops.py                      # GPU if present, else CPU (all dtypes, best build)
    python benchmarks/bench_ops.py --sections cpu --kernels all       # every build this CPU runs
    python benchmarks/bench_ops.py --dtypes bfloat16 --shapes qwen3-issue14 --out bench_results/q.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
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
    "qwen3-issue14": (1024, 768, 64, 8),
}
CPU_TOKENS = {"decode": [1, 2, 4], "middle": [64], "prefill": [512]}
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
    with torch.device("meta"):
        module = MixtralExperts(config)
    module.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    module.down_proj = torch.nn.Parameter(w2, requires_grad=False)

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


def time_rounds(fns, num_calls, rounds, seconds_per_round):
    """Per fn, the median seconds per call of each round; fns alternate by round, in a rotated order.
    fns[name](i) runs call i (each call its own routing and weight copy)."""
    names = list(fns)
    per_round = {name: [] for name in names}
    for name in names:  # warm-up: first-call costs (allocations, lazy init) out of the rounds
        fns[name](0)
    call = 1
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples = []
            start = time.perf_counter()
            while len(samples) < num_calls or (time.perf_counter() - start < seconds_per_round and len(samples) < 200):
                t0 = time.perf_counter()
                fns[name](call)
                samples.append(time.perf_counter() - t0)
                call += 1
            per_round[name].append(statistics.median(samples))
    return per_round


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


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


def l3_bytes():
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        if size > 0:
            return size
    except (ValueError, OSError):
        pass
    return 32 * 2**20


def measure_read_ceiling(rounds=5):
    """GB/s read by a multi-threaded streaming sum over a buffer 16x the L3 (at least 512 MiB), and
    torch's copy rate (bytes read per second; the copy also writes as many)."""
    numel = max(512 * 2**20, 16 * l3_bytes()) // 4
    src = torch.empty(numel, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    sums, copies = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        src.sum()
        sums.append(numel * 4 / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(numel * 4 / (time.perf_counter() - t0) / 1e9)
    return sums, copies


def matmul_rates(rows, hidden, out_cols, dtype):
    """GFLOP/s of torch's matmul as a model calls it (F.linear [rows, H] x [out, H]^T), in dtype and float32."""
    rates = {}
    for name, dt in (("f32", torch.float32), ("dtype", dtype)):
        a = torch.randn(rows, hidden).to(dt)
        b = torch.randn(out_cols, hidden).to(dt)
        torch.nn.functional.linear(a, b)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, b)
            times.append(time.perf_counter() - t0)
        rates[name] = 2 * rows * hidden * out_cols / statistics.median(times) / 1e9
    return rates


def lscpu_summary():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k: fields[k].strip() for k in ("Model name", "CPU family", "Model", "CPU(s)", "L3 cache", "Flags")
            if k in fields}


def run_cpu(dtypes, shapes, quick, rounds):
    records = []
    build = moe_swap.ops.cpu_kernel_build()
    sums, copies = measure_read_ceiling()
    print(f"\nCPU: {lscpu_summary().get('Model name', platform.machine())}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, kernels {build}; read ceiling (streaming sum) {statistics.median(sums):.1f} GB/s "
          f"[{min(sums):.1f}-{max(sums):.1f}], copy {statistics.median(copies):.1f} GB/s read", flush=True)
    header = (f"{'shape':13} {'dtype':8} {'build':11} {'T':>4} | {'fused_moe tok/s':>15} {'hf_eager':>9} "
              f"{'hf_grouped':>10} | {'x eager':>7} {'x grouped':>9} | {'GB/s':>5} {'%read':>5} | "
              f"{'GFLOP/s':>7} {'mm dt':>6} {'%dt':>4} {'mm f32':>6} {'%f32':>4}")
    print(header)
    print("-" * len(header))
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for shape_name in shapes:
            hidden, inter, num_experts, top_k = CPU_SHAPES[shape_name]
            layer_bytes = 3 * num_experts * hidden * inter * dtype.itemsize
            copies_needed = max(2, math.ceil(4 * l3_bytes() / layer_bytes))
            w13s = [(torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5).to(dtype) for _ in range(copies_needed)]
            w2s = [(torch.randn(num_experts, hidden, inter) / inter**0.5).to(dtype) for _ in range(copies_needed)]
            peers = [hf_experts(hidden, inter, num_experts, top_k, a, b) for a, b in zip(w13s, w2s)]
            for phase, token_counts in CPU_TOKENS.items():
                for num_tokens in token_counts:
                    if quick and num_tokens > 64:
                        continue
                    x = torch.randn(num_tokens, hidden).to(dtype)
                    routings = make_routings(num_tokens, num_experts, top_k, "cpu")

                    def call(fn_name):
                        def run(i):
                            layer, (w, i32, i64) = i % copies_needed, routings[i % len(routings)]
                            if fn_name == "fused_moe":
                                return moe_swap.fused_moe(x, w13s[layer], w2s[layer], w, i32)
                            return peers[layer][fn_name](x, w, i64)
                        return run
                    fns = {name: call(name) for name in ("fused_moe", "hf_eager", "hf_grouped_mm")}
                    # The same numbers from each, first.
                    ours = fns["fused_moe"](0).float()
                    diffs = {n: (fns[n](0).float() - ours).abs().max().item() for n in ("hf_eager", "hf_grouped_mm")}
                    long_call = phase == "prefill"
                    per_round = time_rounds(fns, num_calls=1 if long_call else 5, rounds=rounds,
                                            seconds_per_round=0.0 if long_call else (0.1 if quick else 0.3))
                    times = {name: summary(v) for name, v in per_round.items()}
                    t_ours = times["fused_moe"]["median"]
                    flops = 2 * num_tokens * top_k * 3 * hidden * inter
                    weight_bytes = selected_expert_bytes(routings, w13s[0], w2s[0])
                    rec = {
                        "section": "cpu", "kernels": build, "shape": shape_name, "dtype": dtype_name, "phase": phase,
                        "num_tokens": num_tokens, "hidden": hidden, "intermediate": inter,
                        "num_experts": num_experts, "top_k": top_k, "weight_copies": copies_needed,
                        "seconds": times,
                        "tokens_per_s": {n: num_tokens / v["median"] for n, v in times.items()},
                        "tokens_per_s_spread": {n: [num_tokens / v["max"], num_tokens / v["min"]] for n, v in times.items()},
                        "max_abs_diff_vs_fused_moe": diffs,
                        "speedup_vs_hf_eager": times["hf_eager"]["median"] / t_ours,
                        "speedup_vs_hf_grouped_mm": times["hf_grouped_mm"]["median"] / t_ours,
                        "speedup_vs_faster_peer": min(times["hf_eager"]["median"],
                                                      times["hf_grouped_mm"]["median"]) / t_ours,
                        "gflops": flops / t_ours / 1e9,
                        "selected_weight_bytes": weight_bytes,
                        "weight_gbps": weight_bytes / t_ours / 1e9,
                        "read_ceiling_gbps": statistics.median(sums), "copy_read_gbps": statistics.median(copies),
                    }
                    rec["fraction_of_read_ceiling"] = rec["weight_gbps"] / rec["read_ceiling_gbps"]
                    line_mm = f"{'':>6} {'':>4} {'':>6} {'':>4}"
                    if phase != "decode":
                        rates = matmul_rates(min(num_tokens * top_k, 1024), hidden, 3 * inter, dtype)
                        rec["matmul_dtype_gflops"], rec["matmul_f32_gflops"] = rates["dtype"], rates["f32"]
                        rec["fraction_of_dtype_matmul"] = rec["gflops"] / rates["dtype"]
                        rec["fraction_of_f32_matmul"] = rec["gflops"] / rates["f32"]
                        line_mm = (f"{rates['dtype']:>6.1f} {100 * rec['fraction_of_dtype_matmul']:>4.0f} "
                                   f"{rates['f32']:>6.1f} {100 * rec['fraction_of_f32_matmul']:>4.0f}")
                    records.append(rec)
                    tps = rec["tokens_per_s"]
                    spread = rec["tokens_per_s_spread"]["fused_moe"]
                    print(f"{shape_name:13} {dtype_name:8} {build:11} {num_tokens:>4} | "
                          f"{tps['fused_moe']:>7.0f} [{spread[0]:.0f}-{spread[1]:.0f}] {tps['hf_eager']:>9.0f} "
                          f"{tps['hf_grouped_mm']:>10.0f} | {rec['speedup_vs_hf_eager']:>7.2f} "
                          f"{rec['speedup_vs_hf_grouped_mm']:>9.2f} | {rec['weight_gbps']:>5.1f} "
                          f"{100 * rec['fraction_of_read_ceiling']:>5.0f} | {rec['gflops']:>7.1f} {line_mm}", flush=True)
            del w13s, w2s, peers
    sums_after, copies_after = measure_read_ceiling()
    print(f"read ceiling at the end: {statistics.median(sums_after):.1f} GB/s [{min(sums_after):.1f}-"
          f"{max(sums_after):.1f}], copy {statistics.median(copies_after):.1f} GB/s read", flush=True)
    for rec in records:
        rec["read_ceiling_gbps_at_end"] = statistics.median(sums_after)
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
    for build in dict.fromkeys(r["kernels"] for r in cpu):
        mine = [r for r in cpu if r["kernels"] == build]
        slower = [r for r in mine if r["speedup_vs_faster_peer"] < 1.0]
        worst = min(mine, key=lambda r: r["speedup_vs_faster_peer"])
        lines.append(f"CPU[{build}] never slower than the faster transformers peer: {'yes' if not slower else 'NO'} "
                     f"(worst {worst['speedup_vs_faster_peer']:.2f}x, {worst['shape']}/{worst['dtype']} "
                     f"T={worst['num_tokens']})")
        dec = [r for r in mine if r["phase"] == "decode"]
        if dec:
            lines.append(f"CPU[{build}] decode >= 85% of the read ceiling: " + ", ".join(
                f"{r['shape']}/{r['dtype']}/T{r['num_tokens']} {100 * r['fraction_of_read_ceiling']:.0f}%"
                for r in dec))
        pre = [r for r in mine if r["phase"] == "prefill"]
        if pre:
            lines.append(f"CPU[{build}] prefill >= 85% of torch's matmul in the dtype: " + ", ".join(
                f"{r['shape']}/{r['dtype']} {100 * r['fraction_of_dtype_matmul']:.0f}% "
                f"({100 * r['fraction_of_f32_matmul']:.0f}% of f32)" for r in pre))
    gpu = [r for r in records if r["section"] == "gpu"]
    if gpu:
        dec = [r for r in gpu if r["phase"] == "decode"]
        pre = [r for r in gpu if r["phase"] == "prefill"]
        if dec:
            lines.append(f"GPU decode >= 60% of copy: worst {100 * min(r['fraction_of_copy'] for r in dec):.0f}%")
        if pre:
            lines.append(f"GPU prefill >= 50% of bf16 matmul: worst {100 * min(r['fraction_of_matmul'] for r in pre):.0f}%")
    return lines


def run_cpu_builds(args, builds):
    """The CPU section once per kernel build, each in its own process (the build is chosen once per
    process, from MOE_SWAP_CPU_KERNELS)."""
    records = []
    for build in builds:
        out = Path(args.out).with_suffix(f".{build}.json")
        cmd = [sys.executable, __file__, "--sections", "cpu", "--kernels", "current", "--dtypes", args.dtypes,
               "--shapes", args.shapes, "--rounds", str(args.rounds), "--out", str(out)] + (["--quick"] if args.quick else [])
        subprocess.run(cmd, env={**os.environ, "MOE_SWAP_CPU_KERNELS": build}, check=True)
        records += json.loads(out.read_text())["records"]
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/bench_ops.json", help="where to write the JSON results")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="CPU dtypes, comma-separated")
    parser.add_argument("--shapes", default=",".join(CPU_SHAPES), help="CPU shapes, comma-separated: "
                        + ", ".join(CPU_SHAPES))
    parser.add_argument("--kernels", default="current",
                        help="CPU kernel builds: current (this process's: MOE_SWAP_CPU_KERNELS or the best), all "
                             "(every one this CPU runs, one process each) or a comma-separated list")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per CPU measurement")
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
    unknown = [s for s in args.shapes.split(",") if s not in CPU_SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; expected some of {list(CPU_SHAPES)}")
    builds = None
    if args.kernels != "current":
        runnable = moe_swap.ops.cpu_kernel_builds()
        builds = runnable if args.kernels == "all" else args.kernels.split(",")
        missing = [b for b in builds if b not in runnable]
        if missing:
            parser.error(f"--kernels: this CPU does not run {missing}; it runs {runnable}")
    with torch.inference_mode():
        if "cpu" in sections:
            if builds is None:
                records += run_cpu([d for d in args.dtypes.split(",") if d], args.shapes.split(","), args.quick,
                                   args.rounds)
            else:
                records += run_cpu_builds(args, builds)
        if "gpu" in sections:
            records += run_gpu(args.quick)
    lines = summarize_targets(records)
    print("\n" + "\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "python": platform.python_version(),
                               "threads": torch.get_num_threads(), "cmdline": sys.argv, "cpu": lscpu_summary(),
                               "load_average": os.getloadavg(),
                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "targets": lines,
                               "records": records}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
