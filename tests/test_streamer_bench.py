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
