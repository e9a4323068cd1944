"""Expert-granular streaming benchmark: policies full, on_demand (cold and with a cache) and auto.

A stack of L synthetic MoE layers with realistic shapes (Mixtral-8x7B: H=4096, I=14336, E=8, top-2;
Qwen3-30B-A3B: H=2048, I=768, E=128, top-8; H and I scaled down on CPU) runs decode steps of a
routing trace through a WeightStreamer, with moe_swap.fused_moe as the compute. Traces (which is which
is in every row):
  uniform    every token picks k distinct experts uniformly;
  skewed     mild popularity skew that varies by layer, plus token-to-token reuse (DESIGN.md "What
             real routing looks like"); its measured top-quarter share and reuse are reported;
  zipf       steep Zipf popularity (exponent 1.2) -- FLATTERING to a cache, reported for comparison;
  recorded   the routing of the demo model (shipped config, seeded random weights; the Qwen3 shape
             uses that config with 128 experts, top-8) recorded while it generates.
Policies: full (whole layers through the ring), on_demand_cold (a cache of 0 bytes), on_demand and
auto (a cache of CACHE_SHARE of all experts; the host reads the routed ids: a sync per layer-step on
CUDA), on_demand_device (the same budget as per-layer regions; expert_cache_pull reads the ids on the
device and pulls from mapped pinned memory, no sync; a step with more ids than its region has slots
takes the host path, whose room for such steps -- one layer, never allocated by a decode that fits
the regions -- is given on top of the budget).
Per shape, trace, policy and batch size: bytes copied per token, tokens/s, hit rate, time to bring
the routed ids to the host, and the cold-cache bytes against the bytes of the distinct routed experts.
Prediction recall (next layer's router on this layer's input) needs a real router, so it is measured on
the demo model itself (the recorded trace's model), per shape. A prefill step (all experts touched)
compares full and auto at equal device memory, passes alternated. Prediction order (--predict-rounds):
on_demand with a guess at the next layer handed to the step (copied after the step's own experts)
against predict() called before the step, with oracle and random guesses, alternated.

Output: a table on stdout, JSON and a bytes-per-token chart (PNG) in --out.

  python benchmarks/bench_expert.py                       # CPU: scaled-down shapes
  python benchmarks/bench_expert.py --device cuda --out bench_results/expert.json
  python benchmarks/bench_expert.py --prefill-only --prefill-rounds 300 --shapes qwen3   # prefill A/B only
  python benchmarks/bench_expert.py --parts predict --predict-rounds 20                  # prediction order only
"""

from __future__ import annotations

import argparse
import json
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
from moe_swap import WeightStreamer  # noqa: E402
from moe_swap.ops import fused_moe  # noqa: E402

SHAPES = {  # name: (H, I, E, top_k) of the real model, and the demo config its recorded trace comes from
    "mixtral": ((4096, 14336, 8, 2), "mixtral_small"),
    "qwen3": ((2048, 768, 128, 8), "qwen3_moe_small"),
}
TRACES = ("uniform", "skewed", "zipf", "recorded")
POLICIES = ("full", "on_demand_cold", "on_demand", "on_demand_device", "auto")
CACHE_SHARE = 0.25  # the cache holds this share of all streamed experts


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- traces

def synthetic_trace(kind: str, layers: int, experts: int, top_k: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, layers, batch, top_k] int32 expert ids."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(steps, layers, batch, top_k, dtype=torch.int32)
    for layer in range(layers):
        if kind == "uniform":
            logp = torch.zeros(experts)
        elif kind == "skewed":
            # mild, per-layer skew: log-popularity ~ N(0, s_l^2), s_l in [0.3, 0.9]; every 4th layer hotter
            s = 0.3 + 0.6 * torch.rand(1, generator=gen).item()
            if layer % 4 == 3:
                s = 1.5
            logp = s * torch.randn(experts, generator=gen)
        elif kind == "zipf":
            ranks = torch.randperm(experts, generator=gen).float() + 1
            logp = -1.2 * torch.log(ranks)
        else:
            raise ValueError(kind)
        reuse = 0.15 if kind == "skewed" else 0.0
        for b in range(batch):
            previous: list[int] = []
            for t in range(steps):
                chosen: list[int] = []
                for _ in range(top_k):
                    candidates = [e for e in previous if e not in chosen]
                    if candidates and torch.rand(1, generator=gen).item() < reuse:
                        chosen.append(candidates[int(torch.randint(len(candidates), (1,), generator=gen))])
                        continue
                    # Gumbel-max over the experts not chosen yet: a draw from the popularity
                    g = logp - torch.log(-torch.log(torch.rand(experts, generator=gen).clamp_min(1e-20)))
                    if chosen:
                        g[chosen] = -float("inf")
                    chosen.append(int(g.argmax()))
                out[t, layer, b] = torch.tensor(chosen, dtype=torch.int32)
                previous = chosen
    return out


def demo_model(shape: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    (_, _, experts, top_k), config_name = SHAPES[shape]
    with open(os.path.join(os.path.dirname(moe_swap.__file__), "configs", config_name + ".json")) as f:
        spec = json.load(f)
    model_type = spec.pop("model_type")
    spec.pop("architectures", None)
    if model_type == "qwen3_moe":
        spec.update(num_experts=experts, num_experts_per_tok=top_k)
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), config


def recorded_trace(shape: str, batch: int, steps: int) -> tuple[torch.Tensor, dict]:
    """The demo model's routing while it generates `steps` tokens per sequence (decode steps only),
    [steps, layers, batch, top_k]; and the prediction recall of on_demand + predict on the same run."""
    import importlib

    offload_module = importlib.import_module("moe_swap.offload")  # the module (moe_swap.offload is the function)

    model, config = demo_model(shape)
    report = moe_swap.offload(model, device="cpu", policy="on_demand", predict=True)
    recorded: list[torch.Tensor] = []
    original = offload_module._LayerExperts.run

    def run(self, holder, hidden, topk_weights, topk_ids):
        if hidden.shape[0] == batch:  # decode steps only (the prefill has batch * prompt tokens)
            recorded.append(topk_ids.to(torch.int32).cpu())
        return original(self, holder, hidden, topk_weights, topk_ids)

    offload_module._LayerExperts.run = run
    try:
        ids = torch.randint(0, config.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                           min_new_tokens=steps + 1, do_sample=False, pad_token_id=0)
    finally:
        offload_module._LayerExperts.run = original
    layers = len(report.streamed_layers)
    trace = torch.stack(recorded[: steps * layers]).view(steps, layers, batch, -1)
    stats = report.stats()
    recall = {"prediction_recall": stats["prediction_recall"],
              "predicted_layers_recall": _recall_of_predicted_layers(stats)}
    return trace, recall


def _recall_of_predicted_layers(stats: dict) -> float:
    """Recall over the layers that had a predictor (every streamed layer but the first)."""
    layers = [l for l in stats["layers"] if l["predicted"] > 0]
    routed = sum(l["routed_distinct"] for l in layers)
    return sum(l["predicted_used"] for l in layers) / routed if routed else 0.0


def trace_shape_stats(trace: torch.Tensor, experts: int) -> dict:
    """Top-quarter share of routed slots (25% = uniform) and token-to-token reuse at a layer."""
    steps, layers, batch, top_k = trace.shape
    counts = torch.zeros(layers, experts)
    for layer in range(layers):
        counts[layer] = torch.bincount(trace[:, layer].flatten().long(), minlength=experts).float()
    top = counts.sort(dim=1, descending=True).values[:, : max(1, experts // 4)].sum(1) / counts.sum(1)
    reuse = []
    for t in range(1, steps):
        for layer in range(layers):
            for b in range(batch):
                prev = set(trace[t - 1, layer, b].tolist())
                reuse.append(len(prev & set(trace[t, layer, b].tolist())) / top_k)
    return {"top_quarter_share": float(top.mean()), "top_quarter_share_max": float(top.max()),
            "reuse": sum(reuse) / len(reuse) if reuse else 0.0, "chance_reuse": top_k / experts}


# ---------------------------------------------------------------- runs

def make_layers(H, I, E, layers, dtype):
    gen = torch.Generator().manual_seed(0)
    return [(torch.empty(E, 2 * I, H, dtype=dtype).uniform_(-0.05, 0.05, generator=gen),
             torch.empty(E, H, I, dtype=dtype).uniform_(-0.05, 0.05, generator=gen)) for _ in range(layers)]


def make_streamer(policy: str, device: str, weights, cache_bytes: int) -> WeightStreamer:
    if policy == "full":
        s = WeightStreamer(device, slots=2, prefetch_depth=1)
    elif policy == "on_demand_device":
        layer_bytes = max(w13.numel() + w2.numel() for w13, w2 in weights) * weights[0][0].element_size()
        s = WeightStreamer(device, policy="on_demand", cache_bytes=cache_bytes + layer_bytes, ids_path="device")
    else:
        s = WeightStreamer(device, policy="auto" if policy == "auto" else "on_demand",
                           cache_bytes=0 if policy == "on_demand_cold" else cache_bytes)
    for w13, w2 in weights:
        s.add_layer(w13, w2)
    if policy == "on_demand_device":
        s.prepare_device_cache()
    return s


def run_steps(s: WeightStreamer, policy: str, trace: torch.Tensor, hidden: torch.Tensor, device: str,
              guess: torch.Tensor | None = None, guess_first: bool = False) -> None:
    """Decode steps of `trace` [steps, layers, batch, top_k] through `s`. `guess` (shaped like the
    trace; on_demand/auto): layer l+1's entry is the guess given at layer l's step -- handed to the
    step (moe's next_layer/next_ids), or with `guess_first` passed to predict() before the step."""
    steps, layers, batch, top_k = trace.shape
    weights = torch.full((batch, top_k), 1.0 / top_k, device=device)
    ids_all = trace.to(device)
    guess_all = None if guess is None else guess.to(device)
    for t in range(steps):
        x = hidden
        for layer in range(layers):
            ids = ids_all[t, layer]
            if policy == "full":
                w13, w2 = s.acquire(layer, after=[x])
                out = fused_moe(x, w13, w2, weights, ids)
                s.release(layer, after=[out])
            elif guess_all is None or layer + 1 == layers:
                out = s.moe(layer, x, weights, ids)
            elif guess_first:
                s.predict(layer + 1, guess_all[t, layer + 1])
                out = s.moe(layer, x, weights, ids)
            else:
                out = s.moe(layer, x, weights, ids, next_layer=layer + 1, next_ids=guess_all[t, layer + 1])
            x = out


def measure(policy, device, weights, trace, warm_steps, cache_bytes, dtype):
    steps, layers, batch, top_k = trace.shape
    H = weights[0][0].shape[2]
    hidden = (torch.randn(batch, H) * 0.1).to(dtype).to(device)
    with make_streamer(policy, device, weights, cache_bytes) as s:
        run_steps(s, policy, trace[:warm_steps], hidden, device)
        synchronize(device)
        before = s.stats()
        start = time.perf_counter()
        run_steps(s, policy, trace[warm_steps:], hidden, device)
        synchronize(device)
        seconds = time.perf_counter() - start
        after = s.stats()
    timed = steps - warm_steps
    tokens = timed * batch
    row = {"tokens_per_s": tokens / seconds, "seconds": seconds,
           "bytes_per_token": (after["bytes_copied"] - before["bytes_copied"]) / tokens}
    if policy != "full":
        hits = after["expert_hits"] - before["expert_hits"]
        misses = after["expert_misses"] - before["expert_misses"]
        row.update(hit_rate=hits / (hits + misses) if hits + misses else 0.0,
                   ids_to_host_ms_per_layer_step=(after["ids_to_host_ms"] - before["ids_to_host_ms"]) / (timed * layers),
                   whole_layer_copies=after["layer_copies"] - before["layer_copies"],
                   device_step_share=(after["device_steps"] - before["device_steps"]) / (timed * layers))
    return row


def distinct_bytes_per_token(trace: torch.Tensor, expert_bytes: int) -> float:
    steps, layers, batch, _ = trace.shape
    distinct = sum(len(set(trace[t, l].flatten().tolist())) for t in range(steps) for l in range(layers))
    return distinct * expert_bytes / (steps * batch)


PREFILL_POLICIES = ("full", "auto")


def prefill(device, weights, tokens, dtype, rounds=5, policies=PREFILL_POLICIES) -> dict:
    """Prefill steps (`tokens` uniform-routed tokens through every layer: every expert touched), the
    policies' streamers side by side, passes alternated in a rotating order so that a shared machine's
    load falls on all alike. Every policy gets the device memory of full's two-slot ring (two layers):
    auto can then double-buffer whole layers like the ring does. (With ids_path="device" a prefill
    takes the same host path, in the room of two layers auto keeps for it.) Per policy: median and minimum wall time, the
    main thread's CPU time (compute + the streamer's host work, not the copy engine's thread), and the
    median of the per-round ratio to full."""
    layers = len(weights)
    E = weights[0][0].shape[0]
    H = weights[0][0].shape[2]
    layer_bytes = (weights[0][0].numel() + weights[0][1].numel()) * weights[0][0].element_size()
    trace = synthetic_trace("uniform", layers, E, SHAPE_TOPK[E], tokens, 1, seed=7)
    hidden = (torch.randn(tokens, H) * 0.1).to(dtype).to(device)
    load = os.getloadavg()[0]
    streamers = {p: make_streamer(p, device, weights, 2 * layer_bytes) for p in policies}
    wall = {p: [] for p in policies}
    cpu = {p: [] for p in policies}
    try:
        for policy, s in streamers.items():  # warm-up: pools, calibration, first copies
            for _ in range(2):
                run_steps(s, policy, trace, hidden, device)
        for i in range(rounds):
            for j in range(len(policies)):
                policy = policies[(i + j) % len(policies)]
                synchronize(device)
                t, c = time.perf_counter(), time.thread_time()
                run_steps(streamers[policy], policy, trace, hidden, device)
                synchronize(device)
                wall[policy].append((time.perf_counter() - t) * 1e3)
                cpu[policy].append((time.thread_time() - c) * 1e3)
        out = {}
        for policy, s in streamers.items():
            out[policy] = {"wall_ms": statistics.median(wall[policy]), "wall_min_ms": min(wall[policy]),
                           "cpu_ms": statistics.median(cpu[policy]),
                           "vs_full": statistics.median([a / f for a, f in zip(wall[policy], wall["full"])])}
            if policy != "full":
                state, stats = s.cache_state(), s.stats()
                out[policy].update(copy_overhead_us=state["copy_overhead_us"], copy_gb_per_s=state["copy_gb_per_s"],
                                   whole_layer_copies=stats["layer_copies"], copied_ahead=stats["predicted"])
    finally:
        for s in streamers.values():
            s.close()
    return {"tokens": tokens, "rounds": rounds, "load_before": load, "load_after": os.getloadavg()[0],
            "policies": out}


SHAPE_TOPK = {8: 2, 128: 8}

PREDICT_VARIANTS = ("none", "oracle_before", "oracle_with", "random_before", "random_with")


def prediction_order(device, weights, trace, warm_steps, cache_bytes, dtype, rounds) -> dict:
    """How a guess at the next layer is issued, on_demand with host ids, side by side and alternated:
    ``*_before`` calls predict(l+1) and then the step of l (the guess queues ahead of the step's own
    copies on the one copy engine), ``*_with`` hands the guess to the step (moe(..., next_layer,
    next_ids): copied after the step's own experts, under its compute). Guesses: ``oracle`` is the
    next layer's true routing of this token (recall 100%: what a perfect predictor could buy),
    ``random`` draws top_k experts at random (recall about top_k/E: what a useless one costs). Per
    variant: median ms per token and the median of the per-round ratio to no prediction."""
    steps, layers, batch, top_k = trace.shape
    E = weights[0][0].shape[0]
    H = weights[0][0].shape[2]
    gen = torch.Generator().manual_seed(11)
    guesses = {"oracle": trace, "random": torch.stack([torch.randperm(E, generator=gen)[:top_k]
                                                      for _ in range(steps * layers * batch)]).view(trace.shape)}
    hidden = (torch.randn(batch, H) * 0.1).to(dtype).to(device)

    def run(s, variant, step_range):
        kind, _, order = variant.partition("_")
        run_steps(s, "on_demand", trace[step_range], hidden, device,
                  guess=None if variant == "none" else guesses[kind][step_range], guess_first=order == "before")

    streamers = {v: make_streamer("on_demand", device, weights, cache_bytes) for v in PREDICT_VARIANTS}
    times = {v: [] for v in PREDICT_VARIANTS}
    try:
        for v, s in streamers.items():
            run(s, v, slice(0, warm_steps))
        for i in range(rounds):
            for j in range(len(PREDICT_VARIANTS)):
                v = PREDICT_VARIANTS[(i + j) % len(PREDICT_VARIANTS)]
                synchronize(device)
                start = time.perf_counter()
                run(streamers[v], v, slice(warm_steps, steps))
                synchronize(device)
                times[v].append(time.perf_counter() - start)
        tokens = (steps - warm_steps) * batch
        out = {}
        for v, s in streamers.items():
            stats = s.stats()
            out[v] = {"ms_per_token": 1e3 * statistics.median(times[v]) / tokens,
                      "vs_none": statistics.median(a / b for a, b in zip(times[v], times["none"])),
                      "hit_rate": stats["hit_rate"], "prediction_recall": stats["prediction_recall"],
                      "predicted": stats["predicted"]}
    finally:
        for s in streamers.values():
            s.close()
    return {"rounds": rounds, "batch": batch, "variants": out}


def print_prediction_order(shape: str, result: dict) -> None:
    print(f"{shape:8} prediction order (skewed, batch {result['batch']}, {result['rounds']} rounds; ms/token, "
          f"x none per-round median, hit rate): " + ", ".join(
              f"{v} {r['ms_per_token']:.3f} ({r['vs_none']:.3f}, {100 * r['hit_rate']:.0f}%)"
              for v, r in result["variants"].items()))


def print_prefill(shape: str, result: dict) -> None:
    auto = result["policies"].get("auto", {})
    print(f"{shape:8} prefill {result['tokens']} tokens, {result['rounds']} rounds (load {result['load_before']:.2f}"
          f" -> {result['load_after']:.2f}), median ms (x full, per-round median): " + ", ".join(
              f"{p} {r['wall_ms']:.1f} ({r['vs_full']:.3f})" for p, r in result["policies"].items())
          + (f"; auto's cost model {auto['copy_overhead_us']} us per copy, {auto['copy_gb_per_s']:.2f} GB/s, "
             f"{auto['whole_layer_copies']} whole-layer copies on demand, {auto['copied_ahead']} experts copied ahead"
             if auto else ""))


TARGET_SPEEDUP = {"mixtral": 3.0, "qwen3": 8.0}  # the tokens/s over full, 25% cache, skewed routing


def targets(results: dict) -> list[str]:
    """The issue's targets against this run, one line each (also stored in the JSON): cold-cache bytes
    against the distinct routed experts' bytes, tokens/s over full with the 25% cache on the skewed
    trace (host and device ids paths), auto against full on prefill and against on_demand on decode,
    the ids->host cost, device against host ids path where the device path took every step, and the
    prediction recall per recorded trace."""
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for shape, entry in results["shapes"].items():
        runs = entry["runs"]
        by = {(r["trace"], r["batch"], r["policy"]): r for r in runs}
        cold = [r["bytes_per_token"] / r["distinct_bytes_per_token"] for r in runs if r["policy"] == "on_demand_cold"]
        if cold:
            lines.append(f"{shape}: cold cache bytes/token <= 1.05x distinct: max {max(cold):.3f}x over {len(cold)} "
                         f"runs, {verdict(max(cold) <= 1.05)}")
        goal = TARGET_SPEEDUP[shape]
        for (trace, batch, policy), r in sorted(by.items()):
            if trace == "skewed" and policy in ("on_demand", "on_demand_device"):
                lines.append(f"{shape}: skewed batch {batch} {policy:16} {r['speedup_vs_full']:.2f}x full tokens/s "
                             f"(target >= {goal:.0f}x, {verdict(r['speedup_vs_full'] >= goal)}; hit rate "
                             f"{100 * r['hit_rate']:.0f}%, device steps {100 * r['device_step_share']:.0f}%)")
        pairs = [(r, by.get((r["trace"], r["batch"], "on_demand"))) for r in runs if r["policy"] == "auto"]
        ratios = sorted(a["tokens_per_s"] / o["tokens_per_s"] for a, o in pairs if o)
        if ratios:
            lines.append(f"{shape}: decode auto/on_demand tokens/s: min {ratios[0]:.3f}, median "
                         f"{statistics.median(ratios):.3f} over {len(ratios)} rows (target >= 1; single runs, "
                         f"noise included)")
        sync = [r["ids_to_host_ms_per_layer_step"] for r in runs if r["policy"] == "on_demand"]
        if sync:
            lines.append(f"{shape}: ids->host per layer-step (host path): median {statistics.median(sync):.4f} ms, "
                         f"max {max(sync):.4f} ms")
        faster = [by[(t, b, "on_demand_device")]["tokens_per_s"] / r["tokens_per_s"]
                  for (t, b, p), r in by.items() if p == "on_demand" and (t, b, "on_demand_device") in by
                  and by[(t, b, "on_demand_device")]["device_step_share"] == 1.0]
        if faster:
            lines.append(f"{shape}: device/host ids path tokens/s where every step fit its region: "
                         f"{min(faster):.2f}-{max(faster):.2f}x over {len(faster)} rows (device faster in "
                         f"{sum(f > 1 for f in faster)})")
        prefill_auto = entry.get("prefill", {}).get("policies", {}).get("auto")
        if prefill_auto:
            lines.append(f"{shape}: prefill auto/full wall time (median of per-round ratios): "
                         f"{prefill_auto['vs_full']:.3f} (target <= 1, {verdict(prefill_auto['vs_full'] <= 1.0)}; "
                         f"{entry['prefill']['rounds']} rounds)")
        order = entry.get("prediction_order")
        if order:
            v = order["variants"]
            lines.append(f"{shape}: a guess handed to the step vs predict() before it (x no prediction): oracle "
                         f"{v['oracle_with']['vs_none']:.3f} vs {v['oracle_before']['vs_none']:.3f}, random "
                         f"{v['random_with']['vs_none']:.3f} vs {v['random_before']['vs_none']:.3f}")
        for key, rec in entry["prediction"].items():
            lines.append(f"{shape}: prediction recall, recorded trace {key}: {100 * rec['predicted_layers_recall']:.1f}% "
                         f"of the routed experts of predicted layers (synthetic traces have no router)")
    return lines


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results["shapes"])
    batches = results["batch_sizes"]
    fig, axes = plt.subplots(len(shapes), len(batches), figsize=(5 * len(batches), 3.6 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            rows = [r for r in results["shapes"][shape]["runs"] if r["batch"] == batch]
            traces = [t for t in TRACES if any(r["trace"] == t for r in rows)]
            width = 0.8 / (len(POLICIES) + 1)
            for p, policy in enumerate(POLICIES):
                values = [next((r["bytes_per_token"] / 2**20 for r in rows if r["trace"] == t and r["policy"] == policy), 0)
                          for t in traces]
                ax.bar([k + p * width for k in range(len(traces))], values, width, label=policy)
            bound = [next(r["distinct_bytes_per_token"] / 2**20 for r in rows if r["trace"] == t) for t in traces]
            ax.bar([k + len(POLICIES) * width for k in range(len(traces))], bound, width, label="distinct routed",
                   color="lightgray", hatch="//")
            ax.set_xticks([k + 0.4 for k in range(len(traces))])
            ax.set_xticklabels([t + (" (flattering)" if t == "zipf" else "") for t in traces], fontsize=8)
            ax.set_ylabel("MiB copied per token")
            ax.set_title(f"{shape}-shaped, batch {batch}")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"bytes moved per token per policy ({results['device']}, cache {int(CACHE_SHARE * 100)}% of experts)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="mixtral,qwen3")
    p.add_argument("--traces", default=",".join(TRACES))
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--scale", type=int, default=None, help="divide H and I by this (default: 16 on CPU, 2 on GPU)")
    p.add_argument("--steps", type=int, default=24, help="decode steps per run, the first quarter untimed (warm-up)")
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--prefill-rounds", type=int, default=5, help="alternated prefill passes per policy")
    p.add_argument("--parts", default="decode,prefill,predict",
                   help="which comparisons: decode (the traces' policies), prefill (full vs auto), predict (the "
                        "prediction order); e.g. --parts predict")
    p.add_argument("--prefill-only", action="store_true", help="the same as --parts prefill")
    p.add_argument("--predict-rounds", type=int, default=3,
                   help="alternated rounds of the prediction-order comparison (skewed trace, batch 1)")
    p.add_argument("--repeats", type=int, default=2, help="fresh runs per policy, the fastest kept (default 2)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--threads", type=int, default=1, help="torch compute threads on CPU (the copy engine is one more)")
    p.add_argument("--out", default="bench_results/expert", help="folder, or a .json file path")
    args = p.parse_args(argv)
    parts = {"prefill"} if args.prefill_only else set(args.parts.split(","))
    if not parts or not parts <= {"decode", "prefill", "predict"}:
        p.error(f"--parts takes decode, prefill and predict, got {args.parts!r}")

    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    scale = args.scale or (16 if device == "cpu" else 2)
    out = Path(args.out)
    json_path = out if out.suffix == ".json" else out / f"bench_expert_{'gpu' if device.startswith('cuda') else 'cpu'}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    warm = max(1, args.steps // 4)
    results = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
               "torch": torch.__version__, "dtype": args.dtype, "scale": scale, "layers": args.layers,
               "steps": args.steps, "warm_steps": warm, "repeats": args.repeats, "cache_share": CACHE_SHARE, "batch_sizes": batches,
               "commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M"), "shapes": {}}

    header = f"{'shape':8} {'trace':9} {'B':>2} {'policy':16} {'tok/s':>9} {'MiB/token':>10} {'x distinct':>10} " \
             f"{'hit rate':>8} {'ids->host':>10} {'x full tok/s':>12} {'device steps':>12}"
    print(header)
    for shape in args.shapes.split(","):
        (H, I, E, top_k), _ = SHAPES[shape]
        H, I = H // scale, I // scale
        weights = make_layers(H, I, E, args.layers, dtype)
        expert_bytes = 3 * H * I * dtype.itemsize
        cache_bytes = int(CACHE_SHARE * args.layers * E) * expert_bytes
        entry = {"H": H, "I": I, "E": E, "top_k": top_k, "expert_bytes": expert_bytes, "cache_bytes": cache_bytes,
                 "runs": [], "traces": {}, "prediction": {}}
        for batch in (batches if "decode" in parts else []):
            for trace_kind in args.traces.split(","):
                if trace_kind == "recorded":
                    trace, recall = recorded_trace(shape, batch, args.steps)
                    trace = trace[:, : args.layers] if trace.shape[1] >= args.layers else trace.repeat(1, -(-args.layers // trace.shape[1]), 1, 1)[:, : args.layers]
                    entry["prediction"][f"batch{batch}"] = recall
                else:
                    trace = synthetic_trace(trace_kind, args.layers, E, top_k, batch, args.steps, seed=batch)
                entry["traces"][f"{trace_kind}/batch{batch}"] = trace_shape_stats(trace, E)
                bound = distinct_bytes_per_token(trace[warm:], expert_bytes)
                rows = {}
                for policy in POLICIES:
                    # best of --repeats fresh runs (a shared machine's load falls on every policy alike)
                    row = max((measure(policy, device, weights, trace, warm, cache_bytes, dtype)
                               for _ in range(args.repeats)), key=lambda r: r["tokens_per_s"])
                    row.update(shape=shape, trace=trace_kind, batch=batch, policy=policy, distinct_bytes_per_token=bound)
                    rows[policy] = row
                    entry["runs"].append(row)
                for policy, row in rows.items():
                    row["speedup_vs_full"] = row["tokens_per_s"] / rows["full"]["tokens_per_s"]
                    print(f"{shape:8} {trace_kind:9} {batch:>2} {policy:16} {row['tokens_per_s']:9.1f} "
                          f"{row['bytes_per_token'] / 2**20:10.3f} {row['bytes_per_token'] / bound:10.2f} "
                          f"{100 * row.get('hit_rate', 0):7.1f}% {row.get('ids_to_host_ms_per_layer_step', 0):8.3f}ms "
                          f"{row['speedup_vs_full']:12.2f} {100 * row.get('device_step_share', 0):11.0f}%")
        if "prefill" in parts:
            entry["prefill"] = prefill(device, weights, args.prefill_tokens, dtype, rounds=args.prefill_rounds)
            print_prefill(shape, entry["prefill"])
        if "predict" in parts:
            trace = synthetic_trace("skewed", args.layers, E, top_k, 1, args.steps, seed=1)
            entry["prediction_order"] = prediction_order(device, weights, trace, warm, cache_bytes, dtype,
                                                         args.predict_rounds)
            print_prediction_order(shape, entry["prediction_order"])
        for key, stats in entry["traces"].items():
            if key.endswith("batch1"):
                print(f"{shape:8} trace {key:18} top-quarter share {100 * stats['top_quarter_share']:.1f}% (max layer "
                      f"{100 * stats['top_quarter_share_max']:.1f}%), token-to-token reuse {100 * stats['reuse']:.1f}% "
                      f"(chance {100 * stats['chance_reuse']:.1f}%)")
        for key, rec in entry["prediction"].items():
            print(f"{shape:8} prediction recall (demo model, {key}): {100 * rec['predicted_layers_recall']:.1f}% of the "
                  f"routed experts of predicted layers ({100 * rec['prediction_recall']:.1f}% of all layers')")
        results["shapes"][shape] = entry
    results["targets"] = targets(results)
    print("targets (" + results["device"] + "):")
    for line in results["targets"]:
        print("  " + line)
    json_path.write_text(json.dumps(results, indent=1))
    json_path.with_name(json_path.stem + "_targets.txt").write_text("\n".join(results["targets"]) + "\n")
    if "decode" not in parts:  # the chart is of the decode runs
        print(f"wrote {json_path}")
        return 0
    png = json_path.with_suffix(".png")
    chart(results, png)
    print(f"wrote {json_path} and {png}")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
