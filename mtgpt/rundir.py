"""The run folder: may we write here, where do we resume from, and what we record about a run.

Files written at each start (rank 0): train_config.json (the resolved mtgpt config),
ds_config.json (the DeepSpeed dict actually used), run_info.json (command line, git commit,
library versions, world size). See mtgpt.checkpoint for the rest of the folder.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from mtgpt import __version__, checkpoint, folders
from mtgpt.config import ConfigError, ModelConfig, TrainConfig, dump_json, load_json

TRAIN_CONFIG = folders.TRAIN_CONFIG
DS_CONFIG = folders.DS_CONFIG
RUN_INFO = checkpoint.RUN_INFO
LAST_STOP = "last_stop.json"  # rank 0, at the end of fit: why and where the run stopped (removed at its start)
COMMAND_ENV = "MTGPT_COMMAND"  # the user's command line, passed by `mtgpt train` to its ranks
LOCK = ".mtgpt.lock"  # held (flock) by rank 0 of the run training in the folder: "PID on HOST since TIME"
_held: list[Any] = []  # the lock files this process holds, open until it exits


def has_run(out: str | Path) -> bool:
    out = Path(out)
    return out.is_dir() and any((out / name).exists() for name in
                                (TRAIN_CONFIG, checkpoint.CKPT_DIR, checkpoint.WEIGHTS))


def check_something_to_resume(out: Path) -> None:
    """`--resume auto` of a run with a trained model but no complete checkpoint (its checkpoints/
    deleted to free space) is refused: it started a fresh run of the default shape over it,
    replacing model.safetensors, best/ and the logs."""
    if has_run(out) and (out / checkpoint.WEIGHTS).is_file() and checkpoint.latest_complete(out) is None:
        step = checkpoint.weights_step(out)
        raise ConfigError(f"{out} holds a trained run{f' (model.safetensors of step {step})' if step else ''} but no "
                          "complete checkpoint to continue from (its optimizer state is gone): start a new run from its "
                          f"weights, mtgpt train --init-from {shlex.quote(str(out))} --data DATA --out NEW_RUN "
                          "(nothing was changed)")


def check_config_of_its_run(config_file: Path, settings: dict[str, Any]) -> None:
    """`--config RUN/train_config.json` (no --out) of a run that was moved or copied since: its
    recorded --out is another folder, where it had started a new run (the original gone) or
    continued the original (a copy). Refused, with the commands for either meaning."""
    here = config_file.parent
    if config_file.name != TRAIN_CONFIG or not has_run(here) or not isinstance(settings.get("out"), str):
        return
    if Path(settings["out"]).resolve() == here.resolve():
        return
    raise ConfigError(f"{config_file} holds the settings of the run in {here}, but names --out {settings['out']} "
                      "(the run was moved or copied since): to continue this run, mtgpt train --out "
                      f"{shlex.quote(str(here))} --resume auto; to start a new run with its settings, add --out NEW_RUN "
                      "(nothing was changed)")


def never_saved(out: Path) -> bool:
    """Whether `out` holds a run that stopped before its first save (its settings are written,
    no checkpoint or model is): `--resume auto` starts it again from step 0."""
    return (out / TRAIN_CONFIG).is_file() and checkpoint.latest_complete(out) is None and \
        not (out / checkpoint.WEIGHTS).exists()


def run_of(found: Path) -> Path:
    """The run folder that holds checkpoint folder `found` (RUN/checkpoints/TAG, or a save kept
    one level further down, e.g. RUN/checkpoints/abandoned-.../TAG)."""
    return folders.run_holding(found) or found.parent.parent


def _checkpoint_for(resume: str, out: Path) -> Path | None:
    if resume == "auto":
        return checkpoint.latest_complete(out)
    path = Path(resume)
    if path.parent.name == "universal" and path.parent.parent.name == checkpoint.CKPT_DIR:
        original = path.parent.parent / path.name  # (DeepSpeed's universal form of it: what a resume on another
        if (original / checkpoint.COMPLETE).is_file():  # number of ranks converts, and loads only with that flag)
            return original
        raise ConfigError(f"--resume {resume}: this is DeepSpeed's universal form of the checkpoint {original}, "
                          "which is gone; resume from the run (--resume auto) or another of its checkpoints")
    if (path / checkpoint.COMPLETE).is_file():
        return path
    if path.is_dir() and (path / checkpoint.CKPT_DIR).is_dir():
        found = checkpoint.latest_complete(path)
        if found is None:
            raise ConfigError(f"--resume {resume}: that run has no complete checkpoint yet")
        return found
    if checkpoint.TAG_RE.match(path.name) and path.is_dir():
        raise ConfigError(f"--resume {resume}: this checkpoint is incomplete (a save that was cut "
                          f"short); resume from {path.parent.parent} to take the latest complete one")
    step = re.fullmatch(r"step_?(\d+)", path.name)
    if step and (path.parent / checkpoint.tag_for(int(step[1])) / checkpoint.COMPLETE).is_file():
        return path.parent / checkpoint.tag_for(int(step[1]))  # step_4 for step_00000004
    there = checkpoint.complete_tags(path.parent.parent) if path.parent.name == checkpoint.CKPT_DIR else []
    raise ConfigError(f"--resume {resume}: not a run folder or checkpoint folder"
                      + (f" ({path.parent} holds {', '.join(there[-3:])})" if there else "")
                      + "; use --resume auto, --resume never, or the path of a run or checkpoint")


LENGTH_KEYS = ("max_steps", "max_tokens", "max_epochs")  # the schedule's length: one given replaces all three
DERIVED_KEYS = ("grad_accum",)  # derived again from the batch on this run's number of ranks


def resumed_settings(resume: str | None, out: str | None, given: set[str]) -> dict[str, Any] | None:
    """The settings a resumed run starts from: the train_config.json of the run that saved the
    checkpoint it resumes, less what the command line gives again (`given`: option names) and
    less what is derived anew (--grad-accum, from the batch on this number of ranks). The
    schedule's length goes together: giving any of --max-steps/-tokens/-epochs replaces all three
    of the run's (--max-time, which plans no schedule, only replaces itself). None when nothing is resumed (then the options and their defaults are the settings)."""
    if not resume or resume == "never" or (resume == "auto" and not out):
        return None
    found = _checkpoint_for(resume, Path(out or "."))
    if found is not None:
        saved = saved_settings(found)
    elif resume == "auto" and never_saved(Path(out)):  # it starts again from step 0, with its settings
        saved = run_settings(Path(out))
    else:
        return None
    if saved is None:
        return None
    dropped = set(given) | set(DERIVED_KEYS) | (set(LENGTH_KEYS) if given & set(LENGTH_KEYS) else set())
    if not out:  # the run goes on in the folder that holds its checkpoint (the saved --out may be
        saved["out"] = str(run_of(found))  # relative to another directory, or the run was moved since)
    return {k: v for k, v in saved.items() if k not in dropped}


def keep_run_settings(cfg: TrainConfig, found: Path) -> TrainConfig:
    """`cfg` with what it leaves open (DeepSpeed config, global batch, vocabulary padding) taken
    from the run that saved checkpoint `found`: a resumed run keeps its own. (From the command
    line resumed_settings has filled them in already; this serves a TrainConfig built in code.)"""
    saved = saved_settings(found)
    if saved is None:
        return cfg
    return cfg.replace(ds_config=cfg.ds_config or saved.get("ds_config"),
                       batch_size=cfg.batch_size or saved.get("batch_size"),
                       model=replace(cfg.model, vocab_multiple=cfg.model.vocab_multiple or saved["model"]["vocab_multiple"]))


def saved_settings(found: Path) -> dict[str, Any] | None:
    """The settings of the run that saved checkpoint folder `found` (run_settings)."""
    return run_settings(run_of(found))


def run_settings(run: Path) -> dict[str, Any] | None:
    """The settings of run folder `run` (its train_config.json; None if it has none), with what
    older mtgpt left out of it filled in: the DeepSpeed config it chose (in run_info.json), its
    global batch (micro x accum x ranks) and the vocabulary padding (none before it existed: its
    checkpoints hold exactly vocab_size rows)."""
    try:
        saved, info = load_json(run / TRAIN_CONFIG), load_json(run / RUN_INFO) if (run / RUN_INFO).is_file() else {}
    except ConfigError:
        return None
    saved = {**saved, "model": {**(saved.get("model") or {})}}
    if not saved.get("ds_config") and info.get("ds_config"):
        saved["ds_config"] = info["ds_config"]
    if not saved.get("batch_size"):
        try:
            saved["batch_size"] = int(saved["micro_batch"]) * int(saved["grad_accum"]) * int(info["world_size"])
        except (KeyError, TypeError, ValueError):
            pass
    saved["model"]["vocab_multiple"] = saved["model"].get("vocab_multiple") or 1
    return saved


def resumed_world_size(cfg: TrainConfig) -> int | None:
    """The number of ranks the run that `cfg` resumes last trained on (one that stopped before its
    first save: started on); None when nothing is resumed or its run folder does not say."""
    found = None if cfg.resume == "never" else _checkpoint_for(cfg.resume, Path(cfg.out))
    run = run_of(found) if found else Path(cfg.out) if cfg.resume == "auto" and never_saved(Path(cfg.out)) else None
    try:
        return int(load_json(run / RUN_INFO)["world_size"]) if run else None
    except (ConfigError, KeyError, TypeError, ValueError):
        return None


def lock_run(out: str | Path, hold: bool = True) -> None:
    """Refuse a run folder that another mtgpt is training in (its rank 0 holds an flock on
    RUN/.mtgpt.lock until it exits, whatever way: a crash or SIGKILL frees it). hold: take the
    lock and keep it while this process lives (rank 0, before training); else only check (the
    front end, before it starts any rank). A filesystem without flock is not checked."""
    import fcntl

    path = Path(out) / LOCK
    if not hold and not path.exists():
        return
    try:
        if hold:
            path.parent.mkdir(parents=True, exist_ok=True)
        f = path.open("a+" if hold else "r")  # (only reading: a run on a read-only mount is checked too)
    except OSError as e:
        if hold:  # (a read-only run folder: a traceback in every rank)
            raise unwritable_run(out, e.strerror) from None
        return
    try:
        # a check takes a shared lock: the ranks of one job check at once, and two exclusive tries
        # would refuse each other; rank 0's exclusive lock waits out a check in flight (`mtgpt info`)
        deadline = time.monotonic() + (2.0 if hold else 0.0)
        while True:
            try:
                fcntl.flock(f, (fcntl.LOCK_EX if hold else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"{out} is being trained by another mtgpt ({who}); wait for it to stop, or stop it "
                          "(nothing was changed)") from None
    except OSError:  # (no flock on this filesystem: not checked)
        f.close()
        return
    if not hold:
        f.close()
        return
    f.truncate(0)
    f.write(f"PID {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _held.append(f)


def training_now(out: str | Path) -> str | None:
    """Who trains in run folder `out` now ("PID N on HOST since TIME"), or None."""
    try:
        lock_run(out, hold=False)
    except ConfigError:
        return (Path(out) / LOCK).read_text().strip() or "another process"
    return None


def unwritable_run(out: str | Path, reason: str) -> ConfigError:
    return ConfigError(f"cannot write in the run folder {out} ({reason}): a run trains only where it can save; to go "
                       f"on from its checkpoint elsewhere: mtgpt train --resume {shlex.quote(str(out))} --out NEW_RUN")


def check_out_folder(out: Path) -> None:
    """--out must be a new or empty folder, or one that holds an mtgpt run: never a data folder,
    a folder inside a run, or a folder of other files (the run's files would be mixed into them).
    An empty logs/ of a job script (slurm/train.sbatch makes RUN/logs first) is allowed."""
    # (a file, a folder that cannot be made, a name not UTF-8: TensorBoard's writer failed on it, after
    # the run's first files were written)
    folders.check_creatable(out, "--out", ConfigError)
    kind = folders.kind(out)
    if kind == "run":
        if not os.access(out, os.W_OK | os.X_OK):  # (read-only: refused by rank 0 only after the launcher started)
            read_only = os.statvfs(out).f_flag & os.ST_RDONLY
            raise unwritable_run(out, os.strerror(errno.EROFS if read_only else errno.EACCES))
        return
    run = folders.run_holding(out) or out.resolve().parent  # (a run's best/ too: its model.safetensors is not a run)
    if kind == "checkpoint" or has_run(run):
        raise ConfigError(f"--out {out} is inside the run {run}; give the run folder itself with --resume auto "
                          "to continue it, or a new folder, e.g. --out runs/NAME (nothing was changed)")
    if kind == "missing":
        return
    if kind != "folder":
        raise ConfigError(f"--out {out} is {folders.what(out)}; the run needs a folder of its own, e.g. "
                          "--out runs/NAME (nothing was changed)")
    others = sorted(p.name for p in out.iterdir() if p.name not in ("logs", LOCK))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ConfigError(f"--out {out} is not empty ({shown}) and holds no mtgpt run; choose a new or empty "
                          "folder, e.g. --out runs/NAME (nothing was changed)")


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint folder to continue from, or None to start fresh. Refuses to start over a
    run that is already in --out (unless resuming), and a resume with another model shape."""
    out = Path(cfg.out)
    if not cfg.out:
        raise ConfigError("--out is required: the run folder for checkpoints, logs and the model")
    check_out_folder(out)
    lock_run(out, hold=False)
    if cfg.resume == "never":
        if has_run(out) and never_saved(out):
            raise ConfigError(f"{out} holds a run that stopped before its first save; pass --resume auto to start "
                              "it again from step 0 with its settings (options given again replace them), or "
                              "choose another --out (nothing was changed)")
        if has_run(out):
            raise ConfigError(f"{out} already holds a run; pass --resume auto to continue it, or "
                              "choose another --out (nothing was changed)")
        return None
    found = _checkpoint_for(cfg.resume, out)
    if found is None:
        check_something_to_resume(out)
        return None
    if checkpoint.set_aside(found) and run_of(found).resolve() == out.resolve():  # two branches in one history
        raise ConfigError(f"--resume {cfg.resume} is a save set aside from a branch the run {out} left (its logs "
                          "and checkpoints now go on another way): continue that branch as a run of its own, "
                          f"mtgpt train --out NEW_RUN --resume {found} (nothing was changed)")
    if has_run(out) and run_of(found).resolve() != out.resolve():  # its history would be cut and mixed in
        raise ConfigError(f"--resume {cfg.resume} is a checkpoint of the run {run_of(found)}, and --out {out} holds "
                          f"another run: continue that run with --out {run_of(found)}, or start from its checkpoint "
                          "in a new --out (nothing was changed)")
    saved = run_of(found) / TRAIN_CONFIG
    if saved.is_file():
        old = ModelConfig.from_dict(load_json(saved)["model"])
        if old.shape() != cfg.model.shape():
            diff = ", ".join(f"{k} {old.shape()[k]} -> {v}" for k, v in cfg.model.shape().items()
                             if old.shape()[k] != v)
            fix = (f"the data's tokenizer is not the run's: prepare the data with --tokenizer {shlex.quote(str(out))}"
                   if old.vocab_size != cfg.model.vocab_size else "use the run's own model options")
            raise ConfigError(f"cannot resume {found}: it holds a model of another shape ({diff}); {fix}, or "
                              "start a new run with another --out")
        model_file = run_of(found) / checkpoint.MODEL_CONFIG  # (what its weights are: a train_config.json
        if model_file.is_file():                                # edited to another shape was a DeepSpeed traceback)
            try:
                weights = checkpoint.load_model_config(run_of(found)).shape()
            except ValueError:
                weights = old.shape()
            if weights != old.shape():
                diff = ", ".join(f"{k} {v} -> {old.shape()[k]}" for k, v in weights.items() if old.shape()[k] != v)
                raise ConfigError(f"cannot resume {found}: {saved} gives another model shape ({diff}) than its "
                                  f"weights ({model_file}) have; restore {saved.name}, or start a new run")
        if cfg.model.vocab_multiple not in (None, old.vocab_multiple or 1):
            raise ConfigError(f"cannot resume {found}: its vocabulary is padded to a multiple of "
                              f"{old.vocab_multiple or 1}, not {cfg.model.vocab_multiple}; leave out --vocab-multiple")
    return found


def own_ds_config(cfg: TrainConfig, found: Path, given: bool = False) -> tuple[str, dict[str, Any]] | None:
    """The DeepSpeed config a run resumed from checkpoint `found` goes on with, unless --ds-config
    is given (`given`: on the command line, even the file it started from, which then counts as
    it is now) or names another: the dict it trained with (its ds_config.json, which
    `ds_config.find` reads back unresolved), named as it was started, whatever the file it was
    started from holds now or wherever it went. None for a --ds-config to read, or a run from
    before ds_config.json existed."""
    from mtgpt import ds_config

    saved, file = saved_settings(found) or {}, run_of(found) / DS_CONFIG
    if not file.is_file() or given or (cfg.ds_config and cfg.ds_config != saved.get("ds_config")):
        return None
    return saved.get("ds_config") or str(file), ds_config.find(str(file))[1]


def check_resumable_ds(found: Path, ds: dict[str, Any], ds_name: str) -> None:
    """Refuse to resume checkpoint `found` under a DeepSpeed config that stores its optimizer
    state otherwise: parameters of another dtype (DeepSpeed's bf16/fp16 optimizers hold fp32
    masters of bf16/fp16 weights; fp32 and torch_autocast runs keep fp32 weights and a plain AdamW
    state), or another family of ZeRO stages (0; 1 and 2, which share one layout; 3)."""
    from mtgpt import ds_config

    out = run_of(found)
    try:
        saved = load_json(out / DS_CONFIG)
    except ConfigError:
        return  # a run folder from before ds_config.json existed: nothing to compare with
    settings = saved_settings(found) or {}
    own = settings.get("ds_config") or str(out / DS_CONFIG)
    sources = settings.get("data") or ["DATA"]  # (one string in a run of an older mtgpt)
    data = " ".join(f"--data {shlex.quote(d)}" for d in ([sources] if isinstance(sources, str) else sources))
    fix = (f"resume without --ds-config (the run keeps its own, {own}), or start a new run from its weights: "
           f"mtgpt train --init-from {shlex.quote(str(out))} {data} --ds-config {shlex.quote(ds_name)} --out NEW")
    old, new = ds_config.weights_dtype(saved), ds_config.weights_dtype(ds)
    if old != new:
        raise ConfigError(f"cannot resume {found}: it was trained with {old} weights ({own}) and {ds_name} trains "
                          f"{new} weights, whose optimizer state DeepSpeed stores differently; {fix}")
    family = {0: 0, 1: 1, 2: 1, 3: 3}
    a, b = ds_config.zero_stage(saved), ds_config.zero_stage(ds)
    if family.get(a, a) != family.get(b, b):
        raise ConfigError(f"cannot resume {found}: it was saved at ZeRO stage {a} and {ds_name} is stage {b}, whose "
                          f"checkpoints DeepSpeed lays out differently (stages 1 and 2 share one); {fix}")


def git_commit(package: Path = Path(__file__).resolve().parent) -> str | None:
    """The commit of mtgpt's checkout, when mtgpt runs from one (an editable install); None for a
    pip install, also one into a virtualenv inside another git repository (whose commit it was)."""
    try:
        out = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package.parent:
        return None
    return lines[1]


def versions() -> dict[str, str]:
    pkgs = ["torch", "deepspeed", "webdataset", "transformers", "tensorboard", "tiktoken", "safetensors", "numpy"]
    found = {"python": platform.python_version(), "mtgpt": __version__}
    for name in pkgs:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_run_files(out: str | Path, train_config: dict[str, Any], ds: dict[str, Any], ds_name: str,
                    world_size: int, val_samples: int, resumed_from: Path | None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / LAST_STOP).unlink(missing_ok=True)  # an earlier stop's: this start's is written when it stops
    # the run folder and a checkpoint resumed from, recorded absolute as the other local paths are
    # (cli.absolute_paths), so that `--config RUN/train_config.json` works from any directory
    resume = train_config.get("resume")
    train_config = {**train_config, "out": folders.absolute(out),
                    **({"resume": folders.absolute(resume)} if resume not in (None, "auto", "never") else {})}
    dump_json(train_config, out / TRAIN_CONFIG)
    dump_json(ds, out / DS_CONFIG)
    start = {
        "command": os.environ.get(COMMAND_ENV) or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resumed_from": folders.absolute(resumed_from) if resumed_from else None,
        "git_commit": git_commit(),
        "world_size": world_size,
        "host": platform.node(),
    }
    try:  # the run's earlier starts (a resume's record replaced the first command, its time and commit)
        before = load_json(out / RUN_INFO) if resumed_from and (out / RUN_INFO).is_file() else {}
        earlier = [*before.get("earlier_starts", []), {k: before[k] for k in start if k in before}] if before else []
    except (ConfigError, AttributeError, TypeError):
        earlier = []
    dump_json({**start, "versions": versions(), "val_samples": val_samples,  # val_samples 0: no evaluation, no best/
               "ds_config": ds_name, **({"earlier_starts": earlier[-100:]} if earlier else {})}, out / RUN_INFO)


def write_last_stop(out: str | Path, **info) -> None:
    dump_json({**info, "time": time.time()}, Path(out) / LAST_STOP)
