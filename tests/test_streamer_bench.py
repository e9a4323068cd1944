"""benchmarks/bench_stream.py runs end to end on the CPU backend and writes its JSON and timelines."""

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_stream.py"


def test_bench_stream_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_stream", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        report = bench.main(["--device", "cpu", "--model", "qwen3", "--scale", "32", "--layers", "3",
                             "--passes", "1", "--ratios", "1", "--out", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "r.json").read_text())
    row = saved["models"]["qwen3"]["rows"][0]
    assert set(row["modes"]) == {"full", "sync", "uva"}
    layer_bytes = saved["models"]["qwen3"]["layer_bytes"]
    assert row["modes"]["sync"]["bytes_per_step"] == 3 * layer_bytes  # every layer, every step
    assert row["modes"]["full"]["bytes_per_step"] == 3 * layer_bytes  # 3 layers > 2 slots
    assert row["modes"]["uva"]["bytes_per_step"] == 0
    assert all(row["modes"][m]["step_s"] > 0 for m in row["modes"])
    assert Path(row["timeline_png"]).stat().st_size > 10_000
    assert report["peak_copy_GBps"] > 0


def test_bench_expert_smoke_transformers(tmp_path):
    """benchmarks/bench_expert.py (the GPU check's first benchmark) runs end to end on the CPU backend,
    the recorded trace included (it runs the demo model under transformers), and reports the issue's
    targets; a cold cache copies exactly the distinct routed experts."""
    spec = importlib.util.spec_from_file_location("bench_expert", BENCH.parent / "bench_expert.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--device", "cpu", "--shapes", "mixtral", "--scale", "64", "--steps", "8",
                           "--repeats", "1", "--batch-sizes", "1,2", "--traces", "skewed,recorded",
                           "--prefill-rounds", "1", "--prefill-tokens", "16", "--predict-rounds", "1",
                           "--out", str(tmp_path / "e.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "e.json").read_text())
    runs = saved["shapes"]["mixtral"]["runs"]
    assert {(r["trace"], r["batch"]) for r in runs} == {(t, b) for t in ("skewed", "recorded") for b in (1, 2)}
    assert {r["policy"] for r in runs} == set(bench.POLICIES)
    for r in runs:
        assert r["tokens_per_s"] > 0
        if r["policy"] == "on_demand_cold":
            assert abs(r["bytes_per_token"] / r["distinct_bytes_per_token"] - 1.0) < 1e-9
    assert set(saved["shapes"]["mixtral"]["prediction"]) == {"batch1", "batch2"}
    targets = (tmp_path / "e_targets.txt").read_text().splitlines()
    assert targets == saved["targets"]
    assert any(line.startswith("mixtral: cold cache bytes/token <= 1.05x distinct: max 1.000x") for line in targets)
    assert any("prefill auto/full" in line for line in targets)
    order = saved["shapes"]["mixtral"]["prediction_order"]["variants"]
    assert set(order) == set(bench.PREDICT_VARIANTS) and order["none"]["predicted"] == 0
    assert order["oracle_with"]["prediction_recall"] > 0 and order["oracle_before"]["prediction_recall"] > 0
    assert (tmp_path / "e.png").stat().st_size > 10_000
