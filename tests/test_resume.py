"""Checkpoints a user can trust: exact resume after SIGKILL for ZeRO 0-3, torn saves ignored,
the same losses on every ZeRO stage, resume on another number of ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from mtgpt import checkpoint
from tests.conftest import TINY_ARGS, run_mtgpt

pytestmark = pytest.mark.slow  # DeepSpeed ranks, Slurm or a container: `make test-all`

STEPS = 20
ARGS = [*TINY_ARGS, "--micro-batch", "2", "--lr", "3e-3", "--eval-samples", "8", "--log-every", "1",
        "--eval-every", "10", "--seed", "3"]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), "a step logged twice"
    return {r["step"]: r["train/loss"] for r in rows}


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mtgpt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180, poll: float = 0.01) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(poll)


def kill_group(proc: subprocess.Popen) -> None:
    """A crash of the whole job (the machine, the OOM killer): SIGKILL to every process of it at
    once, the ranks first. (SIGKILL to `mtgpt train` alone is no crash: its launcher, in a process
    group of its own, then stops the ranks cleanly; tests/test_signals.py.)"""
    tree = psutil.Process(proc.pid).children(recursive=True)
    for p in [*reversed(tree), psutil.Process(proc.pid)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def uninterrupted(data: Path, root: Path, nproc: int) -> dict[int, Path]:
    """20 uninterrupted steps on each ZeRO stage (fp32) on `nproc` CPU ranks, global batch 4."""
    runs = {}
    for stage in range(4):
        runs[stage] = root / f"zero{stage}"
        run_mtgpt("train", "--data", data, "--out", runs[stage], "--nproc", nproc, "--ds-config", f"zero{stage}_fp32",
                  *ARGS, "--micro-batch", 4 // nproc, "--max-steps", STEPS, "--save-every", 100)
    return runs


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory) -> dict[int, Path]:
    """2 ranks x micro-batch 2."""
    return uninterrupted(tiny_data, tmp_path_factory.mktemp("straight"), 2)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sigkill_then_resume_is_bit_identical(tiny_data, tmp_path, straight, stage):
    run = tmp_path / "run"
    cmd = ["train", "--data", tiny_data, "--out", run, "--nproc", "2", "--ds-config", f"zero{stage}_fp32", *ARGS,
           "--max-steps", STEPS, "--save-every", 5]
    proc = start(*cmd)
    wait_for(lambda: (run / "checkpoints" / "step_00000005" / checkpoint.COMPLETE).is_file(), proc)
    kill_group(proc)  # a crash: no chance to save
    killed_at = max(losses(run))
    assert killed_at < STEPS
    run_mtgpt(*cmd, "--resume", "auto")
    want, got = losses(straight[stage]), losses(run)
    assert list(got) == list(range(1, STEPS + 1))
    assert got == want  # every step's loss, bit for bit
    a, b = load_file(straight[stage] / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_zero_stages_agree(straight):
    base = losses(straight[0])
    for stage in (1, 2, 3):
        other = losses(straight[stage])
        assert max(abs(base[s] - other[s]) for s in base) < 1e-5, stage


def test_torn_save_is_never_resumed(tiny_data, tmp_path):
    """SIGKILL while a checkpoint is being written (a wider model makes the save take a while):
    the torn folder has no COMPLETE marker, `latest` still names the previous one, resume takes
    that, and the run finishes."""
    run = tmp_path / "run"
    cmd = ["train", "--data", tiny_data, "--out", run, "--nproc", "2", "--n-layer", "2", "--n-head", "2",
           "--n-embd", "256", "--block-size", "32", "--micro-batch", "2", "--log-every", "1", "--eval-every", "100",
           "--eval-samples", "4", "--max-steps", "12", "--save-every", "4"]
    proc = start(*cmd)
    tag = run / "checkpoints" / "step_00000008"
    wait_for(lambda: tag.is_dir(), proc, poll=0.002)  # the save of step 8 has begun
    kill_group(proc)
    assert not (tag / checkpoint.COMPLETE).exists(), "the save finished before the kill; cannot test a torn save"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    assert checkpoint.latest_complete(run).name == "step_00000004"
    assert "incomplete, ignored: step_00000008" in run_mtgpt("info", run).stdout
    out = run_mtgpt(*cmd, "--resume", "auto")
    assert "resuming from" in out.stdout and "step_00000004" in out.stdout
    assert checkpoint.complete_tags(run)[-1] == "step_00000012"
    assert list(losses(run)) == list(range(1, 13))


@pytest.fixture(scope="module")
def one_rank(tiny_data, tmp_path_factory) -> dict[int, Path]:
    """The same 20 steps on one rank: micro-batch 4 = the same global batch as 2 ranks x 2."""
    return uninterrupted(tiny_data, tmp_path_factory.mktemp("one_rank"), 1)


def close(a: dict[int, float], b: dict[int, float]) -> float:
    assert list(a) == list(b) == list(range(1, STEPS + 1))
    return max(abs(a[s] - b[s]) for s in a)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_one_and_two_ranks_train_alike(straight, one_rank, stage):
    """One data order for any number of ranks: global batch k holds the same samples on 1 rank as
    on 2, so every step's loss is the same (fp32; up to the order of float additions)."""
    assert close(losses(straight[stage]), losses(one_rank[stage])) < 1e-5


@pytest.mark.parametrize("stage, before, after", [(0, 2, 1), (1, 2, 1), (2, 2, 1), (3, 2, 1), (3, 1, 2)])
def test_killed_and_resumed_on_another_number_of_ranks(tiny_data, tmp_path, straight, one_rank, stage, before,
                                                       after):
    """SIGKILL a run, resume it on another number of ranks with the same global batch: the weights
    and optimizer state carry over (through DeepSpeed's universal checkpoint for ZeRO 1-3) and the
    data order goes on where it was, so every step's loss is the uninterrupted run's."""
    run = tmp_path / "run"
    cmd = lambda n: ["train", "--data", tiny_data, "--out", run, "--nproc", n,  # noqa: E731
                     "--ds-config", f"zero{stage}_fp32", *ARGS, "--micro-batch", 4 // n, "--max-steps", STEPS,
                     "--save-every", 5, "--keep-last", 5]
    proc = start(*cmd(before))
    wait_for(lambda: (run / "checkpoints" / "step_00000005" / checkpoint.COMPLETE).is_file(), proc)
    kill_group(proc)
    with safe_open(str(run / checkpoint.WEIGHTS), "pt") as f:  # exported by the save of step 5
        assert f.metadata()["step"] == "5", "killed after the next save began; cannot compare"
    saved = load_file(run / checkpoint.WEIGHTS)
    out = run_mtgpt(*cmd(after), "--resume", "auto")
    assert "resuming from" in out.stdout and "the data order goes on where it was" in out.stdout
    uninterrupted = (straight if before == 2 else one_rank)[stage]
    assert close(losses(run), losses(uninterrupted)) < 1e-5
    if stage > 0:
        assert "universal checkpoint" in out.stdout
        assert (run / "checkpoints" / "universal" / "step_00000005" / checkpoint.COMPLETE).is_file()
        # The universal form holds exactly the weights that were saved.
        probe = subprocess.run([sys.executable, "-c", _PROBE, str(run), str(stage)], capture_output=True, text=True,
                               timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert probe.returncode == 0, probe.stderr[-3000:]
        loaded = load_file(Path(probe.stdout.strip().splitlines()[-1]))
        assert all((loaded[k] == saved[k]).all() for k in saved)


# Load checkpoints/universal/step_00000005 into a fresh 1-rank engine and write its weights out.
_PROBE = """
import sys
from pathlib import Path
from mtgpt import checkpoint, world
from mtgpt.config import TrainConfig, load_json
from mtgpt.model import GPT
from mtgpt.train import make_plan
run, stage = Path(sys.argv[1]), int(sys.argv[2])
probe = run.parent / "probe"  # beside the run: --out is never inside a run
cfg = TrainConfig.from_dict(load_json(run / "train_config.json")).replace(micro_batch=4, resume="never",
                                                                         out=str(probe))
plan = make_plan(cfg, world_size=1)
plan.ds["checkpoint"] = {"load_universal": True}
world.init()
model = GPT(cfg.model)
engine, *_ = world.import_deepspeed().initialize(model=model, model_parameters=model.param_groups(), config=plan.ds)
engine.load_checkpoint(str(run / "checkpoints" / "universal"), tag="step_00000005")
weights = checkpoint.gather_weights(engine.module, stage, 0)
checkpoint.save_weights(weights, cfg.model, probe)
print(probe / "model.safetensors")
"""


def test_resume_from_an_older_checkpoint_makes_it_the_history(tiny_data, tmp_path):
    """Going back to step 15 of a 20-step run and training on from there: the saves of step 20
    (the left branch) are set aside, not pruned into the new history or picked by --resume auto,
    which follows `latest`; the run's model is always that of its last save."""
    run = tmp_path / "run"
    base = ["train", "--data", tiny_data, "--out", run, "--nproc", "1", *ARGS, "--keep-last", "2"]
    run_mtgpt(*base, "--max-steps", 20, "--save-every", 5)
    out = run_mtgpt(*base, "--max-steps", 17, "--save-every", 1,
                    "--resume", run / "checkpoints" / "step_00000015")
    assert "set aside" in out.stdout and "step_00000020" in out.stdout
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and (aside[0] / "step_00000020" / checkpoint.COMPLETE).is_file()
    assert checkpoint.complete_tags(run) == ["step_00000016", "step_00000017"]
    assert checkpoint.weights_step(run) == 17
    run_mtgpt(*base, "--max-steps", 20, "--save-every", 5, "--resume", "auto")
    stop = json.loads((run / "last_stop.json").read_text())
    assert stop["step"] == 20 and checkpoint.weights_step(run) == 20
    assert checkpoint.complete_tags(run) == ["step_00000017", "step_00000020"]
    assert list(losses(run)) == list(range(1, 21))


def test_logged_losses_survive_a_kill_between_log_steps(tiny_data, tmp_path):
    """Saves every 5 steps, logs every 3: the checkpoint of step 5 falls between log steps 3 and 6.
    After SIGKILL and resume, the train loss logged at step 6 (and every later one) is the mean of
    the same steps as in a run that was never stopped, bit for bit."""
    args = ["--nproc", "2", "--ds-config", "zero1_fp32", *ARGS, "--log-every", "3", "--max-steps", STEPS]
    straight = tmp_path / "straight"
    run_mtgpt("train", "--data", tiny_data, "--out", straight, *args, "--save-every", 100)
    run = tmp_path / "run"
    cmd = ["train", "--data", tiny_data, "--out", run, *args, "--save-every", 5]
    proc = start(*cmd)
    wait_for(lambda: (run / "checkpoints" / "step_00000005" / checkpoint.COMPLETE).is_file(), proc)
    kill_group(proc)
    run_mtgpt(*cmd, "--resume", "auto")

    def logged(r: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}

    want, got = logged(straight), logged(run)
    assert list(got) == [3, 6, 9, 12, 15, 18, 20]
    assert got == want
