"""Logging behind one call, `log(metrics, step)`: TensorBoard events in RUN_DIR/tb and one JSON line
per logged step in RUN_DIR/metrics.jsonl. Real on rank 0, a no-op elsewhere.

Tags are grouped: train/* (loss, grad_norm, ...), val/* (loss, ppl), perf/* (tokens/s, MFU, memory),
and lr. On resume the entries after the resumed step are dropped from both (TensorBoard's
purge_step), so curves never show a step twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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
            self.history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.file.close()
            self.enabled = False
