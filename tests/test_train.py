"""Training through the real DeepSpeed engine with a tiny model: in this process as a world of
one (make_plan, fit, resume, going back), and on 2 gloo CPU ranks started by `mtgpt train`
(which runs the DeepSpeed launcher): one such run in the quick loop, the rest marked slow."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtgpt import checkpoint
from mtgpt.config import ModelConfig, TrainConfig
from mtgpt.model import GPT
from tests.conftest import TINY, TINY_ARGS, run_mtgpt

TRAIN = [*TINY_ARGS, "--micro-batch", "4", "--lr", "1e-2", "--eval-samples", "8", "--log-every", "5"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run_mtgpt("train", "--data", tiny_data, "--out", run, "--nproc", "2", *TRAIN,
              "--max-steps", "30", "--eval-every", "10", "--save-every", "10", env={"MTGPT_PEAK_FLOPS": "1e12"})
    return run


def test_loss_goes_down(trained):
    rows = metrics(trained)
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert [r["step"] for r in rows if "val/loss" in r] == [10, 20, 30]
    assert abs(train[0] - math.log(50257)) < 1.0
    # (val against the untrained loss: at step 10 the model has already learned, more since no step
    # trains at lr 0, and this tiny val set is noisy after step 20)
    assert train[-1] < train[0] - 2.0 and val[-1] < val[0] and val[-1] < math.log(50257) - 3.0
    assert all(set(r) >= {"step", "train/loss", "lr"} for r in rows if r["step"] % 5 == 0)


def test_run_folder(trained):
    for name in ["train_config.json", "ds_config.json", "run_info.json", "model.safetensors", "config.json",
                 "best/model.safetensors", "metrics.jsonl", "last_stop.json", "loss.png"]:
        assert (trained / name).is_file(), name
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ds = json.loads((trained / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["optimizer"]["params"]["lr"] == 1e-2
    assert checkpoint.complete_tags(trained) == ["step_00000020", "step_00000030"]  # keep_last 2
    assert (trained / "checkpoints" / "latest").read_text() == "step_00000030"
    info = json.loads((trained / "run_info.json").read_text())
    assert info["world_size"] == 2 and "deepspeed" in info["versions"]
    assert json.loads((trained / "last_stop.json").read_text())["reason"] == "max_steps"


def test_tensorboard_events(trained):
    acc = EventAccumulator(str(trained / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ["train/loss", "val/loss", "lr", "val/ppl", "val/bpb", "perf/tokens_per_s", "perf/mfu", "train/grad_norm",
                "train/tokens"]:
        assert tag in tags, tag
    # MFU = tokens/s x (6 N + 12 L C T) / (peak x ranks), with MTGPT_PEAK_FLOPS=1e12 and 2 ranks
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    flops = 6 * model.num_params(non_embedding=True) + 12 * 2 * 32 * 32
    for rate, mfu in zip(acc.Scalars("perf/tokens_per_s"), acc.Scalars("perf/mfu")):
        assert mfu.value == pytest.approx(rate.value * flops / 2e12, rel=1e-6)  # TensorBoard stores float32
    assert [e.value for e in acc.Scalars("train/tokens")][:2] == [5 * 256, 10 * 256]
    samples = acc.Tensors("sample/text_summary")
    assert [e.step for e in samples] == [10, 20, 30]
    assert all(e.tensor_proto.string_val[0] for e in samples)  # a non-empty text sample at each evaluation
    val = acc.Scalars("val/loss")
    assert [e.step for e in val] == [10, 20, 30]
    by_step = {r["step"]: r for r in metrics(trained)}
    assert all(abs(e.value - by_step[e.step]["val/loss"]) < 1e-5 for e in val)


def test_consolidated_model_loads(trained):
    model = checkpoint.load_model(trained)
    assert model.config.n_layer == 2 and model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.slow
def test_resume_continues(trained, tmp_path):
    """--resume auto picks up the latest complete checkpoint and goes on from its step."""
    import shutil

    run = tmp_path / "again"
    shutil.copytree(trained, run)
    out = run_mtgpt("train", "--out", run, "--nproc", "2", "--resume", "auto", "--max-steps", "40")  # the rest: the run's
    assert "resuming from" in out.stdout and "step 30" in out.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows if "val/loss" in r] == [10, 20, 30, 40]
    assert json.loads((run / "last_stop.json").read_text())["step"] == 40


def test_a_resumed_run_keeps_its_settings_unless_given_again(trained, tiny_data):
    """`mtgpt train --out RUN --resume auto --max-steps 40` continues RUN as it was started (its
    model, batch, learning rate, cadence, data), not with the defaults; an option given replaces
    the run's, a stop condition given replaces all of the run's."""
    from mtgpt import cli
    from mtgpt.train import make_plan

    def plan(*args: str, world_size: int = 2):
        options = cli.train.make_context("train", ["--out", str(trained), "--resume", "auto", *args]).params
        options.pop("nproc")
        return make_plan(cli.build_config(options), world_size=world_size, cuda=False)

    saved = json.loads((trained / "train_config.json").read_text())
    resumed = plan("--max-steps", "40").cfg.to_dict()
    assert resumed == {**saved, "max_steps": 40, "resume": "auto"}
    assert (resumed["lr"], resumed["micro_batch"], resumed["log_every"], resumed["model"]["n_embd"]) == (1e-2, 4, 5, 32)
    one_rank = plan("--max-steps", "40", world_size=1).cfg
    assert (one_rank.batch_size, one_rank.grad_accum) == (8, 2)  # the batch is kept, the accumulation derived
    given = plan("--lr", "5e-3", "--max-tokens", "99999", "--data", str(tiny_data)).cfg
    assert (given.lr, given.max_tokens, given.max_steps, given.seed) == (5e-3, 99999, None, saved["seed"])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "deepspeed --module", "torchrun -m"])
def test_launch_script(tiny_data, tmp_path, launcher):
    """launch/train.py under the `deepspeed` launcher (which adds --local_rank) and torchrun; and
    the installed package's own entry point, `mtgpt worker` as a module (the deepspeed launcher
    puts --local_rank before the command: was "No such option"), with a bundled config by name."""
    import os
    import subprocess
    import sys

    from mtgpt.world import free_port

    repo = Path(__file__).parent.parent
    bin_dir = Path(sys.executable).parent
    port = str(free_port())
    if launcher.startswith("deepspeed"):
        cmd = [bin_dir / "deepspeed", "--num_gpus", "2", "--master_port", port]
    else:
        cmd = [bin_dir / "torchrun", "--nproc_per_node", "2", "--master_port", port]
    if launcher.endswith(("--module", "-m")):
        cmd += [launcher.split()[1], "mtgpt", "worker", "--ds_config", "zero2_fp32"]
    else:
        cmd += [repo / "launch" / "train.py", "--ds_config", repo / "ds_configs" / "zero2_fp32.json"]
    cmd += ["--data", tiny_data, "--out", tmp_path / "run", *TRAIN, "--max-steps", "6", "--eval-every", "3"]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ZeRO-2" in proc.stdout
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "val/loss" in r] == [3, 6]
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_corrupt_shard_during_training(tiny_data, tmp_path):
    """A shard cut short after prepare: training stops with an error naming the shard."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shards = json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"]
    for shard in shards:  # every rank meets one
        path = data / shard["file"]
        path.write_bytes(path.read_bytes()[:1500])
    proc = run_mtgpt("train", "--data", data, "--out", tmp_path / "run", "--nproc", "2", *TRAIN,
                     "--max-steps", "50", check=False)
    assert proc.returncode != 0
    assert "is truncated or replaced" in proc.stderr and "train-00000" in proc.stderr
    assert "mtgpt info DATA_DIR --verify" in proc.stderr
    # the ranks said why; DeepSpeed's launcher added "[ERROR] [launch.py:...] [...] exits with return code = 1"
    assert "[ERROR]" not in proc.stdout + proc.stderr


def test_a_read_only_run_is_refused_before_the_launcher_starts(trained, tmp_path):
    """`--resume auto` of a run on a read-only mount (as root: a read-only bind mount in a mount
    namespace; else a folder without write permission): refused by rank 0 after the launcher had
    started, exit 2, with DeepSpeed's launcher's "[ERROR] ... exits with return code = 2" line
    naming a removed temporary file. Now one line before anything starts, exit 1."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "last_stop.json").unlink()  # (no "stopped" to say first)
    resume = [sys.executable, "-m", "mtgpt", "train", "--out", str(run), "--resume", "auto", "--max-steps", "40",
              "--nproc", "1"]
    if os.geteuid() == 0:
        if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
            pytest.fail("as root this test needs mount namespaces (unshare --mount)")
        cmd = ["unshare", "--mount", "sh", "-c", 'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh",
               str(run), *resume]
    else:
        run.chmod(0o555)
        cmd = resume
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        run.chmod(0o755)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "[ERROR]" not in proc.stdout, proc.stderr
    assert lines[0].startswith(f"Error: cannot write in the run folder {run} (") and "--out NEW_RUN" in lines[0]


def test_data_block_size_mismatch(tiny_data, tmp_path):
    proc = run_mtgpt("train", "--data", tiny_data, "--out", tmp_path / "run", "--n-layer", "2", "--n-head", "2",
                     "--n-embd", "32", "--block-size", "64", check=False)
    assert proc.returncode != 0 and "pass --block-size 32" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args, reason, step", [
    (["--max-tokens", "1000"], "max_tokens", 8),  # 128 tokens per step: ceil(1000 / 128)
    (["--max-epochs", "0.5"], "max_epochs", 12),  # 93 samples x 32 tokens / 2 / 128, rounded up
    (["--eval-every", "1", "--patience", "2", "--min-delta", "100"], "early_stopping", 3),
    (["--max-time", "4s", "--max-steps", "100000"], "max_time", None),
])
def test_stop_conditions(tiny_data, tmp_path, args, reason, step):
    run = tmp_path / "run"
    run_mtgpt("train", "--data", tiny_data, "--out", run, "--nproc", "2", *TINY_ARGS, "--micro-batch", "2",
              "--log-every", "1", "--eval-samples", "4", *args)
    stop = json.loads((run / "last_stop.json").read_text())
    assert stop["reason"] == reason
    if step is not None:
        assert stop["step"] == step
    assert checkpoint.latest_complete(run).name == checkpoint.tag_for(stop["step"])  # saved at the stop
    if reason == "max_tokens":
        assert json.loads((run / "ds_config.json").read_text())["scheduler"]["params"]["total_num_steps"] == 8


@pytest.mark.slow
def test_data_without_val_split_and_a_torn_metrics_line(tmp_path):
    """--val-fraction 0 (what prepare suggests for a tiny corpus): no evaluation, no early stopping
    (refused), no best/ and `info` and `--best` say why. Then a crash mid-write of metrics.jsonl:
    `info` and `--resume auto` drop the torn line with a warning and go on."""
    from tests.conftest import SONNETS

    data, run = tmp_path / "data", tmp_path / "run"
    run_mtgpt("prepare", SONNETS, "--out", data, "--block-size", "32", "--val-fraction", "0")
    base = ["train", "--data", data, "--out", run, "--nproc", "1", *TINY_ARGS, "--micro-batch", "2",
            "--log-every", "1", "--eval-every", "2"]
    proc = run_mtgpt(*base, "--max-steps", "4", "--patience", "2", check=False)
    assert proc.returncode != 0 and "--patience needs a val split" in proc.stderr and not run.exists()
    out = run_mtgpt(*base, "--max-steps", "4")
    assert "no val split" in out.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and not any("val/loss" in r for r in rows)
    stop = json.loads((run / "last_stop.json").read_text())
    assert stop["step"] == 4 and stop["val_loss"] is None and stop["best_val"] is None
    assert not (run / "best").exists()
    info = run_mtgpt("info", run).stdout
    assert "val loss: none (the data has no val split" in info and "train loss:" in info
    proc = run_mtgpt("sample", run, "--best", "--max-new-tokens", "2", check=False)
    assert proc.returncode != 0 and "no val split" in proc.stderr and "Traceback" not in proc.stderr

    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train/lo')  # the process died here
    info = run_mtgpt("info", run)
    assert "line 5 is torn" in info.stdout and "train loss: " in info.stdout
    out = run_mtgpt(*base, "--max-steps", "6", "--resume", "auto")
    assert "line 5 is torn" in out.stdout
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]

    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # damaged, not torn
    proc = run_mtgpt("info", run, check=False)
    assert proc.returncode != 0 and "metrics.jsonl:2: not a metrics line" in proc.stderr



# ----------------------------------------------------------------------------- in this process


def test_schedule_steps(tiny_data):
    from mtgpt.data import load_manifest
    from mtgpt.train import schedule_steps

    m = load_manifest(tiny_data)  # 93 train samples of 32 tokens
    cfg = TrainConfig(data=str(tiny_data), model=dict(TINY), micro_batch=2)
    assert schedule_steps(cfg.replace(max_steps=7), [m], 2) == 7
    assert schedule_steps(cfg.replace(max_tokens=1000), [m], 2) == 8  # ceil(1000 / 128)
    assert schedule_steps(cfg, [m], 2) == 24  # one epoch by default: ceil(93 x 32 / 128)
    assert schedule_steps(cfg.replace(max_epochs=0.5), [m], 1) == 24  # ceil(0.5 x 93 x 32 / 64)
    assert schedule_steps(cfg.replace(max_steps=100, max_tokens=1000), [m], 2) == 8  # the smallest


def test_make_plan_checks(tiny_data, tmp_path, monkeypatch):
    from mtgpt.config import ConfigError
    from mtgpt import ds_config
    from mtgpt.train import make_plan

    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), model=dict(TINY), micro_batch=2, max_steps=5)
    plan = make_plan(cfg, world_size=2, cuda=False)
    assert plan.ds_name == "zero1_fp32" and plan.ds["train_batch_size"] == 4 and plan.schedule_steps == 5
    assert plan.resume_from is None and not plan.universal and plan.tokens_per_step == 128
    from mtgpt.train import banner

    # a bundled config is named by its name, wherever the command runs: a ds_configs/zero1_fp32.json of
    # the user's in the current folder (here: another stage) was named as what was read, and reading
    # the run's train_config.json there took it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds_configs").mkdir()
    shadow = json.loads((ds_config.bundled_dir() / "zero1_fp32.json").read_text())
    (tmp_path / "ds_configs" / "zero1_fp32.json").write_text(json.dumps({**shadow, "zero_optimization": {"stage": 2}}))
    assert ", zero1_fp32 (bundled with mtgpt): ZeRO-1, fp32" in banner(make_plan(cfg, world_size=2, cuda=False), 0)
    assert make_plan(cfg.replace(ds_config=plan.cfg.ds_config), world_size=2, cuda=False).ds["zero_optimization"]["stage"] == 1
    assert make_plan(cfg.replace(ds_config="ds_configs/zero1_fp32.json"), world_size=2,  # a path: that file
                     cuda=False).ds["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match=r"^zero1_fp16 \(bundled with mtgpt\): DeepSpeed's fp16 needs a GPU"):
        make_plan(cfg.replace(ds_config="zero1_fp16"), world_size=1, cuda=False)
    with pytest.raises(ConfigError, match="DeepSpeed config /no/ds_configs/zero2_fp32.json: no such file"):
        make_plan(cfg.replace(ds_config="/no/ds_configs/zero2_fp32.json"), world_size=1, cuda=False)  # was the bundled one
    from mtgpt.train import plan_warnings

    assert plan_warnings(plan) == [] and plan_warnings(make_plan(cfg.replace(warmup_steps=4), 2, cuda=False)) == []
    warned = plan_warnings(make_plan(cfg.replace(warmup_steps=5), world_size=2, cuda=False))
    assert len(warned) == 1 and "--warmup-steps 5 is not shorter than the 5-step schedule" in warned[0]
    from mtgpt import ds_config

    _, raw = ds_config.find("zero1_fp32")  # a JSON of the user's without torch_adam: a silent minute of compiling
    del raw["optimizer"]["params"]["torch_adam"], raw["optimizer"]["params"]["fused"]
    (tmp_path / "fused.json").write_text(json.dumps(raw))
    [note] = plan_warnings(make_plan(cfg.replace(ds_config=str(tmp_path / "fused.json")), 2, cuda=False))
    assert note.startswith('note: the DeepSpeed JSON\'s optimizer has no "torch_adam": true')
    from mtgpt.data import DataError

    with pytest.raises(DataError, match="no such folder; create it with .*; if it moved, give --data NEW_PATH: a "
                                        "resumed run takes it"):  # (a resume whose data folder moved)
        make_plan(cfg.replace(data=str(tmp_path / "moved"), resume="auto"), 2, cuda=False)


def _fit(cfg):
    from mtgpt.train import fit, make_plan

    return fit(make_plan(cfg, world_size=1))


@pytest.mark.parametrize("ds", ["zero0_fp32", "zero1_fp32"])
def test_each_step_trains_at_the_lr_it_logs_and_none_at_0(tiny_data, tmp_path, world_of_one, ds):
    """DeepSpeed's WarmupCosineLR starts "before its first step" at lr 0: steps 1 and 2 both
    trained at lr 0 (the weights after 2 steps were those after 1) and each logged lr was the
    next step's. Then the first step trained at lr 0 (a 1-step run learned nothing, whatever its
    --lr). Now the warmup is nanoGPT's, step N at N/(W + 1) of --lr (W = 2: a third, two thirds),
    the last step at the cosine's floor, each logged at its own step."""
    from safetensors.torch import load_file

    cfg = TrainConfig(data=str(tiny_data), out="", model=dict(TINY), micro_batch=2, lr=1e-2, warmup_steps=2,
                      min_lr_ratio=0.1, eval_samples=4, log_every=1, eval_every=100, max_steps=3, ds_config=ds)
    weights = {}
    for n in (1, 2, 3):
        _fit(cfg.replace(out=str(tmp_path / f"run{n}"), max_steps=n))
        weights[n] = load_file(tmp_path / f"run{n}" / "model.safetensors")
    moved = [max((weights[n + 1][k] - weights[n][k]).abs().max().item() for k in weights[n]) for n in (1, 2)]
    assert moved[0] > 1e-3 and moved[1] > 1e-4, moved  # (Adam's first steps move each weight by about the lr)
    assert [(r["step"], r["lr"]) for r in metrics(tmp_path / "run3") if "lr" in r] == \
        [(1, pytest.approx(1e-2 / 3)), (2, pytest.approx(2e-2 / 3)), (3, pytest.approx(1e-3))]
    # a 1-step run learns, at its --lr: another --lr gives other weights
    _fit(cfg.replace(out=str(tmp_path / "run1b"), max_steps=1, lr=1e-3))
    other = load_file(tmp_path / "run1b" / "model.safetensors")
    assert max((other[k] - weights[1][k]).abs().max().item() for k in other) > 1e-4
    # the 2-step run resumed for 6 trains as a 6-step run: its step 3 trained at the lr the optimizer
    # had saved, the 2-step plan's floor (1e-3), not the 6-step plan's point (8.7e-3)
    _fit(cfg.replace(out=str(tmp_path / "run6"), max_steps=6))
    _fit(cfg.replace(out=str(tmp_path / "run2"), max_steps=6, resume="auto"))
    lrs = {k: [r["lr"] for r in metrics(tmp_path / k) if "lr" in r] for k in ("run2", "run6")}
    assert lrs["run2"] == lrs["run6"] and lrs["run6"][2] == pytest.approx(1e-2 * (0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2))
    six, again = load_file(tmp_path / "run6" / "model.safetensors"), load_file(tmp_path / "run2" / "model.safetensors")
    assert all(torch.equal(again[k], six[k]) for k in six)


def test_best_is_the_lowest_val_loss_whatever_min_delta_says(tiny_data, tmp_path, world_of_one, capsys):
    """--min-delta sets what counts as progress for --patience, not which weights best/ holds: a
    run stopped early by it (the val loss fell, by less than 100) exports the lowest val loss's
    weights to best/, as the README says. (best/ stayed at the first evaluation's weights.)"""
    from safetensors import safe_open

    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, lr=3e-3, eval_samples=4,
                      log_every=1, eval_every=1, max_steps=8, patience=2, min_delta=100.0, ds_config="zero0_fp32")
    summary = _fit(cfg)
    assert summary["reason"] == "early_stopping" and summary["step"] == 3  # 2 evaluations without a gain of 100
    vals = {r["step"]: r["val/loss"] for r in metrics(run) if "val/loss" in r}
    lowest = min(vals, key=vals.get)
    assert lowest > 1 and summary["best_val"] == vals[lowest]
    with safe_open(str(run / "best" / "model.safetensors"), "pt") as f:
        assert int(f.metadata()["step"]) == lowest and float(f.metadata()["val_loss"]) == vals[lowest]
    # the last line names best/ too: after early stopping the latest weights are not the best
    assert f"model: {run / 'model.safetensors'}; the best val loss's: {run / 'best'} (sample, eval, chat, export take " \
        "--best)" in capsys.readouterr().out


def test_a_run_stopped_by_an_evaluation_between_log_steps_logs_its_last_step(tiny_data, tmp_path, world_of_one):
    """Early stopping at an evaluation that is not a --log-every step: the last step's train loss,
    tokens and speed were never logged (metrics.jsonl ended with the val row alone)."""
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, lr=3e-3, eval_samples=4,
                      log_every=3, eval_every=2, max_steps=20, patience=1, min_delta=100.0, ds_config="zero0_fp32")
    summary = _fit(cfg)
    assert summary["reason"] == "early_stopping" and summary["step"] == 4
    last = {k: v for r in metrics(run) if r["step"] == 4 for k, v in r.items()}
    assert last["train/tokens"] == 4 * 2 * TINY["block_size"] and math.isfinite(last["train/loss"])
    assert last["perf/tokens_per_s"] > 0 and "val/loss" in last
    assert [r["step"] for r in metrics(run) if "train/loss" in r] == [3, 4]


@pytest.mark.parametrize("eval_every", [3, 100])
def test_a_diverged_run_saves_nothing_a_nan_trained(tiny_data, tmp_path, world_of_one, eval_every):
    """A NaN or inf loss stops the run before anything it trained is saved: a non-finite val loss
    at an evaluation (eval every 3: the weights are 1e29 there), and the train loss at a save
    between two log steps (save every 4, log every 5: step 4's loss is the first NaN). Before: a
    NaN val loss counted as "no improvement" (a run ending there exited 0) and step 4's NaN
    weights were saved. Nor does a thread of fit's outlive it (TensorBoard's writer ran on into
    the rank's exit, with the progress bar open: a rank of a diverged 2-rank run once aborted there)."""
    import threading

    from mtgpt.train import TrainingDiverged

    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, lr=1e30, warmup_steps=1,
                      eval_samples=4, log_every=5, eval_every=eval_every, save_every=4, max_steps=8,
                      ds_config="zero0_fp32")
    what, step = ("val loss", 3) if eval_every == 3 else ("training loss", 4)
    threads = set(threading.enumerate())
    with pytest.raises(TrainingDiverged, match=f"the {what} is (nan|inf) at step {step}; stopping. Nothing was saved"):
        _fit(cfg)
    assert checkpoint.latest_complete(run) is None and not (run / "model.safetensors").exists()
    assert [t.name for t in set(threading.enumerate()) - threads] == []


def test_a_run_whose_gradients_overflow_at_zero1_fp32_stops_with_an_error(tiny_data, tmp_path, world_of_one):
    """DeepSpeed's ZeRO optimizers skip a step whose gradient is not finite, fp32 too: a run at lr
    10 skipped 53 of 60 steps in silence (its loss finite, the lr frozen, 'inf' grad norms in
    metrics.jsonl) and exited 0. In fp32 and bf16 (no loss scale to back off) that is divergence."""
    from mtgpt.train import TrainingDiverged

    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), model=dict(TINY), micro_batch=2, lr=1000.0,
                      eval_samples=4, log_every=5, eval_every=100, max_steps=10, ds_config="zero1_fp32")
    with pytest.raises(TrainingDiverged, match=r"the gradient norm is (nan|inf) at step \d+; stopping"):
        _fit(cfg)


def test_a_run_that_stopped_before_its_first_save_starts_again_with_resume_auto(tiny_data, tmp_path, world_of_one):
    """A run that died before its first save (a traceback in the ranks, a kill) left its settings
    and logs but no checkpoint: without --resume it was "already holds a run; pass --resume auto",
    and with --resume auto "--data is required". --resume auto now starts it again from step 0
    with its settings, its old logs dropped."""
    import shutil

    from mtgpt import cli, rundir
    from mtgpt.config import ConfigError
    from mtgpt.train import fit, make_plan

    run = tmp_path / "run"
    _fit(TrainConfig(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, lr=3e-3, eval_samples=4,
                     log_every=1, eval_every=100, max_steps=3, ds_config="zero0_fp32"))
    shutil.rmtree(run / "checkpoints")
    (run / "model.safetensors").unlink()

    def config(*args: str) -> TrainConfig:
        options = cli.train.make_context("train", ["--out", str(run), *args]).params
        options.pop("nproc")
        return cli.build_config(options)

    with pytest.raises(ConfigError, match="holds a run that stopped before its first save; pass --resume auto"):
        make_plan(config("--data", str(tiny_data), "--max-steps", "2"), 1)
    again = config("--resume", "auto", "--max-steps", "2")
    assert again.data == [str(tiny_data)] and again.lr == 3e-3 and again.model.n_embd == TINY["n_embd"]
    assert rundir.resumed_world_size(again) == 1  # its ranks (was None: 2 on a CPU, and its batch refused)
    plan = make_plan(again, 1)
    assert plan.resume_from is None
    assert fit(plan)["step"] == 2
    assert [r["step"] for r in metrics(run) if "train/loss" in r] == [1, 2]  # the old attempt's 1..3 dropped


def test_progress_lines_where_stderr_is_a_file(tiny_data, tmp_path, world_of_one, capsys):
    """Under nohup or Slurm (stderr not a terminal: no bar) a run printed only its evaluations:
    now a line with the loss and the time left, at the first log step, then at most every 30 s,
    and at the last step."""
    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), model=dict(TINY), micro_batch=2,
                      eval_samples=4, log_every=2, eval_every=100, max_steps=6, ds_config="zero0_fp32")
    _fit(cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step ") and "/6: loss" in line]
    assert [line.split(":")[0] for line in lines] == ["step 2/6", "step 6/6"], err
    assert re.fullmatch(r"step 6/6: loss \d+\.\d{4}, lr \S+, [\d,]+ tokens/s, 0:\d\d elapsed, 0:00 left", lines[1])


def test_progress_lines_count_down_to_max_time(world_of_one, capsys):
    """With --max-time the time left is the smaller of the steps' and the clock's (a run stopping
    in 8 s said "8:02 left" for its steps); the clock counts the run's training time before this
    process too."""
    from types import SimpleNamespace

    from mtgpt.train import Progress

    plan = SimpleNamespace(schedule_steps=1000, cfg=SimpleNamespace(max_time="1000s"))
    bar = Progress(plan, step=0, elapsed=500.0)
    bar.lines, bar.began = True, time.time() - 100  # 100 s for the first step: 27 h for the steps left
    bar.show(1, {"train/loss": 3.0, "lr": 1e-3, "perf/tokens_per_s": 1000.0})
    bar.close()
    assert re.search(r"step 1/1000: .*, 1:40 elapsed, 6:(39|40) left$", capsys.readouterr().err.strip())


def test_tokens_per_second_leaves_out_the_loss_plot_of_an_evaluation(tiny_data, tmp_path, world_of_one, monkeypatch):
    """perf/tokens_per_s at the log step after an evaluation counted the redraw of loss.png (0.1 to
    0.6 s): a dip at every evaluation. Here the plot takes 3 s and must not show (the two steps
    after it take ~0.05 s; up to 2 s leaves room for a loaded machine and best/'s background
    export)."""
    from mtgpt import monitor

    draw = monitor.plot_losses
    monkeypatch.setattr(monitor, "plot_losses", lambda *a: (time.sleep(3.0), draw(*a)))
    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), model=dict(TINY), micro_batch=2,
                      eval_samples=4, log_every=2, eval_every=2, max_steps=4, ds_config="zero0_fp32")
    _fit(cfg)
    speed = {r["step"]: r["perf/tokens_per_s"] for r in metrics(tmp_path / "run") if "perf/tokens_per_s" in r}
    assert speed[4] > 2 * 64 / 2.0, speed  # two steps of 64 tokens in well under the plot's 3 s


def test_a_full_disk_at_a_save_is_one_line(tiny_data, tmp_path, world_of_one):
    """A checkpoint on a full filesystem (a 2 MB tmpfs here) crashed with torch's 55-line
    traceback ("unexpected pos 4736 vs 4628"); now a SaveError saying how much space it takes."""
    import subprocess

    from mtgpt.train import SaveError

    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)]).returncode:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("cannot mount a tmpfs under CI (needs root)")
        pytest.skip("needs root to mount a small tmpfs")
    try:
        cfg = TrainConfig(data=str(tiny_data), out=str(small / "run"), model=dict(TINY), micro_batch=2,
                          eval_samples=4, log_every=1, eval_every=100, save_every=2, max_steps=4, ds_config="zero0_fp32")
        with pytest.raises(SaveError, match=r"could not save .*step_00000002: no space left on its filesystem \(\d+ MB "
                                            r"free; a checkpoint of this model takes about 25 MB"):
            _fit(cfg)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_a_full_disk_at_the_model_file_is_one_line(tiny_data, tmp_path, world_of_one):
    """The DeepSpeed checkpoint fits but model.safetensors does not: safetensors' own error came
    out as a traceback; now the SaveError, and no half-written model file is left."""
    import subprocess

    from mtgpt.train import SaveError

    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "sized"), model=dict(TINY), micro_batch=2,
                      eval_samples=4, log_every=1, eval_every=100, save_every=2, max_steps=2, ds_config="zero0_fp32")
    _fit(cfg)  # how much the first save takes
    blocks = sum(-(-f.stat().st_size // 4096) * 4096 for f in (tmp_path / "sized").rglob("*") if f.is_file())
    weights = (tmp_path / "sized" / "model.safetensors").stat().st_size
    small = tmp_path / "small"
    small.mkdir()
    size = f"size={blocks - weights // 2}"  # all the run's files but half the model file
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(small)]).returncode:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("cannot mount a tmpfs under CI (needs root)")
        pytest.skip("needs root to mount a small tmpfs")
    try:
        with pytest.raises(SaveError, match=r"could not save .*/run/model.safetensors: no space left on its filesystem"):
            _fit(cfg.replace(out=str(small / "run")))
        assert not list((small / "run").glob("model.safetensors*"))
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_fit_resume_and_go_back_in_process(tiny_data, tmp_path, world_of_one, capsys):
    """A world of one trains, saves, resumes exactly where it stopped, and goes back to an older
    checkpoint (the later saves set aside), all in this process."""
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, lr=3e-3,
                      eval_samples=4, log_every=2, eval_every=3, save_every=3, max_steps=6, ds_config="zero0_fp32")
    summary = _fit(cfg)
    assert summary["step"] == 6 and summary["reason"] == "max_steps"
    assert checkpoint.complete_tags(run) == ["step_00000003", "step_00000006"]
    rows = metrics(run)
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "val/loss" in r] == [3, 6] and (run / "best" / "model.safetensors").is_file()

    assert _fit(cfg.replace(resume="auto", max_steps=8))["step"] == 8
    assert "resuming from" in capsys.readouterr().out
    assert _fit(cfg.replace(resume="auto", max_steps=8))["step"] == 8  # a run at its stop trains nothing, and says so
    assert "nothing to train: the run had already stopped (max_steps) at step 8; to go on, give a larger --max-steps" \
        in capsys.readouterr().out
    assert [r["step"] for r in metrics(run) if "train/loss" in r] == [2, 4, 6, 8]
    record = {name: (run / name).read_text() for name in ("train_config.json", "run_info.json")}
    assert _fit(cfg.replace(resume="auto", max_steps=5, lr=0.5))["step"] == 8  # a limit below the step: said so
    assert "nothing to train: the run is at step 8, past --max-steps 5; to go on, give a --max-steps above 8" \
        in capsys.readouterr().out
    assert {name: (run / name).read_text() for name in record} == record  # how it was trained, still
    assert _fit(cfg.replace(resume="auto", max_steps=None, max_time="0.01"))["step"] == 8  # trained longer already
    assert "nothing to train: the run had already stopped (max_time) at step 8; to go on, give a larger --max-time" \
        in capsys.readouterr().out

    summary = _fit(cfg.replace(resume=str(run / "checkpoints" / "step_00000006"), max_steps=7, save_every=1))
    assert summary["step"] == 7 and "set aside" in capsys.readouterr().out
    assert checkpoint.complete_tags(run) == ["step_00000006", "step_00000007"]
    assert checkpoint.weights_step(run) == 7
    assert [r["step"] for r in metrics(run) if "train/loss" in r] == [2, 4, 6, 7]


def test_a_data_folder_moved_goes_on_where_it_was_and_keeps_best(tiny_data, tmp_path, world_of_one, capsys):
    """The data folder moved (or renamed), and the resume given its new path as the error asks:
    its new name made it "not the source the run saved", so its shuffle started over and best/ was
    replaced by a worse model. The same data is known by what it holds, wherever it is: the resume
    trains exactly as one from the unmoved folder."""
    import shutil

    data, run, twin = tmp_path / "books", tmp_path / "run", tmp_path / "twin"
    shutil.copytree(tiny_data, data)
    cfg = TrainConfig(data=str(data), out=str(run), model=dict(TINY), micro_batch=2, lr=3e-3, eval_samples=4,
                      log_every=1, eval_every=2, save_every=2, max_steps=4, ds_config="zero0_fp32")
    _fit(cfg)
    shutil.copytree(run, twin)
    best = (run / "best" / "model.safetensors").read_bytes()
    _fit(cfg.replace(out=str(twin), resume="auto", max_steps=6, lr=30.0))  # (a worse model than best/)
    data.rename(tmp_path / "books-moved")
    capsys.readouterr()
    _fit(cfg.replace(data=str(tmp_path / "books-moved"), resume="auto", max_steps=6, lr=30.0))
    out = capsys.readouterr().out
    assert "own shuffle" not in out and "start again" not in out, out
    losses = lambda r: [(m["step"], m["train/loss"]) for m in metrics(r) if "train/loss" in m]  # noqa: E731
    assert losses(run) == losses(twin) and losses(run)[-1][0] == 6
    assert (run / "best" / "model.safetensors").read_bytes() == best  # step 4's better model kept


def test_best_is_written_again_after_going_back_or_branching(tiny_data, tmp_path, world_of_one, capsys):
    """A run taken back to an older checkpoint (its later best/ set aside), or branched into a new
    --out, kept the checkpoint's best val loss without the weights behind it: no later evaluation
    beat it, so no best/ was written, and `sample --best` said there was none. best/ starts again."""
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, lr=3e-3, eval_samples=4,
                      log_every=2, eval_every=2, save_every=2, max_steps=6, ds_config="zero0_fp32")
    _fit(cfg)
    assert checkpoint.weights_step(run / "best") == 6  # (the loss still falls at step 6)
    worse = dict(max_steps=5, lr=30.0, eval_every=1)
    for out, resume in ((run, run / "checkpoints" / "step_00000004"), (tmp_path / "branch", run / "checkpoints" / "step_00000004")):
        capsys.readouterr()
        _fit(cfg.replace(out=str(out), resume=str(resume), **worse))
        assert "best/ starts again at the next evaluation" in capsys.readouterr().out
        assert checkpoint.weights_step(out / "best") == 5, out


def test_a_resume_with_other_eval_samples_starts_best_again(tiny_data, tmp_path, world_of_one, capsys):
    """--eval-samples changed on resume: the val loss of another val set was compared with the
    old best, silently. Like a mixture's new weights, best/ and early stopping start again."""
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, lr=3e-3, eval_samples=4,
                      log_every=2, eval_every=2, save_every=2, max_steps=4, ds_config="zero0_fp32")
    _fit(cfg)
    capsys.readouterr()
    _fit(cfg.replace(resume="auto", max_steps=6, eval_samples=16, lr=30.0))
    assert "note: the val loss now is measured on other val samples (--eval-samples 4 -> 16) than the best so far" \
        in capsys.readouterr().out
    assert checkpoint.weights_step(run / "best") == 6


def test_a_torn_last_save_sets_best_aside_and_says_so(tiny_data, tmp_path, world_of_one, capsys):
    """The last save torn (no COMPLETE), `--resume auto` goes on from the one before; best/, of the
    torn save's step, belongs to the branch left and is set aside: it was moved without a word."""
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, eval_samples=4,
                      log_every=2, eval_every=4, save_every=2, max_steps=4, ds_config="zero0_fp32")
    _fit(cfg)
    assert checkpoint.weights_step(run / "best") == 4
    (run / "checkpoints" / "step_00000004" / checkpoint.COMPLETE).unlink()
    capsys.readouterr()
    assert _fit(cfg.replace(resume="auto", max_steps=5))["step"] == 5
    said = capsys.readouterr().out
    assert "resuming at step 2, before this run's later saves (best/ of step 4): they are set aside in " in said, said
    [aside] = (run / "checkpoints").glob("abandoned-*")
    assert checkpoint.weights_step(aside / "best") == 4
    # the set-aside best/ is a model to sample, eval or export (it was "a checkpoint inside the run; give the
    # run folder", whose weights are another branch's now)
    from mtgpt import folders

    assert folders.kind(aside / "best") == "model" and checkpoint.model_folder(aside / "best") == aside / "best"
    assert checkpoint.load_model(aside / "best").config.n_layer == TINY["n_layer"]
    with pytest.raises(checkpoint.ModelFileError, match="is a model folder itself .* leave out --best"):
        checkpoint.model_folder(aside / "best", best=True)


def test_a_deleted_last_checkpoint_sets_its_weights_aside_and_says_so(tiny_data, tmp_path, world_of_one, capsys):
    """The newest checkpoint folder deleted whole (to free space, or thought bad), `--resume auto`
    goes on from the one before: best/ and model.safetensors of the deleted step belong to the
    branch left. Both stayed, without a word (best/ then held a later step than the run)."""
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, eval_samples=4,
                      log_every=2, eval_every=4, save_every=2, max_steps=4, ds_config="zero0_fp32")
    _fit(cfg)
    assert checkpoint.weights_step(run / "best") == checkpoint.weights_step(run) == 4
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    capsys.readouterr()
    assert _fit(cfg.replace(resume="auto", max_steps=3, save_every=100))["step"] == 3
    said = capsys.readouterr().out
    assert "resuming at step 2, before this run's later saves (best/ of step 4): they are set aside in " in said, said
    assert "note: the run's model.safetensors is of step 4, whose checkpoint is gone or was cut short; it is " \
        "written again with step 2's weights" in said, said
    [aside] = (run / "checkpoints").glob("abandoned-*")
    assert checkpoint.weights_step(aside / "best") == 4 and checkpoint.weights_step(run) == 3


def test_a_deleted_model_file_is_said_and_written_again_by_a_resume(tiny_data, tmp_path, world_of_one, capsys):
    """A stopped run whose model.safetensors was deleted: sample said it "has no model yet: train
    writes it at its first checkpoint" (it had two), info said nothing, and --resume auto trained
    nothing and left it missing. Now each says so, and the resume writes it again."""
    from safetensors.torch import load_file

    from mtgpt.info import describe

    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, eval_samples=4,
                      log_every=1, eval_every=100, save_every=1, max_steps=2, ds_config="zero1_fp32")
    _fit(cfg)
    before = load_file(run / checkpoint.WEIGHTS)
    (run / checkpoint.WEIGHTS).unlink()
    with pytest.raises(checkpoint.ModelFileError, match=rf"{run} has checkpoints \(the latest: step_00000002\) but "
                                                        rf"no model.safetensors; write it again from the latest with "
                                                        rf"`mtgpt train --out {run} --resume auto`"):
        checkpoint.model_folder(run)
    assert f"model: {run / checkpoint.WEIGHTS} is missing; `mtgpt train --out {run} --resume auto` writes it" \
        in describe(str(run))[0]
    capsys.readouterr()
    assert _fit(cfg.replace(resume="auto"))["step"] == 2
    assert f"note: {run / checkpoint.WEIGHTS} was missing; written again from the checkpoint of step 2" \
        in capsys.readouterr().out
    after = load_file(run / checkpoint.WEIGHTS)
    assert all(torch.equal(after[k], before[k]) for k in before) and checkpoint.weights_step(run) == 2


def test_a_bf16_resume_prints_nothing_of_deepspeeds_debugging(tiny_data, tmp_path, world_of_one, capsys):
    """DeepSpeed's bf16 optimizer print()s '_load_legacy_checkpoint current_rank_sd[...]' at every
    load: every `zero1_bf16` resume (make demo's config) said it once per rank."""
    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), model=dict(TINY), micro_batch=2, eval_samples=4,
                      log_every=1, eval_every=100, max_steps=1, ds_config="zero1_bf16")
    _fit(cfg)
    capsys.readouterr()
    assert _fit(cfg.replace(resume="auto", max_steps=2))["step"] == 2
    said = capsys.readouterr()
    assert "resuming from" in said.out and "_load_legacy_checkpoint" not in said.out + said.err


def test_fit_without_a_val_split_in_process(tmp_path, world_of_one):
    from mtgpt.data.prepare import prepare
    from tests.conftest import SONNETS

    prepare([str(SONNETS)], tmp_path / "data", block_size=32, val_fraction=0.0, quiet=True)
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=dict(TINY), micro_batch=2,
                      log_every=1, eval_every=2, max_steps=3)
    summary = _fit(cfg)
    assert summary["step"] == 3 and summary["val_loss"] != summary["val_loss"]  # nan: nothing evaluated
    assert not any("val/loss" in r for r in metrics(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "last_stop.json").read_text())["val_loss"] is None


def test_zero3_reports_the_same_parameters_and_flops_as_zero1(tiny_data, tmp_path, world_of_one, capsys,
                                                              monkeypatch):
    """ZeRO-3 partitions the parameters at deepspeed.initialize; the banner and MFU count the
    model's shape, not what is left on the rank (it used to print 0 parameters)."""
    from mtgpt.model import flops_per_token, param_count

    monkeypatch.setenv("MTGPT_PEAK_FLOPS", "1e12")
    seen = {}
    for stage in (1, 3):
        cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / f"z{stage}"), model=dict(TINY), micro_batch=2,
                          log_every=1, eval_every=100, max_steps=2, ds_config=f"zero{stage}_fp32")
        _fit(cfg)
        banner = next(line for line in capsys.readouterr().out.splitlines() if " parameters (" in line)
        row = next(r for r in metrics(tmp_path / f"z{stage}") if "perf/mfu" in r)
        seen[stage] = (banner.split(":")[1].split(" parameters")[0].strip(),
                       round(row["perf/mfu"] * 1e12 / row["perf/tokens_per_s"]))
    model = TrainConfig(data="", out="", model=dict(TINY)).model
    assert seen[1] == seen[3] == (f"{param_count(model):,}", flops_per_token(model))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_runs_export_the_fp32_master_weights(tiny_data, tmp_path, world_of_one, stage):
    """model.safetensors of a bf16 run holds DeepSpeed's fp32 master weights, bit for bit what its
    own zero-to-fp32 reader gets from the checkpoint (not the bf16 working copy upcast)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, lr=3e-3, log_every=1,
                      eval_every=100, max_steps=3, ds_config=f"zero{stage}_bf16")
    _fit(cfg)
    exported = load_file(run / "model.safetensors")
    if stage == 1:  # fp32 gradient accumulation makes it DeepSpeed's BF16_Optimizer, whose checkpoints
        # zero_to_fp32 does not read; its universal-checkpoint converter does (fp32 per parameter)
        tag = checkpoint.universal(run / "checkpoints" / "step_00000003", is_writer=True)
        reference = {k: torch.load(tag / "zero" / k / "fp32.pt", weights_only=False)["param"] for k in exported}
    else:
        reference = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_00000003")
    assert set(exported) <= set(reference)
    assert all(torch.equal(exported[k], reference[k].float()) for k in exported)
    assert any((exported[k] != exported[k].bfloat16().float()).any() for k in exported)  # not bf16 values


@pytest.mark.slow
def test_compile_through_deepspeed_at_every_stage(tiny_data, tmp_path, world_of_one, capsys):
    """--compile through the real DeepSpeed engine: ZeRO 0-2 train a compiled model with no graph
    break; at ZeRO-3, whose parameter hooks would break the graph at every layer, mtgpt trains
    uncompiled and says so once."""
    from torch._dynamo.utils import counters

    for stage in range(4):
        torch._dynamo.reset()
        counters.clear()
        cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / f"z{stage}"), model=dict(TINY), micro_batch=2,
                          log_every=1, eval_every=100, max_steps=2, ds_config=f"zero{stage}_fp32", compile=True)
        assert _fit(cfg)["step"] == 2
        out = capsys.readouterr().out
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        if stage < 3:
            assert (graphs >= 1, breaks, "torch.compile is off" in out) == (True, 0, False), dict(counters["graph_break"])
        else:
            assert (graphs, out.count("torch.compile is off at ZeRO stage 3")) == (0, 1)


def test_tf32_for_fp32_matmuls_on_cuda_only():
    from mtgpt.train import matmul_precision

    assert matmul_precision(True, torch.device("cuda", 0)) == "high"
    assert matmul_precision(False, torch.device("cuda", 0)) == "highest"
    assert matmul_precision(True, torch.device("cpu")) is None
    assert TrainConfig(data="", out="").tf32 and not TrainConfig(data="", out="", tf32=False).tf32


def test_a_run_resumed_on_another_number_of_ranks_keeps_its_batch(tiny_data, tmp_path, world_of_one):
    """A 1-rank run of batch 8 (micro 2 x accum 4), planned again on 2 and 4 ranks with the same
    options: accum 2 and 1, the same tokens per step and schedule; unless --batch-size says otherwise."""
    from mtgpt.train import make_plan

    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), model=dict(TINY), micro_batch=2, grad_accum=4,
                      log_every=1, eval_every=100, max_steps=2, ds_config="zero0_fp32")
    first = make_plan(cfg, world_size=1)
    _fit(cfg)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["batch_size"] == 8
    again = cfg.replace(grad_accum=1, resume="auto", max_steps=4)
    plans = {n: make_plan(again, world_size=n) for n in (2, 4)}
    assert [(p.cfg.grad_accum, p.tokens_per_step, p.schedule_steps) for p in plans.values()] == \
        [(2, first.tokens_per_step, 4), (1, first.tokens_per_step, 4)]
    assert make_plan(again.replace(batch_size=16), world_size=2).cfg.grad_accum == 4
    # a batch the ranks cannot divide: the message names the run's batch (the user gave no --batch-size)
    from mtgpt.config import ConfigError
    with pytest.raises(ConfigError, match=r"^the resumed run's batch of 8 sequences per step .* is not a multiple of "
                                          r"micro-batch 2 x 3 rank\(s\) = 6: resume with a --micro-batch and number "
                                          r"of ranks whose product divides 8 \(or run on 2 rank\(s\): --nproc 2\), or "
                                          r"give --batch-size 6 or 12"):
        make_plan(again, world_size=3)
    with pytest.raises(ConfigError, match=r"^--grad-accum 3 disagrees with the resumed run's batch of 8"):
        make_plan(again.replace(grad_accum=3), world_size=2)
    with pytest.raises(ConfigError, match=r"^--batch-size 10 is not a multiple"):  # one the user gave
        make_plan(again.replace(batch_size=10), world_size=4)


@pytest.mark.slow
def test_one_and_two_ranks_with_the_same_batch_size_train_the_same_tokens(tiny_data, tmp_path):
    from mtgpt.data.manifest import load_manifest

    logged, val = {}, {}
    for n in (1, 2):
        run = tmp_path / f"n{n}"
        run_mtgpt("train", "--data", tiny_data, "--out", run, "--nproc", n, *TINY_ARGS, "--batch-size", "8",
                  "--micro-batch", "2", "--max-steps", "4", "--log-every", "1", "--eval-every", "100")
        logged[n] = [(r["step"], r["train/tokens"]) for r in metrics(run) if "train/loss" in r]
        val[n] = [(r["step"], r["val/loss"], r["val/bpb"]) for r in metrics(run) if "val/loss" in r]
        assert json.loads((run / "ds_config.json").read_text())["gradient_accumulation_steps"] == 4 // n
    assert logged[1] == logged[2] == [(s, s * 8 * TINY["block_size"]) for s in (1, 2, 3, 4)]
    # the same val set on 1 and 2 ranks: 11 val samples (2 ranks used to score 10 of them)
    assert load_manifest(tiny_data)["splits"]["val"]["samples"] % 2 == 1
    assert [s for s, _, _ in val[2]] == [4] and val[1][0] == pytest.approx(val[2][0], rel=1e-5)


@pytest.mark.slow
def test_zero0_clips_two_ranks_with_the_global_gradient_norm(tiny_data, tmp_path):
    """ZeRO-0 clips with PyTorch's clip_grad_norm_ on each rank's own gradients, which are the
    all-reduced mean by then: on 2 ranks the norm it clips with (train/grad_norm) is ZeRO-1's,
    whose optimizer computes it over both ranks' shards."""
    norms = {}
    for name in ("zero0_fp32", "zero1_fp32"):
        run = tmp_path / name
        run_mtgpt("train", "--data", tiny_data, "--out", run, "--nproc", 2, *TINY_ARGS, "--ds-config", name,
                  "--micro-batch", "2", "--max-steps", "3", "--log-every", "1", "--eval-every", "100")
        norms[name] = [r["train/grad_norm"] for r in metrics(run) if "train/loss" in r]
    assert len(norms["zero0_fp32"]) == 3 and norms["zero0_fp32"] == pytest.approx(norms["zero1_fp32"], rel=1e-4)


def test_the_vocabulary_is_padded_on_a_gpu_and_a_resumed_run_keeps_its_padding(tiny_data, tmp_path):
    from mtgpt.config import ConfigError
    from mtgpt.train import make_plan

    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), model=dict(TINY), micro_batch=2, max_steps=5,
                      ds_config="zero1_fp32")
    assert make_plan(cfg, world_size=1, cuda=False).cfg.model.vocab_multiple == 1
    assert make_plan(cfg, world_size=1, cuda=True).cfg.model.vocab_multiple == 64
    assert make_plan(cfg.replace(model={**TINY, "vocab_multiple": 8}), world_size=1, cuda=True).cfg.model.vocab_multiple == 8
    run = tmp_path / "run"  # a run that saved a checkpoint, with its train_config.json
    folder = run / checkpoint.CKPT_DIR / checkpoint.tag_for(5)
    folder.mkdir(parents=True)
    checkpoint.mark_complete(run, folder.name, {"step": 5, "world_size": 1}, keep_last=5)
    again = cfg.replace(resume="auto", max_steps=10)
    for saved, cuda, kept in ((64, False, 64), (None, True, 1), (1, True, 1)):
        model = {**TINY, **({"vocab_multiple": saved} if saved else {})}  # None: saved before padding existed
        (run / "train_config.json").write_text(json.dumps({**cfg.to_dict(), "model": model}))
        assert make_plan(again, world_size=1, cuda=cuda).cfg.model.vocab_multiple == kept
    with pytest.raises(ConfigError, match="padded to a multiple of 1, not 64"):
        make_plan(again.replace(model={**TINY, "vocab_multiple": 64}), world_size=1, cuda=True)


def test_a_padded_run_trains_saves_the_vocabulary_and_resumes(tiny_data, tmp_path, world_of_one):
    """Through the real engine (ZeRO-1, bf16, a world of one): padded rows live in DeepSpeed's
    checkpoints (the run resumes with them), model.safetensors has exactly 50257."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(run), model={**TINY, "vocab_multiple": 64}, micro_batch=2,
                      eval_samples=4, log_every=1, eval_every=100, save_every=2, max_steps=2, ds_config="zero1_bf16")
    assert _fit(cfg)["step"] == 2
    assert load_file(str(run / "model.safetensors"))["transformer.wte.weight"].shape[0] == 50257
    assert json.loads((run / "train_config.json").read_text())["model"]["vocab_multiple"] == 64
    assert _fit(cfg.replace(resume="auto", max_steps=4, model={**TINY}))["step"] == 4  # keeps its padding
    assert checkpoint.load_model(run).transformer.wte.weight.shape[0] == 50304


def _accumulated_grad_error(raw: dict, stage: int, accum: int = 8) -> float:
    """Relative error of the gradient DeepSpeed holds after `accum` bf16 micro-batches (ZeRO
    `stage`, DeepSpeed dict `raw`), against the same bf16 micro-gradients summed in fp64."""
    import copy

    import deepspeed

    from mtgpt import ds_config
    from mtgpt.config import ModelConfig
    from mtgpt.model import GPT
    from mtgpt.train import Plan, build_engine, fused_loss

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)
    torch.manual_seed(0)
    base = GPT(cfg)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50257, (2, 33), generator=g) for _ in range(accum)]
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    bf16.fused_loss = fused_loss({"zero_optimization": {"stage": stage}})  # the engine's loss (build_engine)
    exact = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in bf16.named_parameters()}
    for x in batches:
        (bf16(x[:, :-1], x[:, 1:])[1] / accum).backward()
        for n, p in bf16.named_parameters():
            exact[n] += p.grad.double()
            p.grad = None
    raw = {**raw, "zero_optimization": {"stage": stage}}
    tc = TrainConfig(data="-", out="-", model=cfg, micro_batch=2, grad_accum=accum, compile=False, max_steps=4)
    engine = build_engine(Plan(tc, ds_config.resolve(tc, raw, 1, 4), "", [{}], [1.0], 1, 4, None), copy.deepcopy(base))
    for i, x in enumerate(batches):
        engine.backward(engine(x[:, :-1], x[:, 1:])[1])
        if i < accum - 1:
            engine.step()  # not yet the accumulation boundary: no update
    err = sum((deepspeed.utils.safe_get_full_grad(p).double() - exact[n]).norm() ** 2
              for n, p in engine.module.named_parameters())
    engine.step()
    return float((err / sum(v.norm() ** 2 for v in exact.values())) ** 0.5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_configs_accumulate_gradients_in_fp32(world_of_one, stage):
    """The bundled bf16 configs sum the micro-batches' gradients in fp32: after 8 micro-batches the
    gradient equals the fp64 sum of the same bf16 micro-gradients to fp32 precision; DeepSpeed's
    default (accumulating in bf16) is off by 3e-3."""
    from mtgpt import ds_config

    raw = ds_config.find(f"zero{stage}_bf16")[1]
    assert raw["data_types"] == {"grad_accum_dtype": "fp32"} and raw["communication_data_type"] == "fp32"
    assert _accumulated_grad_error(raw, stage) < 1e-6
    default = {k: v for k, v in raw.items() if k not in ("data_types", "communication_data_type")}
    assert _accumulated_grad_error(default, stage) > 1e-3


def test_a_bf16_run_resumes_exactly(tiny_data, tmp_path, world_of_one):
    """zero1_bf16 (DeepSpeed's BF16_Optimizer, with its fp32 gradients): 2 steps, save, resume for
    2 more logs the losses of 4 straight steps."""
    args = dict(data=str(tiny_data), model=dict(TINY), micro_batch=2, grad_accum=2, eval_samples=4, log_every=1,
                eval_every=100, save_every=2, ds_config="zero1_bf16")
    _fit(TrainConfig(out=str(tmp_path / "straight"), max_steps=4, **args))
    _fit(TrainConfig(out=str(tmp_path / "resumed"), max_steps=2, **args))
    _fit(TrainConfig(out=str(tmp_path / "resumed"), max_steps=4, resume="auto", **args))
    losses = {k: [r["train/loss"] for r in metrics(tmp_path / k) if "train/loss" in r] for k in ("straight", "resumed")}
    assert len(losses["straight"]) == 4 and losses["resumed"] == losses["straight"]


def test_an_autocast_fp16_run_resumes_exactly(tiny_data, tmp_path, world_of_one, monkeypatch):
    """zero0_fp16 (torch autocast with PyTorch's GradScaler, whose state DeepSpeed does not save):
    mtgpt saves the loss scale with the run, so 3 steps, save, resume for 3 more log the losses and
    loss scales of 6 straight steps. (The scale starts at 2**18 here so that overflows move it.)"""
    import functools

    monkeypatch.setattr(torch.amp.GradScaler, "__init__",
                        functools.partialmethod(torch.amp.GradScaler.__init__, init_scale=2.0**18))
    args = dict(data=str(tiny_data), model=dict(TINY), micro_batch=2, eval_samples=4, log_every=1,
                eval_every=100, save_every=3, ds_config="zero0_fp16",
                warmup_steps=1, min_lr_ratio=1.0)  # a constant rate: the 3-step run's schedule is the 6-step one's
    _fit(TrainConfig(out=str(tmp_path / "straight"), max_steps=6, **args))
    _fit(TrainConfig(out=str(tmp_path / "resumed"), max_steps=3, **args))
    _fit(TrainConfig(out=str(tmp_path / "resumed"), max_steps=6, resume="auto", **args))
    logged = {k: [(r["train/loss"], r["fp16/loss_scale"], r["train/skipped_steps"]) for r in metrics(tmp_path / k)
                  if "train/loss" in r] for k in ("straight", "resumed")}
    assert len(logged["straight"]) == 6 and logged["resumed"] == logged["straight"]
    assert logged["straight"][2][1] < 2**18  # an overflow moved the scale before the save: something to carry over
    # every skipped step (an overflow) halved the scale, and the count carries over the resume
    scales = [2.0**18] + [scale for _, scale, _ in logged["straight"]]
    halved = [sum(b < a for a, b in zip(scales, scales[1:i + 2])) for i in range(6)]
    assert [skipped for _, _, skipped in logged["straight"]] == halved and halved[-1] > 0


def test_micro_batch_and_eval_cadence_are_chosen_for_the_device(tiny_data, tmp_path):
    """Left out, --micro-batch is 8 on a CPU; on a GPU the largest power of two up to 32,768 tokens
    per pass whose activations fit half its memory (the seed model: 64 on an 80 GB H100, where
    its throughput levels off). A DeepSpeed JSON's own number or the command line's wins.
    --eval-every is 200 on a CPU, 1000 on a GPU."""
    from mtgpt.model import training_bytes_per_token
    from mtgpt.train import GPU_TOKENS_PER_PASS, default_micro_batch, device_defaults, make_plan

    seed, GiB = ModelConfig(vocab_multiple=64), 2**30
    assert default_micro_batch(seed, "bf16", None) == 8
    assert [default_micro_batch(seed, "bf16", g * GiB) for g in (80, 24, 16, 8, 1)] == [64, 32, 32, 16, 2]
    assert default_micro_batch(seed, "fp32", 24 * GiB) == 16  # fp32 activations take twice the bytes
    for memory in (80 * GiB, 24 * GiB, 3 * GiB):  # the largest power of two that fits half the memory
        micro = default_micro_batch(seed, "bf16", memory)
        per_sequence = 512 * training_bytes_per_token(seed)
        assert micro * per_sequence <= memory / 2 and (2 * micro * per_sequence > memory / 2 or micro == 64)
    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), model=dict(TINY), max_steps=5,
                      ds_config="zero1_fp32")
    cpu, gpu = make_plan(cfg, 1, cuda=False).cfg, make_plan(cfg, 1, cuda=True, gpu_memory=80 * GiB).cfg
    assert (cpu.micro_batch, cpu.eval_every) == (8, 200)
    assert (gpu.micro_batch, gpu.eval_every) == (GPU_TOKENS_PER_PASS // TINY["block_size"], 1000)
    given = make_plan(cfg.replace(micro_batch=3, eval_every=7), 1, cuda=True, gpu_memory=80 * GiB).cfg
    assert (given.micro_batch, given.eval_every) == (3, 7)
    assert device_defaults(cfg, {"train_micro_batch_size_per_gpu": 12}, True, 80 * GiB).micro_batch == 12
    assert device_defaults(cfg, {"train_micro_batch_size_per_gpu": "auto"}, False, None).micro_batch == 8


def test_evaluation_runs_the_model_uncompiled_and_training_keeps_its_graphs():
    """`eager(engine)`: inside, the compiled model's calls run eagerly (no new graph for eval's
    shapes and modes); after, even after an error, the compiled call is back."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from mtgpt.train import eager

    model = GPT(ModelConfig(**TINY))
    model.compile()
    compiled = model._compiled_call_impl
    engine = SimpleNamespace(module=model)
    counters.clear()
    with eager(engine), torch.no_grad():
        model(torch.zeros(2, 8, dtype=torch.long))
    assert not counters["stats"]["calls_captured"] and model._compiled_call_impl is compiled
    with pytest.raises(RuntimeError):
        with eager(engine):
            raise RuntimeError("evaluation failed")
    assert model._compiled_call_impl is compiled


def test_best_weights_are_written_in_the_background():
    """BackgroundWrite: submit returns while the write runs; the next write and wait() wait for
    it; a failed write is raised by wait(), in the training thread."""
    import threading

    from mtgpt.train import BackgroundWrite

    writes, release, done = BackgroundWrite(), threading.Event(), []
    writes.submit(lambda: (release.wait(10), done.append(1)))
    assert done == []  # submit did not wait
    release.set()
    writes.submit(done.append, 2)  # waits for the first
    writes.wait()
    assert done == [1, 2]

    def fail():
        raise OSError("disk full")

    writes.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writes.wait()
    writes.wait()  # raised once


def test_bf16_steps_do_not_wait_for_an_overflow_check(world_of_one):
    """DeepSpeed's bf16 overflow check (a scan of every gradient read back by the host at each
    step of its ZeRO optimizer: zero2_bf16; zero1_bf16's fp32 accumulation runs on BF16_Optimizer,
    which has no such check to turn off) is off in the bundled bf16 JSONs and in a JSON of the
    user's that does not ask for it; a JSON that asks keeps it. Counted through the real engine."""
    stage = 2
    import copy

    from mtgpt import ds_config
    from mtgpt.train import Plan, build_engine, train_step

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    tc = TrainConfig(data="-", out="-", model=cfg, micro_batch=2, compile=False, max_steps=4)
    bundled = ds_config.find(f"zero{stage}_bf16")[1]
    users = {**{k: v for k, v in bundled.items() if k != "bf16"}, "bf16": {"enabled": True}}
    asks = {**users, "bf16": {"enabled": True, "check_grad_overflow": True}}
    checks = {}
    for name, raw in (("bundled", bundled), ("user's", users), ("asks", asks)):
        ds = ds_config.resolve(tc, copy.deepcopy(raw), 1, 4)
        engine = build_engine(Plan(tc, ds, "", [{}], [1.0], 1, 4, None), GPT(cfg))
        calls = []
        has_overflow = engine.optimizer.has_overflow
        engine.optimizer.has_overflow = lambda *a, **k: calls.append(1) or has_overflow(*a, **k)
        batches = iter([(torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16)))] * 2)
        for _ in range(2):
            train_step(engine, batches, 1)
        checks[name] = (ds["bf16"]["check_grad_overflow"], len(calls))
    assert checks == {"bundled": (False, 0), "user's": (False, 0), "asks": (True, 2)}


def _engine(name, model_cfg, accum=1, steps=20):
    """A DeepSpeed engine of a bundled config for a fresh seeded model, in this process."""
    from mtgpt import ds_config
    from mtgpt.train import Plan, build_engine

    raw = ds_config.find(name)[1]
    tc = TrainConfig(data="-", out="-", model=model_cfg, micro_batch=2, grad_accum=accum, lr=2e-3, compile=False,
                     max_steps=steps)
    torch.manual_seed(0)
    model = GPT(model_cfg)
    return build_engine(Plan(tc, ds_config.resolve(tc, raw, 1, steps), "", [{}], [1.0], 1, steps, None), model)


@pytest.mark.parametrize("accum", [1, 2])
def test_the_gpu_default_step_never_reads_a_value_back_to_the_host(world_of_one, accum):
    """zero0_bf16 and zero0_fp16 (torch_autocast, the GPU defaults) and zero0_fp32: a training step
    reads no tensor's value into Python (on a GPU each read is a host sync), counted with
    monitor.HostReads through the real engine. DeepSpeed's ZeRO 1-3 optimizers do read: the
    gradient norm's finiteness at every step (the count that shows HostReads sees DeepSpeed's reads)."""
    from mtgpt.monitor import HostReads
    from mtgpt.train import train_step

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    g = torch.Generator().manual_seed(0)
    data = iter([(x[:, :-1], x[:, 1:]) for x in torch.randint(0, 50257, (40, 2, 17), generator=g)])
    reads = {}
    for name in ("zero0_bf16", "zero0_fp16", "zero0_fp32", "zero1_bf16", "zero2_bf16"):
        engine = _engine(name, cfg, accum)
        train_step(engine, data, accum)  # first step: lazy state out of the count
        with HostReads() as seen:
            for _ in range(3):
                train_step(engine, data, accum)
        reads[name] = seen
    assert [reads[n].total for n in ("zero0_bf16", "zero0_fp16", "zero0_fp32")] == [0, 0, 0], {
        n: dict(r.reads) for n, r in reads.items()}
    for name in ("zero1_bf16", "zero2_bf16"):
        assert reads[name].total >= 3 and all("deepspeed/runtime" in k for k in reads[name].reads), dict(reads[name].reads)


def test_zero0_autocast_is_the_plain_pytorch_mixed_precision_step(world_of_one):
    """zero0_bf16 trains as the plain loop does (fp32 weights, torch.autocast bf16, clip_grad_norm_,
    PyTorch's fused AdamW on the parameters, no DeepSpeed optimizer wrapper), with gradients
    all-reduced in fp32: from the same weights and batches, the weights and losses are bit for bit
    the plain loop's at every step (DeepSpeed's own clipping summed the norm in another order, and
    the rounding difference grew through AdamW from step three). zero1_bf16's bf16 weights differ
    at step one."""
    from deepspeed.runtime.torch_autocast import get_comm_dtype

    from mtgpt.train import train_step

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)
    engine = _engine("zero0_bf16", cfg)
    torch.manual_seed(0)
    plain = GPT(cfg)
    plain.fused_loss = engine.module.fused_loss  # the same loss (on CPU fused: mtgpt.train.fused_loss)
    assert type(engine.optimizer) is torch.optim.AdamW and engine.optimizer.defaults["fused"]
    assert all(p.dtype == torch.float32 and get_comm_dtype(p) == torch.float32 for p in engine.module.parameters())
    assert engine.enable_backward_allreduce is False  # one rank: DeepSpeed's all-reduce (copies) skipped
    opt = torch.optim.AdamW(plain.param_groups(0.1), lr=2e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50257, (2, 33), generator=g) for _ in range(10)]
    it = iter([(x[:, :-1], x[:, 1:]) for x in batches])
    losses, same_weights = [], []
    for x in batches:
        for group in opt.param_groups:
            group["lr"] = engine.get_lr()[0]
        ours = float(train_step(engine, it, 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = plain(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(abs(ours - loss.item()))
        same_weights.append(all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), plain.parameters())))
    assert all(same_weights) and losses == [0.0] * len(batches), (losses, same_weights)
    assert _engine("zero1_bf16", cfg).enable_backward_allreduce  # ZeRO-1's reduce fills its own buffers


def test_an_autocast_engine_leaves_the_next_engine_its_own_precision(world_of_one):
    """DeepSpeed keeps "autocast is on" in module globals; mtgpt resets them per engine, so a
    zero2_bf16 engine built after a zero0_fp16 one still reduces in fp32 and has no GradScaler."""
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    _engine("zero0_fp16", cfg)
    after = _engine("zero2_bf16", cfg)
    assert set(after.optimizer.ipg_buckets) == {torch.float32}
    assert after.optimizer.torch_autocast_gradscaler is None


def test_a_resumed_run_keeps_its_deepspeed_config_and_a_weights_change_is_refused(tiny_data, tmp_path,
                                                                                    world_of_one):
    """Without --ds-config a resume uses the run's own JSON (not today's default); one whose
    parameters have another dtype (DeepSpeed's bf16 optimizer vs fp32/autocast weights) is refused
    with the fix; fp32 and autocast share the layout, so an fp32 run continues in zero0_bf16.
    zero0_bf16's model.safetensors is its fp32 weights, as saved in the checkpoint."""
    from safetensors.torch import load_file

    from mtgpt.config import ConfigError
    from mtgpt.train import make_plan

    run = tmp_path / "run"
    args = dict(data=str(tiny_data), out=str(run), model=dict(TINY), micro_batch=2, lr=3e-3, log_every=1,
                eval_every=100, save_every=2)
    _fit(TrainConfig(**args, max_steps=2, ds_config="zero0_fp32"))
    resumed = make_plan(TrainConfig(**args, max_steps=4, resume="auto"), 1, cuda=False)
    assert "zero0_fp32" in resumed.ds_name  # not the CPU default, zero1_fp32
    with pytest.raises(ConfigError, match=r"fp32 weights .*zero1_bf16 trains bf16 weights.*--ds-config (\S+)"):
        make_plan(TrainConfig(**args, max_steps=2, resume="auto", ds_config="zero1_bf16"), 1, cuda=False)
    fix = make_plan(TrainConfig(**args, max_steps=2, resume="auto", ds_config=str(run / "ds_config.json")), 1, cuda=False)
    assert fix.ds["zero_optimization"]["stage"] == 0  # the fix the message gives is accepted
    _fit(TrainConfig(**args, max_steps=4, resume="auto", ds_config="zero0_bf16"))
    losses = [r["train/loss"] for r in metrics(run) if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    exported = load_file(run / "model.safetensors")
    saved = torch.load(run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(exported[k], saved[k]) for k in exported)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert any((v != v.bfloat16().float()).any() for v in exported.values())  # fp32 values, not bf16 upcast



def test_every_zero_stage_logs_the_same_grad_norm(tiny_data, tmp_path, world_of_one):
    """train/grad_norm at ZeRO-0 (DeepSpeed drops the norm it clips with; mtgpt keeps it) equals
    ZeRO-1's, step by step, in fp32 and in zero0_bf16 (autocast: fp32 gradients)."""
    norms = {}
    for name in ("zero1_fp32", "zero0_fp32", "zero0_bf16"):
        cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / name), model=dict(TINY), micro_batch=2, max_steps=3,
                          log_every=1, eval_every=100, eval_samples=4, ds_config=name)
        _fit(cfg)
        norms[name] = [r["train/grad_norm"] for r in metrics(tmp_path / name) if "train/loss" in r]
    assert len(norms["zero0_fp32"]) == 3 and norms["zero0_fp32"] == pytest.approx(norms["zero1_fp32"], rel=1e-5)
    assert norms["zero0_bf16"] == pytest.approx(norms["zero1_fp32"], rel=0.05)


def test_a_resumed_run_trains_with_the_deepspeed_json_it_started_with(tiny_data, tmp_path, world_of_one,
                                                                       monkeypatch):
    """A resume read the JSON as it is on disk now: an edited --ds-config file changed the run
    silently, a deleted one blocked it, and a ./ds_configs/ of the current directory replaced the
    bundled one it named. It now goes on with its own ds_config.json, which `--ds-config
    RUN/ds_config.json` also gives (with another schedule length: was refused)."""
    from mtgpt import ds_config
    from mtgpt.train import make_plan

    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "my.json"
    _, raw = ds_config.find("zero0_fp32")
    mine.write_text(json.dumps({**raw, "gradient_clipping": 0.5}))
    args = dict(data=str(tiny_data), model=dict(TINY), micro_batch=2, log_every=1, eval_every=100, save_every=2)
    _fit(TrainConfig(**args, out="run", max_steps=2, ds_config=str(mine)))
    mine.write_text(json.dumps({**raw, "gradient_clipping": 3.0}))
    resumed = make_plan(TrainConfig(**args, out="run", max_steps=4, resume="auto"), 1)
    assert resumed.ds["gradient_clipping"] == 0.5 and resumed.ds_name == str(mine)
    # --ds-config given again, even the same file: that file as it is now (it was the run's copy, silently)
    given = make_plan(TrainConfig(**args, out="run", max_steps=4, resume="auto", ds_config=str(mine)), 1,
                      ds_config_given=True)
    assert given.ds["gradient_clipping"] == 3.0
    from mtgpt.train import banner  # (it named the file alone, edited since or gone, as the one in use)
    assert f"{mine} as the run saved it (its ds_config.json): ZeRO-0" in banner(resumed, 2)
    assert f"{mine}: ZeRO-0" in banner(given, 2)
    from mtgpt import cli

    options = cli.train.make_context("train", ["--out", "run", "--resume", "auto", "--ds-config", str(mine)]).params
    options.pop("nproc")
    assert cli.build_config(options).ds_config == str(mine)  # what the front end and every rank plan with
    mine.unlink()
    _fit(TrainConfig(**args, out="run", max_steps=4, resume="auto"))
    assert json.loads((tmp_path / "run" / "ds_config.json").read_text())["gradient_clipping"] == 0.5
    again = make_plan(TrainConfig(**args, out="run", max_steps=9, resume="auto", ds_config="run/ds_config.json"), 1)
    assert again.ds["scheduler"]["params"]["total_num_steps"] == 9 and again.ds["gradient_clipping"] == 0.5

    _fit(TrainConfig(**args, out="named", max_steps=2, ds_config="ds_configs/zero0_fp32.json"))  # the bundled one
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero0_fp32.json").write_text(json.dumps({**raw, "gradient_clipping": 0.01}))
    assert make_plan(TrainConfig(**args, out="named", max_steps=4, resume="auto"), 1).ds["gradient_clipping"] == 1.0


def test_deepspeeds_memory_reports_stay_out_of_the_output(world_of_one, capfd):
    """DeepSpeed's bf16 optimizer print()s memory reports while it initializes ("begin
    bf16_optimizer", "MA 0.37 GB Max_MA ...", "CPU Virtual Memory: ..."; about 20 lines before
    mtgpt's banner in every zero1_bf16 run, make demo's included): kept out."""
    _engine("zero1_bf16", ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    out = capfd.readouterr().out
    assert "bf16_optimizer" not in out and "Max_MA" not in out and "CPU Virtual Memory" not in out, out


def test_a_relative_data_path_an_older_mtgpt_recorded_is_named_as_such(tmp_path, monkeypatch):
    """A run of an older mtgpt recorded --data relative: resumed from another folder, the error
    said "no such folder; create it with mtgpt prepare ... --out A_data", though nothing moved."""
    from mtgpt.data import DataError
    from mtgpt.train import make_plan

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(data="A_data", out=str(tmp_path / "run"), model=dict(TINY), resume="auto")
    with pytest.raises(DataError, match=r"give --data NEW_PATH: a resumed run takes it \(A_data: a relative path, as "
                                        r"an older mtgpt recorded it, is looked for from this folder"):
        make_plan(cfg, world_size=1, cuda=False)


def test_bf16_on_a_cpu_without_its_instructions_is_warned(tiny_data, tmp_path, monkeypatch):
    """On an AVX2-only CPU PyTorch emulates bf16 matmuls: `make demo` (zero1_bf16) ran at 214
    tokens/s where zero1_fp32 runs 4,300, and nothing said why. The probe (oneDNN's) is this
    machine's answer; here it is set both ways to check the rule."""
    from mtgpt import world
    from mtgpt.train import make_plan, plan_warnings

    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), model=dict(TINY), micro_batch=2, max_steps=5)
    says = "trains in bf16, which this CPU has no instructions for (no AVX-512)"
    found = {}
    for fast, ds in ((False, "zero1_bf16"), (True, "zero1_bf16"), (False, "zero1_fp32")):
        monkeypatch.setattr(world, "cpu_bf16_fast", lambda: fast)
        found[fast, ds] = [w for w in plan_warnings(make_plan(cfg.replace(ds_config=ds), 1, cuda=False)) if says in w]
    assert found[True, "zero1_bf16"] == found[False, "zero1_fp32"] == []
    [warning] = found[False, "zero1_bf16"]
    assert warning.startswith("warning: zero1_bf16 trains in bf16") and "--ds-config zero1_fp32 (the CPU default)" in warning
