"""benchmarks/gpu_check.py in its tiny CPU mode: every check runs and passes, and the report
names the device, so `make gpu-check` cannot rot between the sessions that have a GPU; a mistyped
--only is refused, and a run ended by SIGTERM leaves no temporary folder."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def test_a_mistyped_check_is_refused(tmp_path):
    """--only sampl ran no check and exited 0 with an empty report: a silent pass."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path), "--only", "sampl"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice: 'sampl'" in proc.stderr and "sampling" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_sigterm_leaves_no_temporary_folder(tmp_path):
    """`timeout` (SIGTERM) in the middle of a check left its temporary folder: 1.1 GB of runs."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--tiny", "--text", str(REPO / "tests" / "data" /
                             "sonnets.txt"), "--out", str(tmp_path / "out"), "--only", "resume"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    deadline = time.time() + 300
    while not list(tmp.glob("*/resume*")) and not list(tmp.glob("*/*/checkpoints")) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    time.sleep(3)  # in the middle of the check's training
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert not list(tmp.glob("tmp*")), sorted(p.name for p in tmp.rglob("*"))[:20]  # (caches of tiktoken and inductor stay)


@pytest.mark.slow
def test_gpu_check_in_tiny_cpu_mode(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--text",
                           str(REPO / "tests" / "data" / "sonnets.txt"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    checks = report["checks"]
    assert set(checks) == {"sampling", "throughput", "loss", "fused", "defaults", "configs", "compile", "resume",
                           "hf_export"}
    assert all(c["ok"] for c in checks.values())
    runs = checks["configs"]["runs"]
    assert len(runs) == 12 and sum("first" in r for r in runs.values()) == 9  # DeepSpeed's fp16 needs a GPU
    assert "first" in runs["zero0_fp16"]  # fp16 through torch.autocast runs on CPU
    assert checks["compile"]["zero1"]["graph_breaks"] == 0 and checks["compile"]["zero3"]["graphs"] == 0
    assert checks["compile"]["zero0_bf16"]["graph_breaks"] == 0  # the GPU default: autocast around the graph
    assert checks["resume"]["max_abs_loss_difference"] == 0.0
    md = (tmp_path / "gpu_report.md").read_text()
    assert md.startswith(f"### mtgpt gpu-check on {report['device']}") and md.count("| ok |") == 9
    rows = [line for line in md.splitlines() if line.startswith("| ") and "| ok |" in line]
    # three cells a row: a | inside one ("max |loss difference|") is escaped, or the table loses the numbers
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 4 for row in rows), rows
    assert "max \\|loss difference\\|" in md
