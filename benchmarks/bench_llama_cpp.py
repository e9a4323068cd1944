"""moe_swap's CPU fused_moe side by side with llama.cpp's CPU backend (ggml) and transformers, on one model.

The model (issue 14's): a seeded random Qwen3-MoE, hidden 1024, moe_intermediate 768, 64 experts, top-8,
4 layers, bfloat16. Its attention is one 64-wide head and its vocabulary 512 tokens, so that the experts
are over 97% of the bytes a token reads: llama.cpp runs the whole model (it has no experts-only entry
point), while moe_swap and transformers run the 4 layers' experts on the same weights with random
routing (the router of a random model routes about as uniformly).

1. The model is written with transformers' save_pretrained, with a tiny byte-level BPE tokenizer built
   here with the `tokenizers` package, and converted with llama.cpp's own convert_hf_to_gguf.py (its
   tokenizer-identification hash is told "qwen2": the benchmark feeds token ids, never text).
2. Decode: tokens/s of one token per call after a short prompt; prefill: tokens/s of one --prefill-token
   call. Rounds alternate the implementations in a rotated order; the median and min-max of the rounds
   are reported, with the read ceiling (bench_ops.measure_read_ceiling) measured in the same run.

Needs llama-cpp-python (`pip install llama-cpp-python` builds llama.cpp from source) and the
convert_hf_to_gguf.py of the same llama.cpp (in its sdist: vendor/llama.cpp/); without either it says
so and exits 0. Run it with the Python that has llama_cpp (a venv with --system-site-packages sees
torch and moe_swap too):

    /tmp/llvenv/bin/python benchmarks/bench_llama_cpp.py --convert /path/to/llama.cpp/convert_hf_to_gguf.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_swap  # noqa: E402
from bench_ops import hf_experts, lscpu_summary, make_routings, measure_read_ceiling  # noqa: E402

SHAPE = dict(hidden=1024, inter=768, experts=64, top_k=8, layers=4, vocab=512)


def build_tokenizer(out_dir: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"the {w} of {i} experts routes tokens to a cache" for i, w in
              enumerate(["layer", "weight", "stream", "slot", "host", "device"] * 50)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return len(fast)


def build_model(out_dir: Path, seed: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out_dir, SHAPE["vocab"])
    config = Qwen3MoeConfig(vocab_size=vocab, hidden_size=SHAPE["hidden"], moe_intermediate_size=SHAPE["inter"],
                            intermediate_size=SHAPE["inter"], num_experts=SHAPE["experts"],
                            num_experts_per_tok=SHAPE["top_k"], num_hidden_layers=SHAPE["layers"],
                            num_attention_heads=1, num_key_value_heads=1, head_dim=64, decoder_sparse_step=1,
                            mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=4096,
                            tie_word_embeddings=False, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(out_dir)
    return model


def convert(model_dir: Path, convert_script: Path, outtype: str, out_file: Path):
    # The converter identifies a BPE tokenizer by hashing how it splits a fixed text; ours is built here
    # and known to no list, so that one lookup is answered ("qwen2", the family's own pre-tokenizer).
    code = (f"import sys; sys.path[:0] = [{str(convert_script.parent)!r}, {str(convert_script.parent / 'gguf-py')!r}]\n"
            "import convert_hf_to_gguf as c\n"
            "from conversion import base\n"
            "for cls in (base.TextModel,):\n"
            "    cls.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
            f"sys.argv = ['convert_hf_to_gguf.py', {str(model_dir)!r}, '--outtype', {outtype!r}, "
            f"'--outfile', {str(out_file)!r}]\n"
            "c.main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{result.stderr[-3000:]}")


def layer_experts(model):
    """Per layer, the experts' [E, 2I, H] and [E, H, I] weights as transformers holds them."""
    out = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        out.append((experts.gate_up_proj.data.contiguous(), experts.down_proj.data.contiguous()))
    return out


def time_call(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--convert", default=os.environ.get("LLAMA_CPP_CONVERT"),
                        help="llama.cpp's convert_hf_to_gguf.py (or $LLAMA_CPP_CONVERT)")
    parser.add_argument("--workdir", default="/tmp/moe_swap_llama_bench", help="where the model and GGUFs go")
    parser.add_argument("--types", default="bf16", help="GGUF weight types to run, comma-separated (bf16,q8_0)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prefill", type=int, default=512, help="prefill tokens per call")
    parser.add_argument("--decode", type=int, default=16, help="decode calls timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench_results/bench_llama_cpp.json")
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("skipping: llama-cpp-python is not installed in this Python (pip install llama-cpp-python)")
        return 0
    if not args.convert or not Path(args.convert).is_file():
        print("skipping: llama.cpp's convert_hf_to_gguf.py not given (--convert PATH or $LLAMA_CPP_CONVERT; it is "
              "in the llama-cpp-python sdist under vendor/llama.cpp/)")
        return 0
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    model_dir = work / "qwen3moe-issue14"
    model = build_model(model_dir, seed=0)
    ggufs = {}
    for outtype in args.types.split(","):
        path = work / f"qwen3moe-issue14-{outtype}.gguf"
        convert(model_dir, Path(args.convert), outtype, path)
        ggufs[outtype] = path
    weights = layer_experts(model)
    H, k, E = SHAPE["hidden"], SHAPE["top_k"], SHAPE["experts"]
    peers = [hf_experts(H, SHAPE["inter"], E, k, w13, w2) for w13, w2 in weights]
    llms = {t: llama_cpp.Llama(model_path=str(p), n_threads=args.threads, n_threads_batch=args.threads,
                               n_ctx=args.prefill + args.decode + 64, n_batch=args.prefill, n_ubatch=args.prefill,
                               verbose=False)
            for t, p in ggufs.items()}
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, SHAPE["vocab"], (args.prefill,), generator=gen).tolist()

    def experts_fns(num_tokens):
        x = torch.randn(num_tokens, H).bfloat16()
        routings = [make_routings(num_tokens, E, k, "cpu") for _ in weights]
        calls = {"n": 0}

        def next_routings():  # a fresh routing per call, as a model's next token gets
            calls["n"] += 1
            return [r[calls["n"] % len(r)] for r in routings]

        def ours():
            for (w13, w2), (w, ids, _) in zip(weights, next_routings()):
                moe_swap.fused_moe(x, w13, w2, w, ids)

        def peer(name):
            def run():
                for p, (w, _, ids) in zip(peers, next_routings()):
                    p[name](x, w, ids)
            return run
        return {"moe_swap fused_moe": ours, "transformers eager": peer("hf_eager"),
                "transformers grouped_mm": peer("hf_grouped_mm")}

    def llama_decode(llm):
        def run():
            llm.reset()
            llm.eval(prompt[:8])
            return statistics.median(time_call(lambda i=i: llm.eval([prompt[8 + i]])) for i in range(args.decode))
        return run

    def llama_prefill(llm):
        def run():
            llm.reset()
            return time_call(lambda: llm.eval(prompt))
        return run

    phases = {"decode": 1, "prefill": args.prefill}
    results = {}
    sums, _ = measure_read_ceiling()
    with torch.inference_mode():
        for phase, num_tokens in phases.items():
            fns = {}
            for name, fn in experts_fns(num_tokens).items():
                calls = 1 if phase == "prefill" else args.decode
                fns[name] = (lambda fn=fn, calls=calls: statistics.median(time_call(fn) for _ in range(calls)))
            for t, llm in llms.items():
                fns[f"llama.cpp {t} (whole model)"] = llama_decode(llm) if phase == "decode" else llama_prefill(llm)
            for fn in fns.values():  # warm-up
                fn()
            per_round = {name: [] for name in fns}
            names = list(fns)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    per_round[name].append(num_tokens / fns[name]())
            results[phase] = {n: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
                              for n, v in per_round.items()}
    sums_after, _ = measure_read_ceiling()
    expert_bytes = 3 * H * SHAPE["inter"] * 2 * k * SHAPE["layers"]  # bf16, top-8 of 4 layers per token
    ceiling = statistics.median(sums + sums_after)
    cpu = lscpu_summary()
    print(f"\n{cpu.get('Model name', '?')}, {args.threads} threads; read ceiling {ceiling:.1f} GB/s "
          f"(start {statistics.median(sums):.1f}, end {statistics.median(sums_after):.1f}); decode reads "
          f"{expert_bytes / 1e6:.1f} MB of bf16 expert weights per token (ceiling {ceiling * 1e9 / expert_bytes:.0f} tok/s)")
    for phase, rows in results.items():
        print(f"{phase} tokens/s ({phases[phase]} per call)")
        for name, v in rows.items():
            extra = f"  {100 * v['median'] * expert_bytes / 1e9 / ceiling:.0f}% of the read ceiling" \
                if phase == "decode" and "bf16" in name or phase == "decode" and "moe_swap" in name else ""
            print(f"  {name:34} {v['median']:8.1f} [{v['min']:.1f}-{v['max']:.1f}]{extra}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "llama_cpp": llama_cpp.__version__,
                               "torch": torch.__version__, "read_ceiling_gbps": ceiling, "shape": SHAPE,
                               "expert_bytes_per_token": expert_bytes, "load_average": os.getloadavg(),
                               "cmdline": sys.argv, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
