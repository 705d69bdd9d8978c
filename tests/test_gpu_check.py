"""benchmarks/gpu_check.py in its tiny CPU mode: every check runs and passes, and the report
names the device, so `make gpu-check` cannot rot between the sessions that have a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_in_tiny_cpu_mode(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--text",
                           str(REPO / "tests" / "data" / "sonnets.txt"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    checks = report["checks"]
    assert set(checks) == {"sampling", "throughput", "loss", "defaults", "configs", "compile", "resume",
                           "hf_export"}
    assert all(c["ok"] for c in checks.values())
    runs = checks["configs"]["runs"]
    assert len(runs) == 12 and sum("first" in r for r in runs.values()) == 9  # DeepSpeed's fp16 needs a GPU
    assert "first" in runs["zero0_fp16"]  # fp16 through torch.autocast runs on CPU
    assert checks["compile"]["zero1"]["graph_breaks"] == 0 and checks["compile"]["zero3"]["graphs"] == 0
    assert checks["compile"]["zero0_bf16"]["graph_breaks"] == 0  # the GPU default: autocast around the graph
    assert checks["resume"]["max_abs_loss_difference"] == 0.0
    md = (tmp_path / "gpu_report.md").read_text()
    assert md.startswith(f"### mtgpt gpu-check on {report['device']}") and md.count("| ok |") == 8
