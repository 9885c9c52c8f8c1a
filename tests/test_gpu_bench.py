"""benchmarks/gpu_bench.py in its CPU smoke mode: the code path a GPU machine runs, end to end."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_its_arms_and_writes_the_result_files(tmp_path):
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_bench.py", "--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "w")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert {"benchmark", "dataset", "command", "machine", "metrics", "goal"} <= set(result)
    for arm in ("default", "smollm2_lora"):
        assert result["metrics"][f"{arm}_1gpu_tokens_per_s"] > 0
        assert result["metrics"][f"{arm}_1gpu_flops_per_token"] > 0
        assert result["metrics"][f"{arm}_1gpu_peak_rss_gib"] > 0
    assert "| default_1gpu_tokens_per_s |" in (tmp_path / "gpu.md").read_text()
