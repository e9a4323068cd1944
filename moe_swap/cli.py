"""``python -m moe_swap demo|bench|info``: the command line."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Optional

import torch

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
DEFAULT_CONFIG = "qwen3_moe_small"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- shared pieces

def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _shipped_configs() -> list[str]:
    return sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".json"))


def _config_path(name: str) -> str:
    path = name if name.endswith(".json") and os.path.exists(name) else os.path.join(CONFIG_DIR, name + ".json")
    if not os.path.exists(path):
        raise SystemExit(f"--config {name!r}: no such shipped config or file; shipped: {', '.join(_shipped_configs())}")
    return path


def build_random_checkpoint(config_name: str, folder: str, dtype: torch.dtype, seed: int) -> str:
    """A model from a shipped config with seeded random weights, saved as safetensors in ``folder``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(_config_path(config_name)) as f:
        spec = json.load(f)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def _check_model_folder(path: str) -> str:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model {path!r} is not a checkpoint folder (expected config.json + *.safetensors)")
    return path


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _timed_greedy(model, ids, new_tokens, device) -> tuple[torch.Tensor, float]:
    _synchronize(device)
    start = time.perf_counter()
    out = _greedy(model, ids, new_tokens)
    _synchronize(device)
    return out, time.perf_counter() - start


def _streamer_totals(model) -> dict:
    """Bytes copied and compute-stream wait time so far, from the streamer's statistics."""
    report = getattr(model, "moe_swap_report", None)
    stats = report.stats() if report is not None else {}
    return {"bytes_copied": int(stats.get("bytes_copied", 0)), "wait_s": float(stats.get("wait_ms", 0.0)) / 1e3}


def _fmt_bytes(n: float) -> str:
    from .planner import format_bytes

    return format_bytes(n)


def _checked_device(args) -> str:
    """--device, --gpu-budget and --slots checked before any model is built (a bad value fails in a
    second with the library's own message, not minutes later or with a torch traceback)."""
    from .offload import _check_device, _check_schedule
    from .planner import parse_bytes

    device = args.device or _default_device()
    _check_device(device)
    if args.gpu_budget is not None:
        parse_bytes(args.gpu_budget, "--gpu-budget")
    _check_schedule(args.slots, 1)
    return device


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    from transformers import AutoModelForCausalLM

    from .loader import load
    from .offload import _check_policy_and_mode

    device = _checked_device(args)
    _check_policy_and_mode(args.policy, args.mode, args.eviction, args.ids_path)
    # float32 by default so the token check is exact; a checkpoint folder keeps its own dtype
    dtype = _DTYPES[args.dtype] if args.dtype else (None if args.model else torch.float32)
    with contextlib.ExitStack() as stack:
        if args.model:
            folder = _check_model_folder(args.model)
            source = folder
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="moe_swap_demo_"))
            build_random_checkpoint(args.config, folder, dtype, args.seed)
            source = f"shipped config {args.config} (seeded random weights, saved to a temporary folder)"
        print(f"moe_swap demo: {source}")

        generator = torch.Generator().manual_seed(args.seed)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(folder).vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=generator).to(device)

        reference_tokens, resident_s = None, None
        if not args.no_check:
            reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto").to(device).eval()
            _greedy(reference, ids, 2)  # warm up
            reference_tokens, resident_s = _timed_greedy(reference, ids, args.new_tokens, device)
            del reference
            _free(device)

        model = load(folder, device=device, gpu_budget=args.gpu_budget, policy=args.policy, slots=args.slots,
                     mode=args.mode, dtype=dtype, eviction=args.eviction, predict=args.predict,
                     ids_path=args.ids_path)
        report = model.moe_swap_report
        dtype = next(model.parameters()).dtype
        print(report)
        _greedy(model, ids, 2)  # warm up
        before = _streamer_totals(model)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        tokens, offload_s = _timed_greedy(model, ids, args.new_tokens, device)
        after = _streamer_totals(model)

    generated = args.batch * args.new_tokens
    copied = after["bytes_copied"] - before["bytes_copied"]
    waited = after["wait_s"] - before["wait_s"]
    rows = [
        ("tokens generated", f"{generated} ({args.batch} x {args.new_tokens}, greedy, {str(dtype)[6:]})"),
        ("tokens/s moe_swap", f"{generated / offload_s:.1f}  ({offload_s:.2f} s)"),
    ]
    if resident_s is not None:
        rows.append(("tokens/s unmodified model", f"{generated / resident_s:.1f}  ({resident_s:.2f} s)"))
    forwards = args.new_tokens  # one forward per generated position (the first is the prefill)
    rows += [
        ("bytes streamed / token", f"{_fmt_bytes(copied / forwards)} per decode step "
                                   f"({_fmt_bytes(copied / generated)} per token)"),
        ("achieved copy rate", f"{copied / offload_s / 1e9:.2f} GB/s over the whole run"),
        ("compute waiting on copies", f"{waited:.3f} s = {100 * waited / offload_s:.1f}% of the run"
                                      + (" (overlap: the rest of each copy hid under compute)" if copied else "")),
        ("device weights", _fmt_bytes(report.device_bytes)),
        ("pinned host memory" if device.startswith("cuda") else "host store (CPU backend)",
         _fmt_bytes(report.pinned_bytes)),
    ]
    if device.startswith("cuda"):
        rows.append(("peak device memory (run)", _fmt_bytes(torch.cuda.max_memory_allocated())))
    print("\nresults")
    print(_table(rows))
    if report.cache_table():
        print("\n" + report.cache_table() + "\n  (counted over the warm-up and the timed run)")
    if reference_tokens is None:
        print("\ntoken check skipped (--no-check)")
        return 0
    if not torch.equal(tokens.cpu(), reference_tokens.cpu()):
        mismatch = (tokens.cpu() != reference_tokens.cpu()).nonzero()
        print(f"\nFAIL: tokens differ from the model without offload (first at {mismatch[0].tolist()})")
        return 1
    print(f"\nOK: the {generated} generated tokens equal the model without offload")
    return 0


# ---------------------------------------------------------------- bench

# resident: the unmodified model; fused_resident: moe_swap's kernels with every expert on the device
# (isolates streaming from kernel differences); full/sync/uva: the streamer's modes; accelerate: cpu_offload
BENCH_MODES = ("resident", "fused_resident", "full", "sync", "uva", "accelerate", "on_demand", "auto", "auto_device")
# the expert-granular modes: (policy, ids_path) of moe_swap.load
_POLICY_MODES = {"on_demand": ("on_demand", "host"), "auto": ("auto", "host"), "auto_device": ("auto", "device")}


def _build_for_mode(mode: str, folder: str, device: str, dtype, gpu_budget, slots):
    from transformers import AutoModelForCausalLM

    from .loader import load

    if mode == "resident":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    if mode == "accelerate":
        from accelerate import cpu_offload

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        cpu_offload(model, execution_device=torch.device(device))
        return model
    if mode == "fused_resident":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "nothing was offloaded" is the point here
            return load(folder, device=device, gpu_budget=2**62, slots=slots, dtype=dtype)
    if mode in _POLICY_MODES:
        policy, ids_path = _POLICY_MODES[mode]
        return load(folder, device=device, gpu_budget=gpu_budget, slots=slots, policy=policy, ids_path=ids_path,
                    dtype=dtype)
    return load(folder, device=device, gpu_budget=gpu_budget, slots=slots, mode=mode, dtype=dtype)


def _measure(model, device: str, batch: int, prompt_len: int, decode_tokens: int, vocab: int,
             repeats: int) -> dict:
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).to(device)
    prefill_times, decode_times = [], []
    with torch.no_grad():
        for attempt in range(repeats + 1):  # the first round warms up
            _synchronize(device)
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            _synchronize(device)
            prefill = time.perf_counter() - start
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for step in range(decode_tokens):
                out = model(token, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = out.logits[:, -1:].argmax(-1)
            _synchronize(device)
            decode = time.perf_counter() - start
            if attempt:
                prefill_times.append(prefill)
                decode_times.append(decode)
    # the median round is the figure (a busy machine makes single rounds outliers); min and max show the spread
    prefill, decode = statistics.median(prefill_times), statistics.median(decode_times)
    prefill_rates = sorted(batch * prompt_len / t for t in prefill_times)
    decode_rates = sorted(batch * decode_tokens / t for t in decode_times)
    return {"prefill_tokens_per_s": batch * prompt_len / prefill, "prefill_s": prefill,
            "decode_tokens_per_s": batch * decode_tokens / decode, "decode_step_s": decode / decode_tokens,
            "prefill_tokens_per_s_min_max": [prefill_rates[0], prefill_rates[-1]],
            "decode_tokens_per_s_min_max": [decode_rates[0], decode_rates[-1]], "rounds": len(decode_times)}


def cmd_bench(args) -> int:
    from transformers import AutoConfig

    device = _checked_device(args)
    on_gpu = device.startswith("cuda")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in BENCH_MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; choose from {', '.join(BENCH_MODES)}")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results = {"device": device, "dtype": str(dtype), "torch": torch.__version__, "prompt_len": args.prompt_len,
               "decode_tokens": args.decode_tokens, "gpu_budget": args.gpu_budget, "runs": [], "skipped": {}}
    if on_gpu:
        results["gpu"] = torch.cuda.get_device_name()
    with contextlib.ExitStack() as stack:
        if args.model:
            folder = _check_model_folder(args.model)
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="moe_swap_bench_"))
            build_random_checkpoint(args.config, folder, dtype, seed=0)
        results["model"] = args.model or args.config
        vocab = AutoConfig.from_pretrained(folder).vocab_size
        if not on_gpu:
            needs_gpu = {"uva": "uva reads pinned host memory from GPU kernels: needs a GPU",
                         "accelerate": "accelerate cpu_offload moves weights to a GPU execution device: needs a GPU"}
            results["skipped"] = {m: needs_gpu[m] for m in modes if m in needs_gpu}
        for mode, why in results["skipped"].items():  # said first, not after minutes of measuring
            print(f"  skipped {mode}: {why}", flush=True)
        print(f"  {'mode':<15}{'batch':>6}  {'prefill tok/s (median [min-max])':>34}  "
              f"{'decode tok/s (median [min-max])':>32}", flush=True)
        for mode in modes:
            if mode in results["skipped"]:
                continue
            model = _build_for_mode(mode, folder, device, dtype, args.gpu_budget, args.slots)
            for batch in batches:
                run = {"mode": mode, "batch": batch}
                run.update(_measure(model, device, batch, args.prompt_len, args.decode_tokens, vocab, args.repeats))
                results["runs"].append(run)
                print(f"  {mode:<15}{batch:>6}  {_rate(run, 'prefill'):>34}  {_rate(run, 'decode'):>32}", flush=True)
            del model
            _free(device)

    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "bench.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    png_path = os.path.join(args.out, "bench.png")
    _plot_bench(results, png_path)
    print(f"\n{_bench_table(results)}\n\nwrote {json_path} and {png_path}")
    return 0


def _rate(run: dict, part: str) -> str:
    low, high = run[f"{part}_tokens_per_s_min_max"]
    return f"{run[f'{part}_tokens_per_s']:.1f} [{low:.1f}-{high:.1f}]"


def _bench_table(results: dict) -> str:
    runs = results["runs"]
    base = {(r["batch"]): r for r in runs if r["mode"] == "full"}
    rows = [("mode", "batch", "prefill tok/s", "decode tok/s", "decode [min-max]", "decode vs full")]
    for r in runs:
        ratio = ""
        if r["batch"] in base:
            ratio = f"{r['decode_tokens_per_s'] / base[r['batch']]['decode_tokens_per_s']:.2f}x"
        low, high = r["decode_tokens_per_s_min_max"]
        rows.append((r["mode"], str(r["batch"]), f"{r['prefill_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s']:.1f}",
                     f"{low:.1f}-{high:.1f}", ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    footer = (f"(medians of {runs[0]['rounds']} timed rounds after a warm-up; min-max: the spread of the rounds)"
              if runs else "(no runs)")
    return "\n".join(lines + [footer])


def _plot_bench(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    batches = sorted({r["batch"] for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(modes))
    for ax, key, title in ((axes[0], "prefill_tokens_per_s", "prefill"), (axes[1], "decode_tokens_per_s", "decode")):
        for i, mode in enumerate(modes):
            picked = [next((r for r in runs if r["mode"] == mode and r["batch"] == b), None) for b in batches]
            values = [r[key] if r else 0 for r in picked]
            spread = [[r[key] - r[f"{key}_min_max"][0] if r else 0 for r in picked],  # the rounds' min-max
                      [r[f"{key}_min_max"][1] - r[key] if r else 0 for r in picked]]
            ax.bar([x + i * width for x in range(len(batches))], values, width, yerr=spread, capsize=2, label=mode)
        ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(batches))])
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("tokens / s (log; bars: median, whiskers: min-max)")
        ax.set_title(f"{title} ({results['model']}, {results['device']})")
    # one legend above both charts, never over the bars
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(modes), 5), frameon=False)
    rows_of_legend = (len(modes) + 4) // 5
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.07 * rows_of_legend))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- info

def _h2d_rate(pinned: bool, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=pinned)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=pinned)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best / 1e9


def _driver_version() -> Optional[str]:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def _cpu_kernel_build_or_error(cpu_kernel_build) -> str:
    try:
        return cpu_kernel_build()
    except ValueError as error:  # a bad MOE_SWAP_CPU_KERNELS: info reports it rather than failing
        return f"none: {error}"


def cmd_info(args) -> int:
    import transformers

    from . import __version__
    from .ops import cpu_kernel_build, cpu_kernel_builds, cpu_parallel_threads

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    rows = [
        ("moe_swap", __version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})"),
        ("transformers", transformers.__version__),
        ("CUDA kernels built", ", ".join(f"{op}: {'yes' if has(f'moe_swap::{op}', 'CUDA') else 'no'}"
                                         for op in ("fused_moe", "topk_route"))),
        ("CPU kernels built", ", ".join(f"{op}: {'yes' if has(f'moe_swap::{op}', 'CPU') else 'no'}"
                                        for op in ("fused_moe", "topk_route"))),
        ("CPU kernel threads", f"{cpu_parallel_threads()} of torch's {torch.get_num_threads()}"),
        ("CPU kernel build", f"{_cpu_kernel_build_or_error(cpu_kernel_build)} (this CPU runs: "
                             f"{', '.join(cpu_kernel_builds())})"),
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        rows += [
            ("GPU", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}"),
            ("driver", _driver_version() or "unknown (nvidia-smi not found)"),
            ("H2D pinned", f"{_h2d_rate(True):.1f} GB/s (256 MiB copy, best of 5)"),
            ("H2D pageable", f"{_h2d_rate(False):.1f} GB/s (256 MiB copy, best of 5)"),
        ]
    else:
        rows += [("GPU", "none (torch.cuda.is_available() is False): moe_swap runs on its CPU backend"),
                 ("H2D rates", "not measured: host-to-device copy rates need a GPU")]
    print("moe_swap info")
    print(_table(rows))
    return 0


# ---------------------------------------------------------------- argument parsing

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe_swap",
                                     description="Run Mixture-of-Experts models with experts streamed from host memory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,info}")

    def model_args(p):
        p.add_argument("--model", metavar="PATH", help="a Hugging Face checkpoint folder (config.json + *.safetensors); "
                                                       "default: a shipped config with seeded random weights")
        p.add_argument("--config", default=DEFAULT_CONFIG,
                       help=f"shipped config when no --model is given: {', '.join(_shipped_configs())} "
                            f"(default {DEFAULT_CONFIG}), or a path to a config .json")
        p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
        p.add_argument("--dtype", choices=sorted(_DTYPES),
                       help="demo default: float32 (exact token check), or the checkpoint's dtype with --model; "
                            "bench default: bfloat16 on cuda, float32 on cpu")
        p.add_argument("--gpu-budget", help="device memory for weights, e.g. 20GiB or 512MB (default: stream "
                                            "every MoE layer)")
        p.add_argument("--slots", type=int, default=2, help="ScratchRing slots (default 2)")

    demo = sub.add_parser("demo", help="load a model with offload, generate, check the tokens, print a table",
                          description="Build (or take) a MoE checkpoint, load it with moe_swap, generate greedily, "
                                      "check the tokens equal the model without offload (exit 1 if not), and print "
                                      "tokens/s, bytes streamed per token, GB/s, copy overlap and memory.")
    model_args(demo)
    demo.add_argument("--policy", default="full",
                      help="full: whole layers through the ring; on_demand: only routed experts, through an "
                           "expert cache; auto: on demand, whole layers when a step misses most experts "
                           "(default full)")
    demo.add_argument("--eviction", default="flru",
                      help="on_demand/auto: expert-cache eviction lru, lfu or flru (frequency-weighted LRU; default flru)")
    demo.add_argument("--predict", action="store_true",
                      help="on_demand/auto: copy the next layer's predicted experts during this layer's compute")
    demo.add_argument("--ids-path", default="host", choices=("host", "device"),
                      help="on_demand/auto: the host reads the routed ids (a sync on CUDA), or expert_cache_pull "
                           "reads them on the device (no sync; a cache region per layer) (default host)")
    demo.add_argument("--mode", default="full", choices=("full", "sync", "uva"), help="streamer mode (default full)")
    demo.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per sequence (default 16)")
    demo.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    demo.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (default 0)")
    demo.add_argument("--no-check", action="store_true", help="skip the comparison with the model without offload")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="end-to-end tokens/s: resident, moe_swap full, sync, uva, accelerate, "
                                         "on_demand, auto",
                           description="Side-by-side end-to-end throughput on the same model: all weights resident, "
                                       "moe_swap full (double-buffered), sync (vLLM legacy cpu offload), uva (GPU "
                                       "kernels read pinned memory), Hugging Face accelerate's cpu_offload, and "
                                       "moe_swap's expert-granular policies (on_demand, auto, auto with the ids read "
                                       "on the device); prefill and decode, several batch sizes; writes JSON and a "
                                       "PNG chart.")
    model_args(bench)
    bench.add_argument("--modes", default=",".join(BENCH_MODES),
                       help=f"comma list from {', '.join(BENCH_MODES)} (resident: the unmodified model; "
                            f"fused_resident: moe_swap kernels, every expert on the device; on_demand, auto: "
                            f"only routed experts, through the expert cache; auto_device: auto with the routed "
                            f"ids read on the device)")
    bench.add_argument("--batch-sizes", default="1,8", help="comma list (default 1,8)")
    bench.add_argument("--prompt-len", type=int, default=128, help="prefill tokens per sequence (default 128)")
    bench.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed (default 16)")
    bench.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up; the median is reported "
                                                             "with the min and max (default 3)")
    bench.add_argument("--out", default="bench_results", help="folder for bench.json and bench.png")
    bench.set_defaults(func=cmd_bench)

    info = sub.add_parser("info", help="GPU, driver, torch, built kernels, host-to-device copy rates",
                          description="Print the GPU, driver, torch and transformers versions, whether the CUDA "
                                      "kernels are built, and measured pinned and pageable host-to-device rates.")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # a user's argument or checkpoint: say what, no traceback
        print(f"python -m moe_swap {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
