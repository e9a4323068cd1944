"""Record the expert cache's slot table, expert maps and per-layer counts after every step of seeded
random `on_demand` runs (with predictions, every eviction), to compare two builds of the bookkeeping:

  cd <checkout A> && python scripts/cache_trace.py /tmp/a.pt
  cd <checkout B> && python /path/to/scripts/cache_trace.py /tmp/b.pt
  python scripts/cache_trace.py --compare /tmp/a.pt /tmp/b.pt      # "identical", or the first difference

Run from a checkout's root: its moe_swap (and its built _C) is the one imported. Policy auto is left
out: its decisions depend on a cost model measured at run time.
"""

import argparse
import os
import sys

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

# (seeds, layers, experts, widest step in tokens, most predicted experts): small pools that evict often
CONFIGS = ((range(0, 24), 3, 8, 6, 4), (range(100, 140), 4, 16, 11, 8))
STEPS = 60


def record() -> list:
    from moe_swap import WeightStreamer

    runs = []
    for seeds, L, E, widest, most_predicted in CONFIGS:
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            eviction = ("lru", "lfu", "flru")[seed % 3]
            cache_experts = int(torch.randint(0, 2 * E, (1,), generator=g))
            layers = [(torch.randn(E, 8, 16, generator=g), torch.randn(E, 16, 4, generator=g)) for _ in range(L)]
            expert_bytes = (8 * 16 + 16 * 4) * 4
            rec = []
            with WeightStreamer("cpu", policy="on_demand", eviction=eviction,
                                cache_bytes=cache_experts * expert_bytes) as s:
                for w13, w2 in layers:
                    s.add_layer(w13, w2)
                for step in range(STEPS):
                    layer = step % L
                    width = int(torch.randint(1, widest + 1, (1,), generator=g))
                    popularity = torch.rand(E, generator=g) ** 3
                    ids = torch.multinomial(popularity.expand(width, E), 2, generator=g).to(torch.int32)
                    if torch.rand(1, generator=g) < 0.5:
                        n = int(torch.randint(1, most_predicted + 1, (1,), generator=g))
                        s.predict((layer + 1) % L, torch.multinomial(popularity, n, generator=g))
                    _, _, expert_map = s.acquire_experts(layer, ids)
                    rec.append(("acquire", step, expert_map.tolist(), s.cache_state()["entries"]))
                    s.release_experts(layer)
                    counts = [(l["expert_hits"], l["expert_misses"], l["evictions"], l["predicted"], l["predicted_used"])
                              for l in s.stats()["layers"]]
                    rec.append(("release", step, s.cache_state()["entries"], counts))
            runs.append(((seed, L, E, eviction, cache_experts), rec))
    return runs


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    for (key_a, rec_a), (key_b, rec_b) in zip(a, b):
        if key_a != key_b or rec_a != rec_b:
            first = next((i for i, (x, y) in enumerate(zip(rec_a, rec_b)) if x != y), None)
            print(f"DIFFERENT: run {key_a} vs {key_b}, record {first}:\n  {rec_a[first] if first is not None else ''}\n"
                  f"  {rec_b[first] if first is not None else ''}")
            return 1
    if len(a) != len(b):
        print(f"DIFFERENT: {len(a)} runs against {len(b)}")
        return 1
    print(f"identical: {len(a)} runs, {sum(len(r) for _, r in a) // 2} steps")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="where to write this checkout's recording (.pt)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two recordings")
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("give an output path, or --compare A B")
    runs = record()
    torch.save(runs, args.out)
    print(f"recorded {len(runs)} runs, {sum(len(r) for _, r in runs) // 2} steps -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
