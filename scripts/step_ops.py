"""Count the torch ops a decode step dispatches inside the streamer, per policy, to compare two builds:

  cd <checkout> && python scripts/step_ops.py            # a table: per policy, ops per layer-step
  cd <checkout> && python scripts/step_ops.py --json     # the same as JSON
  cd <checkout> && python scripts/step_ops.py --time     # also: microseconds per layer-step (no counting)

Run from a checkout's root: its moe_swap (and its built _C) is the one imported. CPU backend. A decode
step is one token through every layer, as moe_swap.offload runs it: the model computes the routing and
the guess at the next layer's experts (not counted); the streamer's calls (acquire/fused_moe/release,
or moe with the guess) are counted with a TorchDispatchMode, split into moe_swap's own ops and every
other op. Counted over steps after a warm-up (the first step allocates the cache).
"""

import argparse
import collections
import json
import os
import statistics
import time
import sys

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

LAYERS, EXPERTS, HIDDEN, INTER, TOP_K = 4, 8, 16, 8, 2
WARM, STEPS = 3, 10

# name -> (WeightStreamer keyword arguments, whether the step passes a guess at the next layer). Policy
# full: the acquire/fused_moe/release calls, and (".moe") the one-op step moe(), where the build has it.
CASES = {
    "full": (dict(policy="full"), False),
    "full/sync": (dict(policy="full", mode="sync"), False),
    "full/uva": (dict(policy="full", mode="uva"), False),
    "full.moe": (dict(policy="full"), False),
    "full/sync.moe": (dict(policy="full", mode="sync"), False),
    "full/uva.moe": (dict(policy="full", mode="uva"), False),
    "on_demand": (dict(policy="on_demand"), False),
    "on_demand+predict": (dict(policy="on_demand"), True),
    "auto+predict": (dict(policy="auto"), True),
    "device_ids": (dict(policy="on_demand", ids_path="device"), False),
    "device_ids+predict": (dict(policy="on_demand", ids_path="device"), True),
}


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(case: str, time_steps: int = 0) -> dict:
    from moe_swap import WeightStreamer
    from moe_swap.ops import fused_moe

    kwargs, guess = CASES[case]
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g), torch.randn(EXPERTS, HIDDEN, INTER, generator=g))
              for _ in range(LAYERS)]
    routers = [torch.randn(EXPERTS, HIDDEN, generator=g) for _ in range(LAYERS)]
    expert_bytes = (2 * INTER * HIDDEN + HIDDEN * INTER) * 4
    # room for every expert of every layer (and the host path's wide-step room): decode steps all fit
    cache_bytes = 0 if kwargs["policy"] == "full" else (LAYERS + 2) * EXPERTS * expert_bytes
    counter = Counter()
    with WeightStreamer("cpu", cache_bytes=cache_bytes, **kwargs) as s:
        for w13, w2 in layers:
            s.add_layer(w13, w2)
        for step in range(WARM + STEPS):
            x = torch.randn(1, HIDDEN, generator=g)
            for layer in range(LAYERS):
                weights, ids = torch.topk(torch.softmax(x @ routers[layer].T, -1), TOP_K)
                weights, ids = weights.float(), ids.to(torch.int32)
                nxt = (layer + 1) % LAYERS
                next_ids = torch.topk(x @ routers[nxt].T, TOP_K).indices if guess else None
                mode = counter if step >= WARM else None
                if mode is not None:
                    mode.__enter__()
                try:
                    if kwargs["policy"] == "full" and not case.endswith(".moe"):
                        w13, w2 = s.acquire(layer, after=[x])
                        out = fused_moe(x, w13, w2, weights, ids)
                        s.release(layer, after=[out])
                    elif guess:
                        out = s.moe(layer, x, weights, ids, next_layer=nxt, next_ids=next_ids)
                    else:
                        out = s.moe(layer, x, weights, ids)
                finally:
                    if mode is not None:
                        mode.__exit__(None, None, None)
                x = torch.tanh(out)
        us = cpu_us = None
        if time_steps:  # the same steps uncounted, timed: the streamer's own cost per layer-step at these tiny sizes
            samples, cpu_samples = [], []
            for _ in range(5):
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(time_steps):
                    for layer in range(LAYERS):
                        if kwargs["policy"] == "full" and not case.endswith(".moe"):
                            w13, w2 = s.acquire(layer, after=[x])
                            out = fused_moe(x, w13, w2, weights, ids)
                            s.release(layer, after=[out])
                        elif guess:
                            out = s.moe(layer, x, weights, ids, next_layer=(layer + 1) % LAYERS, next_ids=next_ids)
                        else:
                            out = s.moe(layer, x, weights, ids)
                samples.append((time.perf_counter() - t0) / (time_steps * LAYERS) * 1e6)
                # the process's CPU time (every thread, the copy engine's too): what a step costs the
                # machine, less sensitive than the wall clock to a shared machine descheduling us
                cpu_samples.append((time.process_time() - c0) / (time_steps * LAYERS) * 1e6)
            us = statistics.median(samples)
            cpu_us = statistics.median(cpu_samples)
    own = {k: v for k, v in counter.ops.items() if k.startswith("moe_swap.")}
    other = {k: v for k, v in counter.ops.items() if not k.startswith("moe_swap.")}
    per_step = STEPS * LAYERS
    return {"us_per_layer_step": us, "cpu_us_per_layer_step": cpu_us, "moe_swap_ops_per_layer_step": sum(own.values()) / per_step,
            "other_ops_per_layer_step": sum(other.values()) / per_step,
            "moe_swap_ops": {k: v / per_step for k, v in sorted(own.items())},
            "other_ops": {k: v / per_step for k, v in sorted(other.items())}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--time", type=int, default=0, metavar="STEPS",
                   help="also time STEPS decode steps per case (median of 5) in microseconds per layer-step")
    args = p.parse_args()
    import moe_swap

    results = {}
    for case in CASES:
        try:
            results[case] = count(case, args.time)
        except RuntimeError as e:  # a build without this way of running a step
            results[case] = {"error": str(e).splitlines()[0]}
    if args.json:
        print(json.dumps({"moe_swap": moe_swap.__file__, "cases": results}, indent=1))
        return 0
    print(f"moe_swap from {moe_swap.__file__}; {LAYERS} layers, T=1, top_k={TOP_K}; ops per layer-step "
          f"(a decode step is {LAYERS} layer-steps)")
    print(f"{'case':<20} {'moe_swap ops':>12} {'other ops':>10} {'us/step':>8}  other ops by name")
    for case, r in results.items():
        if "error" in r:
            print(f"{case:<20} {'n/a':>12} {'n/a':>10} {'n/a':>8}  ({r['error'][:90]})")
            continue
        names = ", ".join(f"{k.removeprefix('aten.')} {v:g}" for k, v in r["other_ops"].items())
        us = f"{r['us_per_layer_step']:.1f}" if r["us_per_layer_step"] is not None else "-"
        print(f"{case:<20} {r['moe_swap_ops_per_layer_step']:>12g} {r['other_ops_per_layer_step']:>10g} {us:>8}  {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
