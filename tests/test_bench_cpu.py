"""The CPU benchmarks run end to end: bench_ops' quick CPU section on one shape, and bench_llama_cpp's
clean skip where llama-cpp-python or llama.cpp's converter is missing."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_llama_cpp_skips_cleanly_without_llama_cpp_or_its_converter(tmp_path):
    # Here either llama_cpp is not installed, or it is and the converter path does not exist: both skip.
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_llama_cpp.py"), "--convert",
                             str(tmp_path / "no_convert_hf_to_gguf.py"), "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("skipping: "), result.stdout
    assert not any(tmp_path.iterdir())  # nothing built before the check


def test_bench_ops_quick_cpu_one_shape(tmp_path):
    out = tmp_path / "ops.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_ops.py"), "--sections", "cpu", "--quick",
                             "--rounds", "1", "--dtypes", "bfloat16", "--shapes", "qwen3-like", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert {r["num_tokens"] for r in records} == {1, 2, 4, 64}
    for r in records:
        assert r["max_abs_diff_vs_fused_moe"]["hf_eager"] < 0.1, r  # the same numbers as transformers
        assert r["read_ceiling_gbps"] > 0 and r["tokens_per_s"]["fused_moe"] > 0
