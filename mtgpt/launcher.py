"""`mtgpt train`: start N local ranks with DeepSpeed's launcher, after the checks pass.

The launcher runs `python -m mtgpt worker --config FILE` in each process; FILE is the resolved
train config written to a temporary file (nothing is written into the run folder before the
ranks agree to start). SIGINT (Ctrl-C), SIGTERM and SIGHUP reach the ranks as SIGTERM; they
train on to their next log step, save a checkpoint and exit 0, however long that takes. The
DeepSpeed launcher is kept out of it, in its own process group (a Ctrl-C at the terminal reaches
only this process): signalled itself it would SIGKILL the ranks 30 s later, in the middle of a
slow CPU step or save. It gets SIGTERM only when this process dies (PR_SET_PDEATHSIG, Linux),
or when a signal comes before it has started any rank.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from mtgpt import checkpoint, monitor, rundir, world
from mtgpt.config import TrainConfig

def default_nproc(resumed: int | None = None) -> int:
    """--nproc when none is given: a resumed run's own number of ranks (`resumed`) where this
    machine has them, else all GPUs, or 2 CPU ranks without a GPU."""
    gpus = world.gpu_count()
    if resumed and (not gpus or resumed <= gpus):
        return resumed
    return gpus or 2


def command(config_file: str, nproc: int, master_port: int, ds_config: str | None = None) -> list[str]:
    """DeepSpeed's node launcher (deepspeed.launcher.launch), called directly: it starts the
    ranks with their environment and stops them all when one fails. Its front end, the
    `deepspeed` runner, would only add a process that imports DeepSpeed once more before the
    ranks start (and would read a /job/hostfile if one exists). `ds_config`: the --ds-config
    given on the command line, passed on as given (a resumed run reads it as it is now). Its log
    level is critical: a rank that exits non-zero has said why, and the launcher's "[ERROR] ...
    exits with return code" line (naming the removed temporary config) only added noise."""
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
            "--master_addr=127.0.0.1", f"--master_port={master_port}", "--no_local_rank", "--log_level=critical",
            "--module", "mtgpt", "worker", "--config", config_file, *(["--ds-config", ds_config] if ds_config else [])]


def launch_local(cfg: TrainConfig, nproc: int, ds_config_given: bool = False) -> int:
    """Run training on this machine with nproc ranks; returns the exit code."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mtgpt-train-", delete=False) as f:
        json.dump(cfg.to_dict(), f)
        config_file = f.name
    env = dict(os.environ)
    env[rundir.COMMAND_ENV] = shlex.join(["mtgpt", *sys.argv[1:]])
    env[monitor.STARTED_AT] = str(psutil.Process().create_time())
    if not world.gpu_count():
        env.setdefault("DS_ACCELERATOR", "cpu")
    got_signal: list[int] = []
    tree: list[psutil.Process] = []  # the processes under the launcher when a signal came
    before_ranks: list[bool] = []  # whether the first signal came before the launcher had started any rank
    launched: list[subprocess.Popen] = []

    def forward(signum, frame):
        # The ranks (the processes under the launcher) get SIGTERM, whichever signal came (a
        # rank's stop flag is set once, however often); the launcher only if it has none yet.
        got_signal.append(signum)
        tree[:] = _descendants(launched[0].pid) if launched else []
        if len(got_signal) == 1:
            before_ranks.append(len(tree) <= 1)
        for child in tree[1:] or tree:
            try:
                child.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}  # before it starts
    started = time.time()
    env[monitor.LAUNCHED_AT] = str(started)
    launched.append(subprocess.Popen(command(config_file, nproc, world.free_port(), cfg.ds_config if ds_config_given
                                             else None), env=env, process_group=0, preexec_fn=_die_with_parent))
    proc = launched[0]
    if got_signal:  # (it came while the launcher was being started)
        proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait()
        psutil.wait_procs(tree, timeout=600)  # after a signal, ranks may still be saving
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        Path(config_file).unlink(missing_ok=True)
    if got_signal and got_signal[0] != signal.SIGTERM and not before_ranks[0]:  # (what the ranks' lines name)
        print(f"(mtgpt train got {signal.Signals(got_signal[0]).name} and passed it on to the ranks as SIGTERM)",
              file=sys.stderr)
    if rc != 0 and got_signal and clean_stop_since(cfg.out, started):
        return 0
    if rc != 0 and got_signal and before_ranks[0]:  # the launcher itself, still starting, was stopped
        print(f"stopped by {signal.Signals(got_signal[0]).name} before the ranks started: nothing was trained or "
              "saved", file=sys.stderr)
        return 0
    if rc != 0 and got_signal:  # (a rank that had not yet installed its handler, or one that failed)
        print(f"Error: stopped by {signal.Signals(got_signal[0]).name} before the run saved; see any error above",
              file=sys.stderr)
        return 128 + got_signal[0]
    if rc > 128 and (died := _signal_name(256 - rc)):  # DeepSpeed's launcher exits with a rank's -N as 256 - N
        saved = checkpoint.latest_complete(Path(cfg.out))
        print(f"Error: a rank was killed by {died}"
              + (" (the kernel's out-of-memory killer, or kill -9)" if died == "SIGKILL" else "") + "; "
              + (f"`mtgpt train --out {shlex.quote(cfg.out)} --resume auto` goes on from its last save, {saved.name}"
                 if saved else "nothing was saved yet"), file=sys.stderr)
        return 128 + 256 - rc
    return 128 - rc if rc < 0 else rc  # the launcher killed by a signal: the shell's convention, not rc % 256


def _signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def _die_with_parent() -> None:
    """In the launcher, before it starts: SIGTERM when `mtgpt train` dies (even by SIGKILL), so that
    it stops its ranks rather than leaving them training (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def clean_stop_since(out: str, since: float) -> bool:
    path = Path(out) / rundir.LAST_STOP
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("time", 0) >= since
