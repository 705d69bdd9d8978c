"""What happens when things go wrong while training: SIGTERM/SIGINT (save, exit 0), a rank that
dies (the others exit, bounded time), a loss that becomes NaN (stop, keep the last checkpoint)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mtgpt import checkpoint
from tests.conftest import TINY_ARGS, run_mtgpt
from tests.test_resume import start, wait_for

pytestmark = pytest.mark.slow  # DeepSpeed ranks, Slurm or a container: `make test-all`

ARGS = [*TINY_ARGS, "--micro-batch", "2", "--eval-samples", "8", "--log-every", "2", "--eval-every", "1000",
        "--save-every", "1000", "--max-steps", "100000"]


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGINT, False)])
def test_signal_saves_and_exits_zero(tiny_data, tmp_path, sig, group):
    run = tmp_path / "run"
    proc = start("train", "--data", tiny_data, "--out", run, "--nproc", "2", *ARGS)
    wait_for(lambda: len(rows(run)) >= 2, proc)
    if group:  # Ctrl-C: the terminal signals the whole foreground process group
        os.killpg(proc.pid, sig)
    else:  # Slurm, systemd, kill (-INT too): the process the user started
        proc.send_signal(sig)
    proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    stop = json.loads((run / "last_stop.json").read_text())
    assert stop["reason"] == "signal"
    tag = checkpoint.latest_complete(run)
    assert tag is not None and tag.name == checkpoint.tag_for(stop["step"])
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(run) in " ".join(p.info["cmdline"] or [])]
    out = run_mtgpt("train", "--data", tiny_data, "--out", run, "--nproc", "2", *ARGS[:-2], "--max-steps",
                    stop["step"] + 4, "--resume", "auto")
    assert f"(step {stop['step']})" in out.stdout
    assert json.loads((run / "last_stop.json").read_text())["step"] == stop["step"] + 4


@pytest.mark.parametrize("group", [False, True])
def test_a_signal_while_the_ranks_start_stops_before_the_first_step(tiny_data, tmp_path, group):
    """Ctrl-C (or kill -INT) while the ranks are still importing: a rank without a handler yet
    died, and `mtgpt train` exited 241 or 1 without a word (or with the launcher's traceback).
    Now each rank keeps the signal from its first line and stops before the first step: one line,
    exit 0, nothing trained or saved."""
    run = tmp_path / "run"
    proc = start("train", "--data", tiny_data, "--out", run, "--nproc", "2", *ARGS)

    def importing() -> bool:  # both ranks running, torch being imported (a rank's first import)
        try:
            ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if p.cmdline()[1:5] == ["-u", "-m", "mtgpt", "worker"]]
            return len(ranks) == 2 and all(r.memory_info().rss > 100e6 for r in ranks)
        except psutil.Error:  # (a process that is starting or has just ended)
            return False

    wait_for(importing, proc, poll=0.02)
    assert not (run / "metrics.jsonl").exists()  # not training yet
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert re.search(r"stopped by SIG(INT|TERM) on a rank before the first step: nothing was trained or saved",
                     out), out[-2000:] + err[-2000:]
    assert "stopped (signal)" not in out and "model.safetensors" not in out, out[-2000:]  # (there is none)
    assert "(mtgpt train got SIGINT and passed it on to the ranks as SIGTERM)" in err, err[-2000:]  # (a rank's
    # line named SIGTERM after a Ctrl-C without a word why)
    assert "Traceback" not in err, err[-3000:]
    assert checkpoint.latest_complete(run) is None and not rows(run)


def test_a_signal_before_the_launcher_started_any_rank(tiny_data, tmp_path):
    """Ctrl-C a second after `mtgpt train` started (its DeepSpeed launcher importing, no rank yet)
    said "Error: stopped by SIGINT before the run saved; see any error above" with no error above,
    and exited 130. Now: one line that nothing was trained or saved, exit 0, as for the ranks."""
    run = tmp_path / "run"
    proc = start("train", "--data", tiny_data, "--out", run, "--nproc", "2", *ARGS)

    def launcher_alone() -> bool:
        try:
            children = psutil.Process(proc.pid).children()
            return len(children) == 1 and not children[0].children()
        except psutil.Error:
            return False

    wait_for(launcher_alone, proc, poll=0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "stopped by SIGINT before the ranks started: nothing was trained or saved" in err, err[-3000:]
    assert "Error" not in err and "Traceback" not in err, err[-3000:]
    assert checkpoint.latest_complete(run) is None and not rows(run)


def test_a_stop_that_takes_longer_than_30_seconds_still_saves(tiny_data, tmp_path):
    """After a signal a rank trains on to its next log step, then evaluates and saves: on a CPU
    with the default model (10 steps of seconds each) that takes more than 30 s. DeepSpeed's
    launcher, when signalled itself, SIGKILLs its ranks 30 s later: the save was lost and the run
    exited 1. Only the ranks are signalled now, and the launcher waits for them."""
    run = tmp_path / "run"
    proc = start("train", "--data", tiny_data, "--out", run, "--nproc", "2", "--n-layer", "4", "--n-head", "4",
                 "--n-embd", "256", "--block-size", "32", "--micro-batch", "32", "--log-every", "30",
                 "--eval-every", "100000", "--eval-samples", "8", "--max-steps", "100000")  # ~1.8 s a step here
    wait_for(lambda: (run / "run_info.json").is_file(), proc)  # training
    time.sleep(2)
    signalled = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C; the stop comes at step 30
    proc.wait(timeout=600)
    err = proc.stderr.read().decode()
    assert proc.returncode == 0, err[-3000:]
    assert time.time() - signalled > 30, "the stop came sooner than this test is about: raise --log-every"
    stop = json.loads((run / "last_stop.json").read_text())
    assert stop["reason"] == "signal" and stop["step"] == 30
    assert checkpoint.latest_complete(run).name == checkpoint.tag_for(30)


def test_no_rank_trains_on_after_mtgpt_train_is_killed(tiny_data, tmp_path):
    """SIGKILL to `mtgpt train` alone (it cannot forward that): the launcher, in its own process
    group, is told by the kernel (PR_SET_PDEATHSIG) and stops the ranks; none trains on orphaned."""
    run = tmp_path / "run"
    proc = start("train", "--data", tiny_data, "--out", run, "--nproc", "2", *ARGS)
    wait_for(lambda: len(rows(run)) >= 2, proc)
    under = psutil.Process(proc.pid).children(recursive=True)
    assert len(under) >= 3  # the launcher and two ranks
    proc.kill()
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(under, timeout=90)
    assert not alive, [p.cmdline() for p in alive]


def test_dead_rank_stops_the_others(tiny_data, tmp_path):
    """SIGKILL one rank: the launcher ends the other and `mtgpt train` exits non-zero quickly."""
    run = tmp_path / "run"
    proc = start("train", "--data", tiny_data, "--out", run, "--nproc", "2", *ARGS)
    wait_for(lambda: len(rows(run)) >= 2, proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if p.cmdline()[1:5] == ["-u", "-m", "mtgpt", "worker"]]
    assert len(ranks) == 2
    ranks[1].kill()
    killed = time.time()
    _, err = proc.communicate(timeout=120)
    # said, as the shell counts a SIGKILL (was exit 247, DeepSpeed's sys.exit(-9), and its line alone)
    assert proc.returncode == 137, err.decode()[-3000:]
    assert "Error: a rank was killed by SIGKILL (the kernel's out-of-memory killer, or kill -9); nothing was " \
           "saved yet" in err.decode()
    assert time.time() - killed < 60
    psutil.wait_procs(ranks, timeout=30)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


def test_dead_peer_without_a_launcher(tiny_data, tmp_path):
    """Ranks started one by one (as srun does, no launcher watching): when one dies the other
    fails its next collective instead of hanging, within the collective timeout."""
    from mtgpt.world import free_port

    run = tmp_path / "run"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "MTGPT_COLLECTIVE_TIMEOUT": "20", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mtgpt", "worker", "--data", str(tiny_data), "--out", str(run), *ARGS]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in range(2)]
    wait_for(lambda: len(rows(run)) >= 2, procs[0])
    procs[1].kill()
    killed = time.time()
    procs[0].wait(timeout=180)
    assert procs[0].returncode != 0
    assert time.time() - killed < 90
    err = procs[0].stderr.read().decode()  # one line, not gloo's traceback
    assert "Error (rank 0): lost contact with another rank (" in err and "Traceback" not in err, err[-3000:]


def test_a_mistake_only_one_rank_sees_ends_every_rank_and_is_said(tiny_data, tmp_path):
    """Ranks started one by one (srun, torchrun on each node) where one node cannot see the data
    folder: that rank exited 2 saying nothing (only rank 0 prints errors) and rank 0 waited for it
    until the collective timeout (30 min). Now rank 0 says which rank saw what, and all exit 2."""
    from mtgpt.world import free_port

    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    shutil.copytree(tiny_data, tmp_path / "node0" / "data")  # node 1 has no data/
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "MTGPT_COLLECTIVE_TIMEOUT": "600", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "mtgpt", "worker", "--data", "data", "--out", str(tmp_path / "run"), *ARGS]
    procs = [subprocess.Popen(cmd, cwd=tmp_path / f"node{r}", env={**env, "RANK": str(r), "LOCAL_RANK": "0"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    began = time.time()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2] and time.time() - began < 120
    said = outs[0][1]
    assert said.count("Error") == 1 and f"Error (rank 1): {tmp_path / 'node1' / 'data'}: no such folder" in said, said
    assert "Error" not in outs[1][1] and not (tmp_path / "run").exists()


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = run_mtgpt("train", "--data", tiny_data, "--out", run, "--nproc", "2", *TINY_ARGS, "--micro-batch", "2",
                     "--lr", "1e9", "--warmup-steps", "1", "--log-every", "1", "--save-every", "1",
                     "--eval-samples", "4", "--max-steps", "200", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # (once 134: a rank aborted as it exited; see test_train)
    assert "the training loss is nan" in proc.stderr or "the training loss is inf" in proc.stderr
    assert proc.stderr.count("Error:") == 1  # once, not once per rank
    last = checkpoint.latest_complete(run)
    assert last is not None
    steps = [r["step"] for r in rows(run) if "train/loss" in r]
    assert int(last.name.split("_")[1]) == max(steps)  # saved only while the loss was finite
    assert all(isinstance(r["train/loss"], float) for r in rows(run) if "train/loss" in r)
