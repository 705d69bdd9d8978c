"""`mtgpt train`: start N local ranks with the DeepSpeed launcher, after the checks pass.

The launcher runs `python -m mtgpt worker --config FILE` in each process; FILE is the resolved
train config written to a temporary file (nothing is written into the run folder before the
ranks agree to start). SIGINT/SIGTERM reach the ranks, which save a checkpoint and exit 0; the
DeepSpeed launcher itself exits 1 after forwarding a signal, so the exit code reported is 0 when
rank 0 recorded a clean stop.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mtgpt import distributed as dist, rundir
from mtgpt.config import TrainConfig

def default_nproc() -> int:
    """All GPUs, or 2 CPU ranks without a GPU."""
    return dist.gpu_count() or 2


def command(config_file: str, nproc: int, master_port: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(master_port), "--log_level", "error", "--no_local_rank", "--module", "mtgpt", "worker",
            "--config", config_file]


def launch_local(cfg: TrainConfig, nproc: int) -> int:
    """Run training on this machine with nproc ranks; returns the exit code."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mtgpt-train-", delete=False) as f:
        json.dump(cfg.to_dict(), f)
        config_file = f.name
    env = dict(os.environ)
    env[rundir.COMMAND_ENV] = shlex.join(["mtgpt", *sys.argv[1:]])
    if not dist.gpu_count():
        env.setdefault("DS_ACCELERATOR", "cpu")
    started = time.time()
    proc = subprocess.Popen(command(config_file, nproc, dist.free_port()), env=env)
    got_signal: list[int] = []

    def forward(signum, frame):  # Ctrl-C reaches the whole process group anyway; SIGTERM may not
        got_signal.append(signum)
        if signum == signal.SIGTERM:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        Path(config_file).unlink(missing_ok=True)
    if rc != 0 and got_signal and clean_stop_since(cfg.out, started):
        return 0
    return rc


def clean_stop_since(out: str, since: float) -> bool:
    path = Path(out) / rundir.LAST_STOP
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("time", 0) >= since
