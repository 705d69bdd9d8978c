"""Logging behind one call, `log(metrics, step)`: TensorBoard events in RUN_DIR/tb and one JSON line
per logged step in RUN_DIR/metrics.jsonl. Real on rank 0, a no-op elsewhere.

Tags are grouped: train/* (loss, grad_norm, tokens, ...), val/* (loss, ppl), perf/* (tokens/s,
MFU, GPU memory), fp16/* (loss scale), lr, and a text sample at each evaluation. loss.png (train
and val loss) is redrawn at each evaluation. On resume the entries after the resumed step are dropped from both (TensorBoard's
purge_step), so curves never show a step twice.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

METRICS = "metrics.jsonl"


class Monitor:
    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.history: list[dict[str, Any]] = []
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = self.run_dir / METRICS
        if path.exists():
            self.history = read_metrics(path, warn=lambda msg: print(msg, flush=True))
            if resume_step is not None:
                self.history = [m for m in self.history if m["step"] <= resume_step]
            else:
                self.history = []
            path.write_text("".join(json.dumps(m) + "\n" for m in self.history))
        purge = resume_step + 1 if resume_step is not None else None
        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)
        self.file = path.open("a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One logged step: every scalar to TensorBoard, and one line to metrics.jsonl."""
        if not self.enabled or not metrics:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()}
        for k, v in clean.items():
            if isinstance(v, float):
                self.tb.add_scalar(k, v, step)
        row = {"step": step, **clean}
        self.history.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.tb.flush()
        if "val/loss" in metrics:
            plot_losses(self.history, self.run_dir / "loss.png")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.file.close()
            self.enabled = False


class MetricsError(ValueError):
    """metrics.jsonl is damaged other than by a crash mid-write; the message says what to do."""


def read_metrics(path: Path, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A torn last line (the process died while writing it) is
    dropped with a warning; a bad line elsewhere is refused, naming the file and line."""
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no step")
            rows.append(row)
        except ValueError:
            if i == len(lines) - 1:
                warn(f"warning: {path}: line {n} is torn (the run stopped while writing it); it is dropped")
                continue
            raise MetricsError(f"{path}:{n}: not a metrics line ({line[:60]!r}); repair the line, or move the "
                               "file aside to start the log afresh") from None
    return rows


def last(history: list[dict[str, Any]], key: str) -> float:
    """The newest logged value of `key` (nan if none: e.g. on ranks other than 0)."""
    for row in reversed(history):
        if key in row and isinstance(row[key], float):
            return row[key]
    return float("nan")


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """loss.png: train and val loss against step (written to a temp name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        rows = [(r["step"], r[key]) for r in history if isinstance(r.get(key), float)]
        if rows:
            ax.plot(*zip(*rows), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU; MTGPT_PEAK_FLOPS overrides (e.g. on CPU).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "L4": 121e12, "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    if os.environ.get("MTGPT_PEAK_FLOPS"):
        return float(os.environ["MTGPT_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Throughput:
    """perf/ scalars over the steps since the last call: tokens/s, MFU, GPU memory.

    MFU = achieved FLOP/s / (peak FLOP/s x ranks), with FLOPs per token = 6 N + 12 L C T (PaLM,
    Chowdhery et al. 2022, appendix B): N parameters without the position embedding (so the tied
    output layer counts), L layers, C width, T context; forward + backward, attention included."""

    def __init__(self, model, device: torch.device, world_size: int):
        c = model.config
        self.flops_per_token = 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size
        self.device, self.world_size = device, world_size
        self.peak = peak_flops(device)
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def metrics(self) -> dict[str, float]:
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        out = {"perf/tokens_per_s": rate}
        if self.peak:
            out["perf/mfu"] = rate * self.flops_per_token / (self.peak * self.world_size)
        if self.device.type == "cuda":
            out["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.reset()
        return out


def loss_scale_metrics(engine) -> dict[str, float]:
    """fp16 only: DeepSpeed's dynamic loss scale, and the steps it skipped on overflow (skipped
    steps are expected while the scale settles; they are not NaN losses)."""
    if not engine.fp16_enabled():
        return {}
    optimizer = getattr(engine, "optimizer", None)
    scale = getattr(optimizer, "cur_scale", None) or getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", None)
    out = {"train/skipped_steps": float(engine.skipped_steps)}
    if scale is not None:
        out["fp16/loss_scale"] = float(scale)
    return out
