"""python -m moe_swap demo|bench|info: help texts, a tiny demo that checks its tokens, bench outputs."""

import json
import subprocess
import sys

import pytest
import torch

import moe_swap

from moe_swap import cli

TINY_CONFIG = {
    "model_type": "qwen3_moe", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
    "moe_intermediate_size": 48, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "max_position_embeddings": 256, "initializer_range": 0.08, "tie_word_embeddings": False,
}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.mark.parametrize("command", ["demo", "bench", "info"])
def test_help_of_each_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert "usage: python -m moe_swap " + command in capsys.readouterr().out


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "moe_swap", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "demo" in out.stdout and "bench" in out.stdout


def test_shipped_configs_exist():
    assert {"qwen3_moe_small", "mixtral_small"} <= set(cli._shipped_configs())


def test_demo_checks_tokens_and_prints_the_table(tiny_config, capsys):
    assert cli.main(["demo", "--config", tiny_config, "--device", "cpu", "--new-tokens", "6", "--prompt-len", "5",
                     "--batch", "2"]) == 0
    out = capsys.readouterr().out
    for piece in ("moe_swap offload", "tokens/s moe_swap", "tokens/s unmodified model", "bytes streamed / token",
                  "GB/s", "waiting on copies", "device weights", "host store", "OK: the 12 generated tokens"):
        assert piece in out, out


def test_demo_with_a_checkpoint_folder_and_budget(tmp_path, capsys):
    config = tmp_path / "four_layers.json"
    config.write_text(json.dumps(dict(TINY_CONFIG, num_hidden_layers=4)))
    folder = cli.build_random_checkpoint(str(config), str(tmp_path / "ckpt"), torch.float32, seed=3)
    # ~270 KiB of non-expert weights, 288 KiB per MoE layer: 2 slots + 1 resident layer fit, 3 layers stream
    assert cli.main(["demo", "--model", folder, "--device", "cpu", "--new-tokens", "4", "--gpu-budget", "1150KiB"]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out
    resident = next(line for line in out.splitlines() if "resident layers" in line)
    streamed = next(line for line in out.splitlines() if "streamed layers" in line)
    assert "none" not in resident and "none" not in streamed, out


def test_demo_rejects_unknown_policy_and_budget_with_a_message(tiny_config, capsys):
    assert cli.main(["demo", "--config", tiny_config, "--device", "cpu", "--policy", "bogus", "--no-check"]) == 2
    assert "error: policy must be one of full" in capsys.readouterr().err
    assert cli.main(["demo", "--config", tiny_config, "--device", "cpu", "--gpu-budget", "1KiB", "--no-check"]) == 2
    assert "too small" in capsys.readouterr().err


def test_demo_on_a_missing_folder_says_so(tmp_path, capsys):
    assert cli.main(["demo", "--model", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "nope" in capsys.readouterr().err


def test_unknown_config_lists_the_shipped_ones():
    with pytest.raises(SystemExit, match="qwen3_moe_small"):
        cli.main(["demo", "--config", "nope", "--device", "cpu"])


def test_bench_writes_json_and_png(tmp_path, tiny_config, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "--config", tiny_config, "--device", "cpu", "--batch-sizes", "1,2", "--prompt-len", "8",
                     "--decode-tokens", "3", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads((out / "bench.json").read_text())
    modes = {r["mode"] for r in results["runs"]}
    assert modes == {"resident", "fused_resident", "full", "sync", "on_demand", "auto", "auto_device"}
    assert set(results["skipped"]) == {"uva", "accelerate"}  # GPU only
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in results["runs"])
    assert (out / "bench.png").stat().st_size > 1000
    for r in results["runs"]:  # the median round, and the spread of the rounds around it
        low, high = r["decode_tokens_per_s_min_max"]
        assert low <= r["decode_tokens_per_s"] <= high
    printed = capsys.readouterr().out
    assert "decode vs full" in printed and "[min-max]" in printed
    # the skipped modes are said before any measurement
    assert printed.index("skipped uva") < printed.index("resident")


@pytest.mark.parametrize("argv, message", [
    (["demo", "--device", "cuda:0"], "torch.cuda.is_available() is False"),
    (["demo", "--device", "tpu"], "device must be"),
    (["demo", "--device", "cpu", "--policy", "nope"], "policy must be one of"),
    (["demo", "--device", "cpu", "--gpu-budget", "lots"], "--gpu-budget='lots' is not a size"),
    (["demo", "--device", "cpu", "--slots", "1"], "slots must be an int >= 2"),
    (["bench", "--device", "cpu", "--gpu-budget", "-3"], "is not a size"),
])
def test_bad_options_fail_before_any_model_is_built(argv, message, capsys, monkeypatch):
    if "cuda" in argv[2] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    built = []
    monkeypatch.setattr(cli, "build_random_checkpoint", lambda *a, **k: built.append(a))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not built


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "CUDA kernels built" in out
    assert f"CPU kernel build    {moe_swap.ops.cpu_kernel_build()} " in out
    if not torch.cuda.is_available():
        assert "need a GPU" in out


def test_demo_on_demand_prints_the_cache_table(tiny_config, capsys):
    assert cli.main(["demo", "--config", tiny_config, "--device", "cpu", "--policy", "on_demand", "--predict",
                     "--eviction", "flru", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "expert cache per streamed layer" in out and "hit rate" in out and "OK:" in out


def test_demo_device_ids_path(tiny_config, capsys):
    assert cli.main(["demo", "--config", tiny_config, "--device", "cpu", "--policy", "on_demand", "--ids-path",
                     "device", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "routed ids read on the device" in out and "device steps" in out and "OK:" in out
