"""monitor.py in process: metrics.jsonl and TensorBoard (read back with TensorBoard's own reader),
the purge on resume, a torn last line, MFU."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtgpt import monitor
from mtgpt.config import ModelConfig
from mtgpt.model import GPT, flops_per_token
from tests.conftest import TINY


def _scalars(run, tag):
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_log_then_resume_drops_the_later_steps(tmp_path):
    log = monitor.Monitor(tmp_path, enabled=True)
    for step in range(1, 7):
        log.log({"train/loss": 10.0 - step}, step)
    log.log({"val/loss": 4.5}, 6)
    log.text("sample", "ROMEO:\nBut *soft*,\n# what light", 6)
    log.close()
    assert (tmp_path / "loss.png").is_file()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    [event] = acc.Tensors("sample/text_summary")  # TensorBoard's Markdown keeps a code block's lines as written
    assert event.tensor_proto.string_val[0].decode() == "    ROMEO:\n    But *soft*,\n    # what light"
    assert [r["step"] for r in monitor.read_metrics(tmp_path / monitor.METRICS, print)] == [1, 2, 3, 4, 5, 6, 6]

    log = monitor.Monitor(tmp_path, enabled=True, resume_step=4)  # resumed from the step-4 checkpoint
    assert [r["step"] for r in log.history] == [1, 2, 3, 4]
    for step in (5, 6):
        log.log({"train/loss": 20.0 + step}, step)
    log.close()
    rows = monitor.read_metrics(tmp_path / monitor.METRICS, print)
    assert [(r["step"], r["train/loss"]) for r in rows][-3:] == [(4, 6.0), (5, 25.0), (6, 26.0)]
    assert _scalars(tmp_path, "train/loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 25.0), (6, 26.0)]

    log = monitor.Monitor(tmp_path, enabled=True)  # a fresh start over an old log: it is emptied
    assert log.history == [] and (tmp_path / monitor.METRICS).read_text() == ""
    log.close()


def test_a_run_folder_moved_while_training_stops_the_log_in_one_line(tmp_path):
    """`mv RUN elsewhere` while it trained: TensorBoard's writer thread died with a traceback and the
    next save made a new RUN at the old path. The next log step says what happened, writes nothing."""
    run = tmp_path / "run"
    run.mkdir()
    log = monitor.Monitor(run, enabled=True)
    log.log({"train/loss": 5.0}, 1)
    run.rename(tmp_path / "moved")
    with pytest.raises(monitor.RunFolderGone, match=rf"the run folder {run} was moved or deleted while the run "
                                                    r"trained: .* mtgpt train --out NEW_PATH --resume auto"):
        log.log({"train/loss": 4.0}, 2)
    log.text("sample", "x", 2)  # (nothing more: not at the old path)
    log.close()
    assert not run.exists() and len((tmp_path / "moved" / monitor.METRICS).read_text().splitlines()) == 1


def test_non_finite_values_and_other_ranks(tmp_path):
    log = monitor.Monitor(tmp_path, enabled=True)
    log.log({"train/loss": float("nan"), "lr": 1e-3}, 1)
    log.close()
    row = json.loads((tmp_path / monitor.METRICS).read_text())
    assert row == {"step": 1, "train/loss": "nan", "lr": 1e-3}  # JSON has no NaN
    assert monitor.last([row], "train/loss") != monitor.last([row], "train/loss")  # nan: no float logged
    quiet = monitor.Monitor(tmp_path / "rank1", enabled=False)
    quiet.log({"train/loss": 1.0}, 1)
    assert not (tmp_path / "rank1").exists()


def test_torn_last_line(tmp_path):
    path = tmp_path / monitor.METRICS
    path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
    warnings = []
    assert monitor.read_metrics(path, warnings.append) == [{"step": 1, "train/loss": 2.0}]
    assert "line 2 is torn" in warnings[0]
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(monitor.MetricsError, match="metrics.jsonl:2: not a metrics line"):
        monitor.read_metrics(path, warnings.append)


def test_throughput_and_mfu(monkeypatch):
    monkeypatch.setenv("MTGPT_PEAK_FLOPS", "1e12")
    config = ModelConfig(**TINY)
    model = GPT(config)
    perf = monitor.Throughput(flops_per_token(config), torch.device("cpu"), world_size=2)
    c = model.config
    assert perf.flops_per_token == 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size
    perf.add(1000)
    m = perf.metrics()
    assert m["perf/tokens_per_s"] > 0
    assert m["perf/mfu"] == pytest.approx(m["perf/tokens_per_s"] * perf.flops_per_token / 2e12)
    monkeypatch.delenv("MTGPT_PEAK_FLOPS")
    assert monitor.peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize("name, precision, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989e12),  # SXM
    ("NVIDIA H100 PCIe", "bf16", False, 756e12),
    ("NVIDIA H100 NVL", "fp16", False, 835e12),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 495e12),  # TF32 tensor cores
    ("NVIDIA H100 80GB HBM3", "fp32", False, 67e12),  # plain fp32: not the bf16 peak
    ("NVIDIA H200", "bf16", False, 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312e12),
    ("NVIDIA A100 80GB PCIe", "fp32", True, 156e12),
    ("NVIDIA L40S", "bf16", False, 362e12),
    ("NVIDIA L40", "bf16", False, 181e12),  # not the L4's, not the L40S's
    ("NVIDIA L4", "bf16", False, 121e12),
    ("NVIDIA A10", "bf16", False, 125e12),
    ("Tesla V100-SXM2-16GB", "fp16", False, 125e12),
    ("NVIDIA GeForce RTX 4090", "bf16", False, 165e12),
    ("NVIDIA A10G", "bf16", False, None),  # not in the table: no MFU rather than a wrong one
    ("NVIDIA B200", "bf16", False, None),
])
def test_peak_flops_per_exact_product_and_precision(name, precision, tf32, peak):
    assert monitor.peak_for_name(name, precision, tf32) == peak


@pytest.mark.parametrize("value", ["abc", "0", "-1e12", "nan", "inf"])
def test_a_bad_peak_flops_is_refused_before_the_start(value, monkeypatch, tiny_data, tmp_path):
    from mtgpt.config import ConfigError, TrainConfig
    from mtgpt.train import make_plan

    monkeypatch.setenv("MTGPT_PEAK_FLOPS", value)
    with pytest.raises(ConfigError, match=f"MTGPT_PEAK_FLOPS={value!r} is not a positive number"):
        make_plan(TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), model=dict(TINY)), 1, cuda=False)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("MTGPT_PEAK_FLOPS", " 2e12 ")
    assert monitor.peak_flops(torch.device("cpu")) == 2e12


def test_host_reads_are_counted_where_they_are_made():
    """HostReads counts every way of reading a tensor's value into Python, by the caller's line,
    and nothing for work that stays on the device."""
    t = torch.tensor([1.5, -2.0])
    with monitor.HostReads() as seen:
        (t * 2).add_(1).norm()  # stays a tensor: no read
    assert seen.total == 0
    with monitor.HostReads() as seen:
        if (t > 0).any():
            pass
        float(t[0]), t[1].item(), int(t[0]), t.tolist(), t.nonzero()
    assert seen.total == 6 and all("test_monitor.py:" in k for k in seen.reads)
    assert {k.split()[0] for k in seen.reads} == {"__bool__", "__float__", "item", "__int__", "tolist", "nonzero"}


def test_a_loss_plot_with_no_finite_loss_yet_warns_nothing(tmp_path):
    """A run whose first evaluation diverged printed matplotlib's "No artists with labels found
    to put in legend" among its own messages."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.plot_losses([{"step": 1, "val/loss": None}], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_loss_png_of_a_run_without_a_val_split(tmp_path):
    """A run of data prepared with --val-fraction 0 evaluates no val loss: loss.png is drawn at its
    evaluations with the train loss alone (it was never written)."""
    log = monitor.Monitor(tmp_path, enabled=True)
    for step in range(1, 5):
        log.log({"train/loss": 10.0 - step}, step)
    assert not (tmp_path / "loss.png").exists()
    log.log({"train/loss": 5.0, "perf/eval_seconds": 0.3}, 5, evaluated=True)
    log.close()
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_loss_png_with_a_home_matplotlib_cannot_write_says_nothing(tmp_path):
    """HOME read-only (or not a folder): every training printed matplotlib's "mkdir -p failed" and
    "created a temporary cache directory" between its progress lines, at the first evaluation."""
    import os
    import subprocess
    import sys

    blocked = tmp_path / "file"
    blocked.write_text("")  # HOME under a file: matplotlib cannot make its folders there
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    script = ("import sys; from pathlib import Path; from mtgpt import monitor; "
              "monitor.plot_losses([{'step': 1, 'train/loss': 3.0}], Path(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "loss.png")], capture_output=True, text=True,
                          env={**env, "HOME": str(blocked / "home")}, check=True)
    assert proc.stderr == "" and (tmp_path / "loss.png").stat().st_size > 1000
