"""Logging behind one call, `log(metrics, step)`: TensorBoard events in RUN_DIR/tb and one JSON line
per logged step in RUN_DIR/metrics.jsonl. Real on rank 0, a no-op elsewhere.

Tags are grouped: train/* (loss, grad_norm, tokens, ...), val/* (loss, ppl), perf/* (tokens/s,
MFU, GPU memory), fp16/* (loss scale), lr, and a text sample at each evaluation. loss.png (train
and val loss) is redrawn at each evaluation. On resume the entries after the resumed step are dropped from both (TensorBoard's
purge_step), so curves never show a step twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mtgpt.config import ConfigError

METRICS = "metrics.jsonl"
STARTED_AT, LAUNCHED_AT = "MTGPT_STARTED_AT", "MTGPT_LAUNCHED_AT"  # set by `mtgpt train` for its ranks


class StartupClock:
    """Where the time before (and around) training goes, in seconds per phase: under `mtgpt
    train`, checks (its imports and make_plan) and launcher (until this rank's process started);
    then imports (this process, to fit), and each phase `mark`ed after that."""

    def __init__(self):
        import psutil

        began = psutil.Process().create_time()
        self.phases: dict[str, float] = {}
        if STARTED_AT in os.environ and LAUNCHED_AT in os.environ:
            launched = float(os.environ[LAUNCHED_AT])
            self.phases["checks"] = launched - float(os.environ[STARTED_AT])
            self.phases["launcher"] = began - launched
        self.last = time.time()
        self.phases["imports"] = self.last - began

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = now - self.last
        self.last = now

    def line(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())


class RunFolderGone(OSError):
    """The run folder was moved or deleted while the run trained (found at a log step)."""


class Monitor:
    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.history: list[dict[str, Any]] = []
        if not enabled:
            return
        self.folder = _identity(self.run_dir)
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

    def log(self, metrics: dict[str, float], step: int, evaluated: bool = False) -> None:
        """One logged step: every scalar to TensorBoard, and one line to metrics.jsonl; loss.png is
        redrawn after an evaluation (`evaluated`, or a val loss logged), also of a run with no val
        split (the train loss alone)."""
        if not self.enabled or not metrics:
            return
        self._check_folder()
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()}
        for k, v in clean.items():
            if isinstance(v, float):
                self.tb.add_scalar(k, v, step)
        row = {"step": step, **clean}
        self.history.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.tb.flush()
        if evaluated or "val/loss" in metrics:
            plot_losses(self.history, self.run_dir / "loss.png")

    def text(self, tag: str, text: str, step: int) -> None:
        """A text sample: TensorBoard renders text as Markdown (joining lines, reading * and #), so
        it goes as a code block (each line indented 4 spaces): shown as written."""
        if self.enabled:
            self._check_folder()
            self.tb.add_text(tag, "\n".join("    " + line for line in text.split("\n")), step)
            self.tb.flush()

    def _check_folder(self) -> None:
        """The run folder moved or deleted while training: TensorBoard's writer thread failed with a
        traceback, and the next save made a new folder at the old path. Stopped with one line."""
        if _identity(self.run_dir) == self.folder:
            return
        self.enabled = False  # (nothing more is written, not at the old path: no flush, no close)
        raise RunFolderGone(f"the run folder {self.run_dir} was moved or deleted while the run trained: stopped, and "
                            "nothing more written at that path; continue it from its last checkpoint where it is now: "
                            "mtgpt train --out NEW_PATH --resume auto")

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.file.close()
            self.enabled = False


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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
    """loss.png: train and val loss against step (written to a temp name, then renamed). A home
    folder matplotlib cannot write its config and font cache into (read-only, missing) is no
    news for the console: it works in a temporary folder, without its two warnings."""
    quiet = logging.getLogger("matplotlib")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    finally:
        quiet.setLevel(level)

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        rows = [(r["step"], r[key]) for r in history if isinstance(r.get(key), float)]
        if rows:
            ax.plot(*zip(*rows), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.lines:  # (no loss yet: no legend, and no matplotlib warning on the console)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# Dense (no sparsity) peak FLOP/s per GPU, from NVIDIA's datasheets, per precision: "bf16" (bf16 or
# fp16 tensor cores, fp32 accumulate), "tf32" (fp32 matmuls on tensor cores) and "fp32" (CUDA
# cores). Matched against torch.cuda.get_device_name() by whole-word patterns, most specific first,
# so "L4" never matches "L40" and the H100's SXM, PCIe and NVL versions are told apart. An unknown
# GPU gets no MFU; MTGPT_PEAK_FLOPS overrides the table (e.g. on CPU).
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    (r"\bH100\b.*\bNVL\b", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"\bH100\b", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM ("H100 80GB HBM3")
    (r"\bH200\b.*\bNVL\b", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"\bH200\b", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    (r"\bA100\b", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\bL40S\b", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bL40\b", {"bf16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"\bL4\b", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\bA10\b", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"\bV100\b", {"bf16": 125e12, "tf32": 15.7e12, "fp32": 15.7e12}),  # fp16 only; no TF32
    (r"\bRTX 4090\b", {"bf16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"\bRTX 3090\b", {"bf16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
]


def env_peak_flops() -> float | None:
    """MTGPT_PEAK_FLOPS (FLOP/s per device, e.g. 1e12), or None when unset; a value that is not a
    positive number is refused (mtgpt.train.make_plan asks before anything starts)."""
    text = os.environ.get("MTGPT_PEAK_FLOPS", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"MTGPT_PEAK_FLOPS={text!r} is not a positive number of FLOP/s per device (e.g. 1e12 or "
                          "989e12); fix it or unset it")
    return value


def peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """The device's peak FLOP/s for a run in `precision` ("bf16", "fp16" or "fp32"; fp32 counts
    tensor-core TF32 when PyTorch allows it for matmuls), or None when unknown."""
    if (given := env_peak_flops()) is not None:
        return given
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device), precision,
                         tf32=torch.backends.cuda.matmul.allow_tf32)


def peak_for_name(name: str, precision: str, tf32: bool) -> float | None:
    key = "bf16" if precision in ("bf16", "fp16") else "tf32" if tf32 else "fp32"
    return next((peaks[key] for pattern, peaks in PEAK_FLOPS if re.search(pattern, name)), None)


class Throughput:
    """perf/ scalars over the steps since the last call: tokens/s, MFU, GPU memory.

    MFU = achieved FLOP/s / (peak FLOP/s in the run's precision x ranks)."""

    def __init__(self, flops_per_token: int, device: torch.device, world_size: int, precision: str = "bf16"):
        self.flops_per_token = flops_per_token  # model.flops_per_token(config)
        self.device, self.world_size = device, world_size
        self.peak = peak_flops(device, precision)
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


class HostReads(torch.overrides.TorchFunctionMode):
    """While active, counts the calls that read a tensor's value into Python (`bool(t)`, `if t:`,
    `t.item()`, `float(t)`, `t.tolist()`, `t.nonzero()`, ...), by the file:line outside torch that
    made them: `reads` (a Counter), `total`. On a GPU each such read is a host sync (the CPU waits
    for the GPU to catch up, and the GPU then idles while the CPU queues the next work); on a CPU
    they cost nothing, but the count is the same code's, so a CPU test can show that a training
    step has none. An upper bound: a read of a tensor that lives on the CPU is counted too. Use it
    around uncompiled code (torch.compile would trace the mode)."""

    READS = frozenset({"__bool__", "item", "__float__", "__int__", "__index__", "tolist", "nonzero", "numpy", "cpu"})

    def __init__(self):
        super().__init__()
        from collections import Counter

        self.reads: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.reads.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.READS:
            import traceback

            torch_dir = os.path.dirname(torch.__file__)
            caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if not f.filename.startswith(torch_dir)),
                          None)
            where = f"{'/'.join(Path(caller.filename).parts[-3:])}:{caller.lineno}" if caller else "torch"
            self.reads[f"{func.__name__} {where}"] += 1
        return func(*args, **(kwargs or {}))


def grad_scaler(engine):
    """PyTorch's GradScaler that DeepSpeed creates for torch_autocast fp16 at ZeRO-0 (zero0_fp16), or None."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None)


def count_scaler_skips(engine) -> None:
    """zero0_fp16: make PyTorch's GradScaler count the optimizer steps it skips (on an overflow its
    update backs the scale off) in a device tensor, `scaler.skipped`, with no host sync per step.
    DeepSpeed counts its own fp16 optimizers' skips (engine.skipped_steps), not this one's."""
    scaler = grad_scaler(engine)
    if scaler is None or hasattr(scaler, "skipped"):
        return
    scaler.skipped = torch.zeros((), dtype=torch.int64, device=engine.device)
    update = scaler.update

    def counted(new_scale=None) -> None:
        before = scaler._scale.clone() if scaler._scale is not None and new_scale is None else None
        update(new_scale)
        if before is not None:
            scaler.skipped.add_((scaler._scale < before).long())

    scaler.update = counted


def loss_scale_metrics(engine) -> dict[str, float]:
    """fp16 only: the dynamic loss scale (DeepSpeed's, or PyTorch's GradScaler under
    torch_autocast) and the optimizer steps skipped on overflow so far (expected while the scale
    settles; they are not NaN losses)."""
    if (scaler := grad_scaler(engine)) is not None:
        out = {"fp16/loss_scale": float(scaler.get_scale())}
        if hasattr(scaler, "skipped"):
            out["train/skipped_steps"] = float(scaler.skipped)
        return out
    if not engine.fp16_enabled():
        return {}
    optimizer = getattr(engine, "optimizer", None)
    scale = getattr(optimizer, "cur_scale", None) or getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", None)
    out = {"train/skipped_steps": float(engine.skipped_steps)}
    if scale is not None:
        out["fp16/loss_scale"] = float(scale)
    return out
