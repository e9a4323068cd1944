"""moe_swap.load: a safetensors folder -> model with streamed experts, against transformers' own loader."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_swap
from moe_swap.loader import CheckpointIndex
from test_offload import FAMILIES, greedy, logits, prompt, tiny_model


def saved(tmp_path, model_type, **kwargs):
    model = tiny_model(model_type, **kwargs)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("model_type", FAMILIES)
def test_load_matches_from_pretrained(tmp_path, model_type):
    saved(tmp_path, model_type)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = prompt()
    expected = greedy(reference, ids)
    expected_logits = logits(reference, ids)

    model = moe_swap.load(str(tmp_path), device="cpu")

    report = model.moe_swap_report
    assert report.streamed_layers == report.moe_layers
    assert not any(p.is_meta for p in model.parameters())
    assert not any(".experts." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, ids), expected_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(model, ids), expected)


def test_load_sharded_bfloat16_with_budget(tmp_path):
    model = tiny_model("qwen2_moe", num_hidden_layers=4).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 2
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = prompt()

    layer_bytes = 3 * 8 * 48 * 64 * 2
    loaded = moe_swap.load(str(tmp_path), device="cpu", gpu_budget=sum(
        p.numel() * 2 for n, p in model.named_parameters() if "experts." not in n or "shared" in n)
        + 4096 + 3 * layer_bytes)
    report = loaded.moe_swap_report
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert len(report.resident_layers) >= 1 and report.streamed_layers
    got, expected = logits(loaded, ids), logits(reference, ids)
    scale = expected.abs().max()
    assert (got - expected).abs().mean() <= 0.01 * scale


@pytest.mark.parametrize("dtype", ["bfloat16", "torch.bfloat16", torch.bfloat16])
def test_load_takes_dtype_as_transformers_spells_it(tmp_path, dtype):
    tiny_model("qwen3_moe", num_hidden_layers=2).save_pretrained(tmp_path)
    loaded = moe_swap.load(str(tmp_path), device="cpu", dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be None or 'auto'.*got 'int8'"):
        moe_swap.load(str(tmp_path), device="cpu", dtype="int8")


def test_load_reports_time_and_peak_host_memory(tmp_path):
    saved(tmp_path, "mixtral")
    model = moe_swap.load(str(tmp_path), device="cpu")
    load = model.moe_swap_report.load
    assert load["seconds"] > 0
    assert load["peak_host_bytes"] >= load["host_bytes_before"] > 0
    assert "peak host memory" in str(model.moe_swap_report)


def test_missing_expert_tensors_are_named(tmp_path):
    saved(tmp_path, "qwen3_moe")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    dropped = ["model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.2.mlp.experts.0.down_proj.weight"]
    for key in dropped:
        del tensors[key]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing expert tensors") as info:
        moe_swap.load(str(tmp_path), device="cpu")
    for key in dropped:
        assert key in str(info.value)


def test_missing_non_expert_tensor_is_named(tmp_path):
    saved(tmp_path, "olmoe")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.weight"):
        moe_swap.load(str(tmp_path), device="cpu")


def test_fused_expert_names_are_read_too(tmp_path):
    model = saved(tmp_path, "qwen3_moe")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    for layer in range(3):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = torch.stack([torch.cat([tensors.pop(f"{prefix}{e}.gate_proj.weight"),
                                          tensors.pop(f"{prefix}{e}.up_proj.weight")]) for e in range(8)])
        down = torch.stack([tensors.pop(f"{prefix}{e}.down_proj.weight") for e in range(8)])
        tensors[f"{prefix}gate_up_proj"], tensors[f"{prefix}down_proj"] = gate_up, down
    save_file(tensors, file, metadata={"format": "pt"})
    ids = prompt()
    expected = greedy(model, ids)
    loaded = moe_swap.load(str(tmp_path), device="cpu")
    assert torch.equal(greedy(loaded, ids), expected)


def test_unsupported_architecture_says_what_is_supported(tmp_path):
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                      "hidden_size": 64, "num_attention_heads": 4}))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="llama.*experts interface.*model types are mixtral"):
        moe_swap.load(str(tmp_path), device="cpu")


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        moe_swap.load(str(tmp_path / "nope"), device="cpu")


def test_checkpoint_index_reads_what_safetensors_wrote(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int64)}
    save_file(tensors, tmp_path / "model.safetensors")
    index = CheckpointIndex(str(tmp_path))
    for key, value in tensors.items():
        assert torch.equal(index.read(key), value)
    out = torch.empty(3, 5, dtype=torch.bfloat16)
    index.read_into("a", out)  # converts
    assert torch.equal(out, tensors["a"].to(torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        index.read_into("a", torch.empty(5, 3))


_PEAK_SCRIPT = r"""
import json, sys
import moe_swap
model = moe_swap.load(sys.argv[1], device="cpu")
r = model.moe_swap_report
print(json.dumps({"peak": r.load["peak_host_bytes"], "before": r.load["host_bytes_before"],
                  "reset": r.load["peak_is_load_only"], "host": r.pinned_bytes,
                  "weights": r.device_bytes - r.slots * r.slot_bytes}))
"""


def test_load_peak_host_memory_stays_near_the_host_store(tmp_path):
    """Loading never holds the experts twice: peak growth <= HostStore + non-expert weights + slack."""
    import subprocess
    import sys

    model = tiny_model("qwen3_moe", hidden_size=256, num_hidden_layers=2, moe_intermediate_size=512,
                       num_experts=32, vocab_size=256)
    model.save_pretrained(tmp_path)
    expert_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    assert expert_bytes == 2 * 32 * 3 * 512 * 256 * 4  # 96 MiB
    del model
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    if not measured["reset"]:
        pytest.skip("cannot reset the process's peak RSS here (/proc/self/clear_refs)")
    assert measured["host"] == expert_bytes
    growth = measured["peak"] - measured["before"]
    # the ring is allocated at the first acquire, after the load; holding the experts twice would add 96 MiB
    assert growth <= measured["host"] + measured["weights"] + 32 * 2**20, (growth, measured)
