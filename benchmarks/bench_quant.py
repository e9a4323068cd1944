"""fused_moe_quant on the CPU, per format, side by side with bf16 fused_moe and the machine's read ceiling.

One run measures everything it compares (the helpers are bench_ops.py's):
  - bytes per token: the bytes of one expert (weights, scales, zero points) per format vs bf16;
  - decode (T = 1, 4): GB/s of the selected experts' quantized bytes, vs the read ceiling measured in the
    same run (a multi-threaded streaming sum over a buffer 16x the L3); tokens/s vs bf16 fused_moe;
  - middle / prefill (T = 64, 333): tokens/s vs bf16 fused_moe.
Every call gets the next of several routings and the next of several copies of the layer (together at least
8x the L3), so the weights come from memory. Rounds alternate the formats in a rotated order; the report is
the median of the round medians and their spread.

    python benchmarks/bench_quant.py                       # every shape, format and T
    python benchmarks/bench_quant.py --quick --out bench_results/quant.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_swap  # noqa: E402
from bench_ops import l3_bytes, lscpu_summary, make_routings, measure_read_ceiling, summary, time_rounds  # noqa: E402
from moe_swap import quant  # noqa: E402

SHAPES = {
    # name: (hidden H, intermediate I, experts E, top_k k)
    "mixtral-like": (1024, 2816, 8, 2),
    "qwen3-issue14": (1024, 768, 64, 8),
}
TOKENS = {"decode": [1, 4], "middle": [64], "prefill": [333]}
# name: (format, group_size, zero points, scale dtype)
FORMATS = {
    "fp8_block": ("fp8_block", 0, False, torch.float32),
    "mxfp4": ("mxfp4", 0, False, None),
    "int4_g128": ("int4", 128, False, torch.bfloat16),
    "int4_g32_zp": ("int4", 32, True, torch.float16),
    "int8": ("int8", 0, False, torch.float32),
}


def random_layer(fmt, group, zero, scale_dtype, hidden, inter, experts):
    """A layer's w13 and w2 in fmt's layout, random bytes (timing does not depend on the values)."""
    def matrix(n, k, segments):
        cdiv = lambda a, b: -(-a // b)  # noqa: E731
        if fmt == "fp8_block":
            q = torch.randint(0, 126, (experts, n, k), dtype=torch.uint8).view(torch.float8_e4m3fn)
            s = torch.rand(experts, segments * cdiv(n // segments, 128), cdiv(k, 128)) / 1000
            return quant.QuantWeight(fmt, q, s, None, n, k, 128, segments)
        if fmt == "mxfp4":
            return quant.QuantWeight(fmt, torch.randint(0, 256, (experts, n, cdiv(k, 32) * 16), dtype=torch.uint8),
                                     torch.randint(118, 122, (experts, n, cdiv(k, 32)), dtype=torch.uint8), None, n, k, 32)
        if fmt == "int4":
            s = (torch.rand(experts, n, cdiv(k, group)) / 100).to(scale_dtype)
            z = torch.randint(0, 16, s.shape, dtype=torch.uint8) if zero else None
            return quant.QuantWeight(fmt, torch.randint(0, 256, (experts, n, cdiv(k, 2)), dtype=torch.uint8), s, z, n, k,
                                     group)
        return quant.QuantWeight(fmt, torch.randint(-128, 128, (experts, n, k), dtype=torch.int8),
                                 torch.rand(experts, n) / 1000, None, n, k, k)
    return quant.check(matrix(2 * inter, hidden, 2)), quant.check(matrix(hidden, inter, 1))


def run(shapes, tokens, rounds, seconds):
    sums, copies = measure_read_ceiling()
    records = []
    for shape in shapes:
        hidden, inter, experts, top_k = SHAPES[shape]
        bf16_w13 = [(torch.randn(experts, 2 * inter, hidden) / 32).bfloat16()]
        bf16_w2 = [(torch.randn(experts, hidden, inter) / 32).bfloat16()]
        bf16_layer = sum(t.numel() * 2 for t in (bf16_w13[0], bf16_w2[0]))
        need = 8 * l3_bytes()
        bf16_w13 += [bf16_w13[0].clone() for _ in range(math.ceil(need / bf16_layer) - 1)]
        bf16_w2 += [bf16_w2[0].clone() for _ in range(len(bf16_w13) - 1)]
        layers = {}
        for name, (fmt, group, zero, sdt) in FORMATS.items():
            w13, w2 = random_layer(fmt, group, zero, sdt, hidden, inter, experts)
            copies_needed = math.ceil(need / (w13.nbytes + w2.nbytes))
            layers[name] = [(w13, w2)] + [random_layer(fmt, group, zero, sdt, hidden, inter, experts)
                                          for _ in range(copies_needed - 1)]
        per_expert = {"bf16": bf16_layer / experts}
        per_expert.update({n: (l[0][0].nbytes + l[0][1].nbytes) / experts for n, l in layers.items()})
        for phase, counts in tokens.items():
            for t in counts:
                routings = make_routings(t, experts, top_k, "cpu")
                xs = [torch.randn(t, hidden).bfloat16() for _ in routings]

                def bf16_call(i):
                    w, ids, _ = routings[i % len(routings)]
                    c = i % len(bf16_w13)
                    moe_swap.fused_moe(xs[i % len(xs)], bf16_w13[c], bf16_w2[c], w, ids)

                fns = {"bf16": bf16_call}
                for name, copies_list in layers.items():
                    def call(i, copies_list=copies_list):
                        w, ids, _ = routings[i % len(routings)]
                        w13, w2 = copies_list[i % len(copies_list)]
                        moe_swap.fused_moe_quant(xs[i % len(xs)], w13.qweight, w13.scale, w2.qweight, w2.scale, w, ids,
                                                 w13.format, w13.group_size if w13.format == "int4" else 0, w13.zero,
                                                 w2.zero)
                    fns[name] = call
                per_round = time_rounds(fns, num_calls=5 if t <= 4 else 2, rounds=rounds, seconds_per_round=seconds)
                distinct = statistics.mean(len(torch.unique(r[1])) for r in routings)
                base = statistics.median(per_round["bf16"])
                for name, times in per_round.items():
                    sec = statistics.median(times)
                    rec = {"shape": shape, "phase": phase, "num_tokens": t, "format": name, "seconds": summary(times),
                           "tokens_per_s": t / sec, "vs_bf16_tokens_per_s": base / sec,
                           "bytes_per_expert": per_expert[name],
                           "bytes_vs_bf16": per_expert[name] / per_expert["bf16"],
                           "read_gbps": distinct * per_expert[name] / sec / 1e9,
                           "read_ceiling_gbps": statistics.median(sums)}
                    rec["fraction_of_read_ceiling"] = rec["read_gbps"] / rec["read_ceiling_gbps"]
                    records.append(rec)
                    print(f"{shape:14s} {phase:8s} T={t:<4d} {name:12s} {rec['bytes_vs_bf16']:5.3f}x bytes | "
                          f"{rec['tokens_per_s']:9.1f} tok/s ({rec['vs_bf16_tokens_per_s']:4.2f}x bf16) | "
                          f"{rec['read_gbps']:6.1f} GB/s = {100 * rec['fraction_of_read_ceiling']:3.0f}% of "
                          f"{rec['read_ceiling_gbps']:.1f}", flush=True)
    sums_after, _ = measure_read_ceiling()
    return records, {"read_ceiling_gbps": summary(sums), "copy_read_gbps": summary(copies),
                     "read_ceiling_gbps_at_end": summary(sums_after)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--quick", action="store_true", help="decode and T=64 only, 3 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 keeps a loaded machine's "
                        "descheduled threads out of the parallel regions' joins")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = {k: v for k, v in TOKENS.items() if k != "prefill"} if args.quick else TOKENS
    rounds = 3 if args.quick else args.rounds
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    records, ceilings = run(args.shapes, tokens, rounds, seconds=0.5)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
              "cpu": lscpu_summary(), "threads": torch.get_num_threads(),
              "kernel_build": moe_swap.ops.cpu_kernel_build(), "ceilings": ceilings, "records": records}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    decode = [r for r in records if r["phase"] == "decode" and r["format"] != "bf16"]
    if decode:
        worst = min(decode, key=lambda r: r["fraction_of_read_ceiling"])
        print(f"decode read rate: {min(r['fraction_of_read_ceiling'] for r in decode):.0%} - "
              f"{max(r['fraction_of_read_ceiling'] for r in decode):.0%} of the read ceiling "
              f"(worst: {worst['shape']}/{worst['format']}/T{worst['num_tokens']}; target >= 70%)")


if __name__ == "__main__":
    main()
