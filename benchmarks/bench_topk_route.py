"""topk_route against the same routing written in eager torch (as the transformers routers do it).

One run, side by side, per device: median time per call of the op and of the eager torch routing on
the same logits, for the router shapes of Mixtral, Qwen3-MoE and DeepSeek-V3. Prints a table and
writes JSON (--json PATH).

    python benchmarks/bench_topk_route.py [--device cpu|cuda] [--json out.json]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench this checkout's moe_swap
import moe_swap  # noqa: E402

# name: (E, top_k, topk_route kwargs)
SHAPES = {
    "mixtral": (8, 2, dict(renormalize=True)),
    "qwen3_moe": (128, 8, dict(renormalize=True)),
    "deepseek_v3": (256, 8, dict(scoring="sigmoid", renormalize=True, num_expert_group=8, topk_group=4,
                                 routed_scaling_factor=2.5)),
}


def eager_route(logits, top_k, scoring="softmax", renormalize=False, num_expert_group=1, topk_group=1,
                correction_bias=None, routed_scaling_factor=1.0):
    """The routing as transformers writes it (DeepSeek-V3's router for the grouped case)."""
    scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
    choice = scores + correction_bias if correction_bias is not None else scores
    if num_expert_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, num_expert_group, e // num_expert_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if correction_bias is not None else grouped.amax(-1)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
        choice = choice.masked_fill(~mask.repeat_interleave(e // num_expert_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.int()


def time_call(fn, device, repeats):
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e6)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", default="1,64,512,4096")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'shape':<12}{'T':>6}{'topk_route us':>15}{'eager us':>11}{'speedup':>9}{'same ids':>10}")
    for name, (num_experts, top_k, kwargs) in SHAPES.items():
        for num_tokens in map(int, args.tokens.split(",")):
            logits = torch.randn(num_tokens, num_experts, device=args.device).to(torch.bfloat16)
            kw = dict(kwargs)
            if name == "deepseek_v3":
                kw["correction_bias"] = torch.randn(num_experts, device=args.device) * 0.1
            ours = time_call(lambda: moe_swap.topk_route(logits, top_k, **kw), args.device, args.repeats)
            eager = time_call(lambda: eager_route(logits, top_k, **kw), args.device, args.repeats)
            a, b = moe_swap.topk_route(logits, top_k, **kw), eager_route(logits, top_k, **kw)
            same = (a[1].sort(-1)[0] == b[1].sort(-1)[0]).all(-1).float().mean().item()
            rows.append(dict(shape=name, tokens=num_tokens, experts=num_experts, top_k=top_k, device=args.device,
                             topk_route_us=ours, eager_us=eager, same_id_sets=same))
            print(f"{name:<12}{num_tokens:>6}{ours:>15.1f}{eager:>11.1f}{eager / ours:>9.2f}{same:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
