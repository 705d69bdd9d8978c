"""rundir.py in process: may a run write here, where does it resume from, what it records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtgpt import checkpoint, rundir
from mtgpt.config import ConfigError, ModelConfig, TrainConfig
from tests.conftest import TINY


def _cfg(out, **kw) -> TrainConfig:
    return TrainConfig(data="d", out=str(out), model=dict(TINY), **kw)


def _complete(run, step, world_size=1):
    folder = run / checkpoint.CKPT_DIR / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    checkpoint.mark_complete(run, folder.name, {"step": step, "world_size": world_size}, keep_last=5)
    return folder


def test_fresh_and_refused(tmp_path):
    assert rundir.resume_point(_cfg(tmp_path / "new")) is None
    assert rundir.resume_point(_cfg(tmp_path / "new", resume="auto")) is None  # nothing to resume: fresh
    run = tmp_path / "run"
    _complete(run, 5)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume auto"):
        rundir.resume_point(_cfg(run))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        rundir.resume_point(_cfg(tmp_path / "file"))
    with pytest.raises(ConfigError, match="--out is required"):
        rundir.resume_point(TrainConfig(data="d"))


def test_where_a_run_resumes_from(tmp_path):
    run = tmp_path / "run"
    five, ten = _complete(run, 5), _complete(run, 10)
    assert rundir.resume_point(_cfg(run, resume="auto")) == ten
    assert rundir.resume_point(_cfg(tmp_path / "other", resume=str(run))) == ten  # a run folder
    assert rundir.resume_point(_cfg(run, resume=str(five))) == five  # one checkpoint
    torn = run / checkpoint.CKPT_DIR / checkpoint.tag_for(15)
    torn.mkdir()
    with pytest.raises(ConfigError, match="incomplete"):
        rundir.resume_point(_cfg(run, resume=str(torn)))
    with pytest.raises(ConfigError, match="not a run folder or checkpoint folder"):
        rundir.resume_point(_cfg(run, resume=str(tmp_path)))


def test_resume_with_another_shape_is_refused(tmp_path):
    run = tmp_path / "run"
    _complete(run, 5)
    (run / rundir.TRAIN_CONFIG).write_text(json.dumps(_cfg(run).to_dict()))
    with pytest.raises(ConfigError, match="n_layer 2 -> 3"):
        rundir.resume_point(_cfg(run, resume="auto").replace(model={"n_layer": 3}))


def test_run_files(tmp_path, monkeypatch):
    monkeypatch.setenv(rundir.COMMAND_ENV, "mtgpt train --data d")
    cfg = _cfg(tmp_path / "run")
    rundir.write_run_files(cfg.out, cfg.to_dict(), {"train_batch_size": 8}, "zero1_fp32", 2, 0, None)
    info = json.loads((tmp_path / "run" / rundir.RUN_INFO).read_text())
    assert info["command"] == "mtgpt train --data d" and info["world_size"] == 2 and info["val_samples"] == 0
    assert info["versions"]["torch"] and info["ds_config"] == "zero1_fp32"
    assert TrainConfig.from_dict(json.loads((tmp_path / "run" / rundir.TRAIN_CONFIG).read_text())) == cfg
    assert rundir.has_run(tmp_path / "run") and not checkpoint.has_val(tmp_path / "run")
    rundir.write_last_stop(tmp_path / "run", reason="max_steps", step=3)
    assert json.loads((tmp_path / "run" / rundir.LAST_STOP).read_text())["reason"] == "max_steps"
    assert "earlier_starts" not in info
    # a resume's record keeps the starts before it (it replaced the first command, time and commit)
    for n in (1, 2):
        monkeypatch.setenv(rundir.COMMAND_ENV, f"mtgpt train --out run --resume auto # {n}")
        rundir.write_run_files(cfg.out, cfg.to_dict(), {}, "zero1_fp32", 1, 0, tmp_path / "run" / "checkpoints" / "x")
    info = json.loads((tmp_path / "run" / rundir.RUN_INFO).read_text())
    assert info["command"].endswith("# 2") and info["world_size"] == 1
    assert [(e["command"], e["world_size"]) for e in info["earlier_starts"]] == [
        ("mtgpt train --data d", 2), ("mtgpt train --out run --resume auto # 1", 1)]


def test_out_is_a_new_folder_or_a_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rundir.resume_point(_cfg(empty)) is None
    (tmp_path / "slurm" / "logs").mkdir(parents=True)  # slurm/train.sbatch makes RUN/logs first
    assert rundir.resume_point(_cfg(tmp_path / "slurm")) is None
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a data folder"):
        rundir.resume_point(_cfg(data))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"is not empty \(notes.txt\) and holds no mtgpt run"):
        rundir.resume_point(_cfg(mine, resume="auto"))
    run = tmp_path / "run"
    _complete(run, 5)
    for inside in (run / checkpoint.CKPT_DIR, run / "best"):
        with pytest.raises(ConfigError, match="is inside the run"):
            rundir.resume_point(_cfg(inside))
    # best/ and an export hold a model.safetensors, which is not a run: a new run went into them
    # (the error said "already holds a run; pass --resume auto", which then trained over the weights)
    hf = tmp_path / "hf"
    for model in (run / "best", hf):
        model.mkdir()
        (model / checkpoint.WEIGHTS).write_bytes(b"weights")
    (run / "best" / "config.json").write_text("{}")
    (hf / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    for resume in ("never", "auto"):
        with pytest.raises(ConfigError, match=f"--out {run / 'best'} is inside the run {run.resolve()}; give the run"):
            rundir.resume_point(_cfg(run / "best", resume=resume))
        with pytest.raises(ConfigError, match=f"--out {hf} is a Hugging Face model folder .*; the run needs a folder "
                                              "of its own"):
            rundir.resume_point(_cfg(hf, resume=resume))
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", checkpoint.WEIGHTS]
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in data.iterdir()) == ["manifest.json"]


def test_resumed_settings_are_the_runs_less_what_is_given(tmp_path):
    run = tmp_path / "run"
    _complete(run, 5)
    saved = _cfg(run, lr=3e-3, seed=7, warmup_steps=2, max_steps=20, max_time="1h", micro_batch=4, grad_accum=2,
                 batch_size=8, ds_config="zero2_bf16").to_dict()
    saved["model"]["vocab_multiple"] = 64
    (run / rundir.TRAIN_CONFIG).write_text(json.dumps(saved))
    assert rundir.resumed_settings("never", str(run), set()) is None
    assert rundir.resumed_settings("auto", str(tmp_path / "new"), set()) is None  # nothing to resume
    kept = rundir.resumed_settings("auto", str(run), {"out", "resume"})
    assert kept["lr"] == 3e-3 and kept["seed"] == 7 and kept["model"] == saved["model"]
    assert kept["max_steps"] == 20 and kept["max_time"] == "1h" and "grad_accum" not in kept  # derived anew
    given = rundir.resumed_settings(str(run), str(tmp_path / "elsewhere"), {"lr", "max_tokens"})
    assert "lr" not in given and given["seed"] == 7
    assert not {"max_steps", "max_tokens"} & set(given)  # a new length replaces the run's (all three limits)
    assert given["max_time"] == "1h"  # (--max-time plans no schedule: only one given replaces it)
    # following "give a larger --max-time" dropped --max-steps, and the schedule shrank to one epoch
    assert rundir.resumed_settings("auto", str(run), {"out", "resume", "max_time"})["max_steps"] == 20
    assert (kept["ds_config"], kept["batch_size"], kept["model"]["vocab_multiple"]) == ("zero2_bf16", 8, 64)
    # a run of an older mtgpt: its DeepSpeed config from run_info.json, its batch from micro x accum x
    # ranks, no vocabulary padding (its checkpoints hold exactly vocab_size rows)
    old = {**saved, "ds_config": None, "batch_size": None, "model": {k: v for k, v in saved["model"].items()
                                                                    if k != "vocab_multiple"}}
    (run / rundir.TRAIN_CONFIG).write_text(json.dumps(old))
    (run / rundir.RUN_INFO).write_text(json.dumps({"world_size": 3, "ds_config": "ds_configs/zero1_fp32.json"}))
    kept = rundir.resumed_settings("auto", str(run), {"out", "resume"})
    assert (kept["ds_config"], kept["batch_size"], kept["model"]["vocab_multiple"]) == ("ds_configs/zero1_fp32.json",
                                                                                        24, 1)


def test_a_checkpoint_resumed_from_another_directory_goes_on_in_its_own_run(tmp_path, monkeypatch):
    """A run trained with a relative --out (runs/x) and resumed by the path of its checkpoint from
    another directory, without --out, goes on in runs/x where it lives (was: a new runs/x in the
    current directory, the run's history split in two). step_4 names checkpoint step_00000004."""
    run = tmp_path / "A" / "runs" / "x"
    four = _complete(run, 4)
    (run / rundir.TRAIN_CONFIG).write_text(json.dumps({**_cfg("runs/x").to_dict(), "out": "runs/x"}))
    (tmp_path / "B").mkdir()
    monkeypatch.chdir(tmp_path / "B")
    for resume in (four, run, four.parent / "step_4", four.parent / "step4"):
        kept = rundir.resumed_settings(str(resume), None, {"resume", "max_steps"})
        assert Path(kept["out"]).resolve() == run.resolve(), resume
        assert rundir.resume_point(_cfg(kept["out"], resume=str(resume))) == four
    assert "out" not in rundir.resumed_settings(str(four), "runs/y", {"resume", "out"})  # --out given: a branch
    with pytest.raises(ConfigError, match=r"step_9: not a run folder or checkpoint folder \(.*checkpoints holds "
                                          r"step_00000004\); use --resume auto"):
        rundir.resume_point(_cfg(run, resume=str(four.parent / "step_9")))


def test_another_runs_checkpoint_is_not_resumed_into_a_run(tmp_path):
    """--out C --resume K/checkpoints/TAG would cut C's history and mix K's into it: refused, with
    nothing changed; into a new --out it starts a branch from K's checkpoint. A save kept one level
    down (checkpoints/abandoned-.../TAG, after going back) still belongs to its run."""
    c, k = tmp_path / "c", tmp_path / "k"
    _complete(c, 5)
    (c / rundir.TRAIN_CONFIG).write_text(json.dumps(_cfg(c, lr=1e-3).to_dict()))
    saved = _complete(k, 7)
    (k / rundir.TRAIN_CONFIG).write_text(json.dumps(_cfg(k, lr=2e-3).to_dict()))
    before = sorted(p.relative_to(c) for p in c.rglob("*"))
    for resume in (str(saved), str(k)):
        with pytest.raises(ConfigError, match=rf"is a checkpoint of the run {k}, and --out {c} holds another run"):
            rundir.resume_point(_cfg(c, resume=resume))
    assert sorted(p.relative_to(c) for p in c.rglob("*")) == before
    assert rundir.resume_point(_cfg(tmp_path / "branch", resume=str(saved))) == saved
    assert rundir.resume_point(_cfg(c, resume=str(c / checkpoint.CKPT_DIR / checkpoint.tag_for(5)))) is not None
    aside = k / checkpoint.CKPT_DIR / "abandoned-1" / checkpoint.tag_for(9)
    aside.mkdir(parents=True)
    (aside / checkpoint.COMPLETE).write_text("{}")
    assert rundir.run_of(aside) == k and rundir.resumed_settings(str(aside), str(k), set())["lr"] == 2e-3
    # resumed into its own run, a set-aside save mixed two branches: the run's saves and logs of the
    # branch it took, then the left branch's from this step on; it goes on as a run of its own
    with pytest.raises(ConfigError, match=rf"is a save set aside from a branch the run {k} left .* mtgpt train --out "
                                          rf"NEW_RUN --resume {aside} \(nothing was changed\)"):
        rundir.resume_point(_cfg(k, resume=str(aside)))
    assert rundir.resume_point(_cfg(tmp_path / "branch2", resume=str(aside))) == aside
    from mtgpt.info import describe_checkpoint

    assert describe_checkpoint(aside)[0].endswith(f"resume from it: mtgpt train --out NEW_RUN --resume {aside}")
    assert describe_checkpoint(saved)[0].endswith(f"resume from it: mtgpt train --resume {saved}")
    # DeepSpeed's universal form (written for a resume on another number of ranks) is its checkpoint's:
    # info offered it as a resume point, and that resume was a DeepSpeed traceback (it loads only as universal)
    universal = k / checkpoint.CKPT_DIR / "universal" / saved.name
    universal.mkdir(parents=True)
    (universal / checkpoint.COMPLETE).write_text("{}")
    assert rundir.resume_point(_cfg(tmp_path / "branch3", resume=str(universal))) == saved
    assert describe_checkpoint(universal) == [f"{universal} is DeepSpeed's universal form of the checkpoint {saved}, "
                                              "written to resume it on another number of ranks; resume from that "
                                              f"one: mtgpt train --resume {saved}"]
    gone = universal.parent / checkpoint.tag_for(3)
    gone.mkdir()
    (gone / checkpoint.COMPLETE).write_text("{}")
    with pytest.raises(ConfigError, match="is DeepSpeed's universal form of the checkpoint .*, which is gone"):
        rundir.resume_point(_cfg(tmp_path / "branch4", resume=str(gone)))


def test_a_resume_under_another_optimizer_layout_is_refused_with_a_fix_that_works(tmp_path):
    """Another weight dtype, or ZeRO 0 / 1-2 / 3 (each lays its checkpoint out otherwise), is one
    line naming the run's own config (what a resume without --ds-config keeps); 1 <-> 2 resumes."""
    from mtgpt import ds_config

    run = tmp_path / "run"
    found = _complete(run, 5)
    (run / rundir.DS_CONFIG).write_text(json.dumps(ds_config.find("zero1_fp32")[1]))
    (run / rundir.TRAIN_CONFIG).write_text(json.dumps(_cfg(run).to_dict()))  # (ds_config null: older runs')
    (run / rundir.RUN_INFO).write_text(json.dumps({"world_size": 1, "ds_config": "ds_configs/zero1_fp32.json"}))
    for ok in ("zero1_fp32", "zero2_fp32"):
        rundir.check_resumable_ds(found, ds_config.find(ok)[1], ok)
    def fix(other):  # (it said `--init-from RUN --out NEW`, which then asked for --data)
        return f"resume without --ds-config (the run keeps its own, ds_configs/zero1_fp32.json), or start a new " \
               f"run from its weights: mtgpt train --init-from {run} --data d --ds-config {other} --out NEW"
    with pytest.raises(ConfigError, match=r"trained with fp32 weights .* zero2_bf16 trains bf16 weights") as e:
        rundir.check_resumable_ds(found, ds_config.find("zero2_bf16")[1], "zero2_bf16")
    assert str(e.value).endswith(fix("zero2_bf16"))
    for other, stage in (("zero3_fp32", 3), ("zero0_fp32", 0)):
        with pytest.raises(ConfigError, match=rf"saved at ZeRO stage 1 and {other} is stage {stage}") as e:
            rundir.check_resumable_ds(found, ds_config.find(other)[1], other)
        assert str(e.value).endswith(fix(other))


def test_a_run_folder_another_mtgpt_trains_in_is_refused(tmp_path, tiny_data):
    """Two trainings in one run folder (a run started twice, a requeued job while the old one
    lives) both trained on, each pruning the other's checkpoints: rank 0 now holds a lock on the
    folder while it trains, and a second `mtgpt train` there is refused before any rank starts."""
    from tests.conftest import TINY_ARGS, run_mtgpt

    run = tmp_path / "run"
    rundir.lock_run(run)  # as rank 0 of a training does
    try:
        with pytest.raises(ConfigError, match=r"run is being trained by another mtgpt \(PID \d+ on .+ since "):
            rundir.lock_run(run, hold=False)
        proc = run_mtgpt("train", "--data", tiny_data, "--out", run, *TINY_ARGS, "--max-steps", "2", check=False)
        assert proc.returncode == 1 and "is being trained by another mtgpt" in proc.stderr, proc.stderr
        assert [p.name for p in run.iterdir()] == [rundir.LOCK]
    finally:
        rundir._held.pop().close()  # the training stops (or dies): the lock is free
    rundir.lock_run(run, hold=False)
    rundir.check_out_folder(run)  # a folder holding only a lock file takes a new run
    # the ranks of one job check at once: checks never refuse each other (an exclusive try each did,
    # and a 2-rank resume failed "being trained by another mtgpt" naming the killed run before it)
    import threading

    refused, held = [], threading.Event()

    def check() -> None:
        for _ in range(3000):
            try:
                rundir.lock_run(run, hold=False)
            except ConfigError as e:
                if not held.is_set():  # (while rank 0 holds it, a check is right to refuse)
                    refused.append(e)

    threads = [threading.Thread(target=check) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not refused, f"{len(refused)} of 9000 checks refused: {refused[0]}"
    threads = [threading.Thread(target=check) for _ in range(3)]
    for t in threads:
        t.start()
    held.set()
    rundir.lock_run(run)  # rank 0 takes it while checks are in flight (it waits one out, not refused)
    rundir._held.pop().close()
    for t in threads:
        t.join()
    # `mtgpt info` of a run on a read-only mount (docker/README: -v runs:/runs:ro) only reads the lock
    import os
    import subprocess

    view = tmp_path / "ro"
    view.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(run), str(view)]).returncode:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("cannot bind-mount under CI (needs root)")
        return
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        assert rundir.training_now(view) is None  # (opening it to append raised "Read-only file system")
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_git_commit_is_mtgpts_own_checkouts_only(tmp_path):
    """run_info.json's git_commit: the checkout's HEAD when mtgpt runs from one; none for mtgpt
    installed into a virtualenv inside the user's own git project (its HEAD was recorded)."""
    import subprocess

    repo = Path(rundir.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert rundir.git_commit() == (head.stdout.strip() if head.returncode == 0 else None)
    project = tmp_path / "project"
    installed = project / ".venv" / "lib" / "site-packages" / "mtgpt"
    installed.mkdir(parents=True)
    git = ["git", "-C", str(project), "-c", "user.email=u@example.org", "-c", "user.name=u"]
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "theirs"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    assert rundir.git_commit(installed) is None


def test_a_run_whose_checkpoints_were_deleted_is_not_started_over(tmp_path):
    """checkpoints/ deleted to free space, model.safetensors kept: `--resume auto --data D` started
    a fresh run of the default shape over it (model, best/ and logs replaced), and without --data
    the error asked for --data. Both now say what is there and how to go on from its weights."""
    from mtgpt import cli
    from mtgpt.model import GPT

    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.TRAIN_CONFIG).write_text(json.dumps(_cfg(run).to_dict()))
    model = GPT(ModelConfig(**TINY))
    checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, run,
                            metadata={"step": "300"})
    said = (rf"{run} holds a trained run \(model.safetensors of step 300\) but no complete checkpoint to continue "
            rf"from .* mtgpt train --init-from {run} --data DATA --out NEW_RUN \(nothing was changed\)")
    with pytest.raises(ConfigError, match=said):
        rundir.resume_point(_cfg(run, resume="auto"))
    options = {k: None for k in ("data", "resume", "out")} | {"out": str(run), "resume": "auto"}
    with pytest.raises(ConfigError, match=said):
        cli.build_config(options)


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path):
    """Rank 0's lock in a run folder it cannot write (a read-only mount; here: under a file, as root
    ignores permissions) was an OSError traceback in every rank."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot write in the run folder .*file/run \(Not a directory\): a run "
                                          r"trains only where it can save; .* --out NEW_RUN"):
        rundir.lock_run(tmp_path / "file" / "run")


def test_a_train_config_edited_to_another_shape_is_refused_in_one_line(tmp_path):
    """train_config.json edited by hand to another width: the resume got past every check and
    DeepSpeed's load printed 65 lines of size mismatches in every rank."""
    from mtgpt.model import GPT

    run = tmp_path / "run"
    _complete(run, 4)
    model = GPT(ModelConfig(**TINY))
    checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, run)
    edited = TrainConfig(data="d", out=str(run), model={**TINY, "n_embd": 2 * TINY["n_embd"]})
    (run / rundir.TRAIN_CONFIG).write_text(json.dumps(edited.to_dict()))
    with pytest.raises(ConfigError, match=rf"gives another model shape \(n_embd {TINY['n_embd']} -> "
                                          rf"{2 * TINY['n_embd']}\) than its weights .* restore train_config.json"):
        rundir.resume_point(edited.replace(resume="auto"))
    (run / rundir.TRAIN_CONFIG).write_text(json.dumps(_cfg(run).to_dict()))
    assert rundir.resume_point(_cfg(run, resume="auto")) == run / "checkpoints" / checkpoint.tag_for(4)


def test_an_out_whose_name_is_not_utf8_is_refused_before_anything_is_written(tmp_path):
    """A run folder named with a Latin-1 byte: TensorBoard's writer failed (UnicodeEncodeError)
    after train_config.json, tb/ and the lock were written, and the next try said "holds a run"."""
    import os

    out = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9"))
    with pytest.raises(ConfigError, match="a name that is not UTF-8 text"):
        rundir.check_out_folder(out)
    assert not list(tmp_path.iterdir())


def test_an_out_through_a_missing_folder_and_dotdot_is_the_run_it_names(tmp_path, monkeypatch):
    """--out runs/nope/../x, where runs/x holds a run: the checks looked at the missing runs/nope
    and let a fresh run be trained over runs/x (checkpoints, logs replaced). It is runs/x."""
    run = tmp_path / "runs" / "x"
    _complete(run, 5)
    cfg = _cfg(tmp_path / "runs" / "nope" / ".." / "x")
    assert cfg.out == str(run)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume auto"):
        rundir.resume_point(cfg)
    assert not (tmp_path / "runs" / "nope").exists()
    assert TrainConfig(data="d", out="a/b/../c", resume="a/b/../c/checkpoints/step_5").resume == "a/c/checkpoints/step_5"


def test_recorded_paths_are_absolute_whatever_the_directory(tmp_path, monkeypatch):
    """A resume by the step_N shorthand from another directory recorded "resume":
    "../run/checkpoints/step_10", "out": "/B/../run" and "resumed_from" relative: `--config
    RUN/train_config.json` from elsewhere then failed to find them."""
    run = tmp_path / "run"
    four = _complete(run, 4)
    (tmp_path / "B").mkdir()
    monkeypatch.chdir(tmp_path / "B")
    cfg = _cfg("../run", resume="../run/checkpoints/step_4")
    found = rundir.resume_point(cfg)
    rundir.write_run_files(cfg.out, cfg.to_dict(), {}, "zero1_fp32", 1, 0, found)
    saved = json.loads((run / rundir.TRAIN_CONFIG).read_text())
    assert saved["out"] == str(run) and saved["resume"] == str(four.parent / "step_4")
    assert json.loads((run / rundir.RUN_INFO).read_text())["resumed_from"] == str(four)
    monkeypatch.chdir(tmp_path)
    assert rundir.resume_point(TrainConfig.from_dict(saved)) == four


def test_the_config_file_of_a_moved_or_copied_run_names_the_run_to_continue(tmp_path, monkeypatch):
    """`--config MOVED/train_config.json --resume auto` started a new run at the run's old path
    (its recorded --out), and a copy's continued the original: both are refused with the commands
    for either meaning. Its own run, or with --out given, it is taken as before."""
    from mtgpt import cli

    old, moved = tmp_path / "run", tmp_path / "moved"
    _complete(old, 4)
    (old / rundir.TRAIN_CONFIG).write_text(json.dumps({**_cfg(old).to_dict(), "resume": "auto"}))
    options = lambda **kw: {"config_file": str(kw.pop("config")), **{k: None for k in ("data", "resume", "out")},  # noqa: E731
                            **kw}
    assert cli.build_config(options(config=old / rundir.TRAIN_CONFIG)).out == str(old)  # its own run: taken
    old.rename(moved)
    with pytest.raises(ConfigError, match=rf"{moved}/train_config.json holds the settings of the run in {moved}, but "
                                          rf"names --out {old} \(the run was moved or copied since\): to continue this "
                                          rf"run, mtgpt train --out {moved} --resume auto; .* add --out NEW_RUN"):
        cli.build_config(options(config=moved / rundir.TRAIN_CONFIG))
    assert not old.exists()
    given = cli.build_config(options(config=moved / rundir.TRAIN_CONFIG, out=str(tmp_path / "new")))
    assert given.out == str(tmp_path / "new")  # --out given: a new run with its settings
