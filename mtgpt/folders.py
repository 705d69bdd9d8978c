"""What a path is, told by the files it holds, and how mtgpt writes a folder whole.

The one rule behind `mtgpt info` and behind every error that says a path is not what an option
wants, so that the fix it suggests fits what the path is (never an --out over a folder that holds
something else). The first kind whose files it holds:

    data        manifest.json                         `mtgpt prepare`  (mtgpt.data.manifest)
    run         train_config.json or checkpoints/     `mtgpt train`    (mtgpt.rundir, mtgpt.checkpoint)
    checkpoint  a run's checkpoints/, or a save in it  `mtgpt train`
    hf          a config.json of transformers'         `mtgpt export --hf` (mtgpt.hf), a Hugging Face model
                (its "architectures", a "model_type" not "mtgpt")
    model       model.safetensors or config.json      a run's best/, checkpoint.save_weights
    tokenizer   tokenizer.json                        `mtgpt tokenizer train`
    file        any file; folder: any other folder; missing: nothing there

Which folder of a run holds the model a command loads (`model_folder`, with its complete checkpoints)
is said here too, without torch: sample, chat, serve, eval and export check the path they are given
before the seconds of importing torch, so a mistyped one is said at once.

A folder is written whole: into a temporary folder beside it, renamed into place when complete
(`replace_folder`), so a crash, Ctrl-C or a full disk never leaves half of one (and the temporary
folder of a process killed outright is removed by the next one that writes the same folder).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
TRAIN_CONFIG = "train_config.json"  # mtgpt.rundir writes it
DS_CONFIG = "ds_config.json"  # and the DeepSpeed dict the run trained with
CKPT_DIR = "checkpoints"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
TOKENIZER_JSON = "tokenizer.json"
COMPLETE = "COMPLETE"  # in a checkpoint: written after every rank finished saving (mtgpt.checkpoint)
TAG_RE = re.compile(r"^step_(\d{8})$")
RUN_INFO = "run_info.json"  # written by mtgpt.rundir; read here for what a run lacks and why


class ModelFileError(ValueError):
    """A run folder without a usable model. The message says what to do."""


WRITTEN_BY = {"data": "a data folder (what `mtgpt prepare` writes)", "run": "a run folder (what `mtgpt train` writes)",
              "hf": "a Hugging Face model folder (what `mtgpt export --hf` writes)",
              "model": "a model folder (model.safetensors, config.json)",
              "tokenizer": "a tokenizer folder (what `mtgpt tokenizer train` writes)", "file": "a file",
              "folder": "a folder", "missing": "missing"}


def absolute(path: str | Path) -> str:
    """`path` from /, with no `..` in it: data/x from /work is /work/data/x, ../x is /x (not
    /work/../x, which a resume from another directory could not find once /work was gone)."""
    return os.path.normpath(Path(path).absolute())


def run_holding(path: str | Path) -> Path | None:
    """The run folder whose checkpoints/ is `path` or holds it (a save, or a save in a subfolder
    such as universal/), if any."""
    path = Path(path)
    for up in (path, path.parent, path.parent.parent):
        if up.name == CKPT_DIR and (up.parent / TRAIN_CONFIG).is_file():
            return up.parent
    return None


def is_run_ds_config(path: str | Path) -> bool:
    """Whether `path` is a run's own ds_config.json (what mtgpt.rundir wrote, mtgpt's numbers filled in)."""
    path = Path(path)
    return path.name == DS_CONFIG and kind(path.parent) == "run"


def is_hf(path: Path) -> bool:
    """Does `path` hold a Hugging Face transformers config.json (not the one mtgpt writes)?"""
    try:
        config = json.loads((path / MODEL_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("architectures" in config or config.get("model_type") not in (None, "mtgpt"))


def kind(path: str | Path) -> str:
    """data, run, checkpoint, hf, model, tokenizer, file, folder or missing (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    if (path / MANIFEST).is_file():
        return "data"
    if (path / TRAIN_CONFIG).is_file() or (path / CKPT_DIR).is_dir():
        return "run"
    if run_holding(path) is not None and not (path / WEIGHTS).is_file():  # (a best/ set aside there is a model)
        return "checkpoint"
    if is_hf(path):
        return "hf"
    if (path / WEIGHTS).is_file() or (path / MODEL_CONFIG).is_file():
        return "model"
    if (path / TOKENIZER_JSON).is_file():
        return "tokenizer"
    return "folder"


def what(path: str | Path) -> str:
    """What `path` is, in words: "a data folder (what `mtgpt prepare` writes)", "a checkpoint
    inside the run runs/x", ..."""
    k = kind(path)
    return f"a checkpoint inside the run {run_holding(path)}" if k == "checkpoint" else WRITTEN_BY[k]


def complete_tags(run_dir: str | Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def latest_complete(run_dir: str | Path) -> Path | None:
    """The checkpoint a run continues from: the one `latest` names when it is complete (after a
    resume from an older point, that is the newest save of the run's history, not the highest
    step on disk), else the newest complete one; None when there is none."""
    root = Path(run_dir) / CKPT_DIR
    try:
        tag = (root / "latest").read_text().strip()
    except OSError:
        tag = ""
    if TAG_RE.match(tag) and (root / tag / COMPLETE).is_file():
        return root / tag
    tags = complete_tags(run_dir)
    return root / tags[-1] if tags else None


def model_folder(run_dir: str | Path, best: bool = False) -> Path:
    """The folder holding model.safetensors for a run (or a folder that is itself a model)."""
    run_dir = Path(run_dir)
    k = kind(run_dir)
    if k == "missing":
        raise ModelFileError(f"{run_dir}: no such folder; give a run folder written by `mtgpt train`")
    if k == "data":
        raise ModelFileError(f"{run_dir} is {what(run_dir)}, not a run folder; train a model on it: "
                             f"`mtgpt train --data {run_dir} --out RUN_DIR`, then give RUN_DIR")
    if k == "checkpoint":
        run = run_holding(run_dir)
        raise ModelFileError(f"{run_dir} is a checkpoint inside the run {run}; give the run folder: {run} "
                             f"(its {WEIGHTS} is the latest checkpoint's weights)")
    if k == "hf":
        raise ModelFileError(f"{run_dir} is {what(run_dir)}; give the run it was exported from, or train "
                             f"from it with --init-from-hf {run_dir}")
    if k in ("file", "tokenizer"):
        raise ModelFileError(f"{run_dir} is {what(run_dir)}, not a run folder; give a folder written by "
                             "`mtgpt train --out RUN_DIR`")
    if best and k == "model":
        raise ModelFileError(f"{run_dir} is a model folder itself (a run's best/ is one), with no best/ of its own; "
                             "leave out --best")
    folder = run_dir / "best" if best else run_dir
    if best and not (folder / WEIGHTS).is_file() and not has_val(run_dir):
        raise ModelFileError(f"{run_dir} has no best model: its data has no val split (it was prepared "
                             "with --val-fraction 0), so nothing is evaluated; leave out --best to use "
                             "the latest weights")
    if best and not (folder / WEIGHTS).is_file():
        raise ModelFileError(f"{run_dir} has no best model (it is written at the first evaluation): "
                             f"{folder / WEIGHTS} is missing")
    if not (folder / WEIGHTS).is_file() and k == "run" and (saved := latest_complete(run_dir)) is not None:
        raise ModelFileError(f"{run_dir} has checkpoints (the latest: {saved.name}) but no {WEIGHTS}; write it again "
                             f"from the latest with `mtgpt train --out {run_dir} --resume auto` (a run that had "
                             "stopped trains nothing more; one cut short goes on)")
    if not (folder / WEIGHTS).is_file() and k == "run":
        raise ModelFileError(f"{run_dir} has no model yet: `mtgpt train` writes {WEIGHTS} at its first checkpoint "
                             "(--save-every) and at the end")
    if not (folder / WEIGHTS).is_file():
        raise ModelFileError(f"{run_dir} has no model: {folder / WEIGHTS} is missing; give a run folder written by "
                             f"`mtgpt train --data DATA_DIR --out RUN_DIR`")
    return folder


def has_val(run_dir: str | Path) -> bool:
    """False when the run was trained on data without a val split (True when unknown)."""
    try:
        return json.loads((Path(run_dir) / RUN_INFO).read_text()).get("val_samples") != 0
    except (OSError, ValueError):
        return True


# The files a folder of each kind that --overwrite may replace holds when mtgpt wrote it (with
# transformers' tokenizer files of other versions for "hf"): one with anything else is not replaced.
OWN_FILES = {"data": (MANIFEST, TOKENIZER_JSON, "tokenizer_info.json", "train-*.tar", "val-*.tar"),
             "tokenizer": (TOKENIZER_JSON, "tokenizer_info.json"),
             "hf": (MODEL_CONFIG, "generation_config.json", WEIGHTS, TOKENIZER_JSON, "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")}


def foreign(out: Path, k: str) -> list[str]:
    """The entries of folder `out`, of kind `k`, that mtgpt does not write there (folders marked /)."""
    own = OWN_FILES.get(k, ())
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                  if not (p.is_file() and any(p.match(pattern) for pattern in own)))


_UMASK = os.umask(0o022)  # the process's umask, read once at import (setting it is process-wide: not in threads)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file: for files written first under another mode


URL = re.compile(r"(https?|pipe|s3|gs|ais|ftp|sftp|scp|hdfs|file):", re.IGNORECASE)  # what webdataset opens


def check_out(out: str | Path, overwrite: bool, option: str = "--out", error: type[ValueError] = ValueError,
              writes: tuple[str, ...] = ()) -> Path:
    """Refuse (raising `error`, the caller's own kind) to write a folder where it cannot be made
    (under a file, in a folder not writable, the current folder or one above it), over a file, or
    over a non-empty folder: with --overwrite only over one of the kinds in `writes` (what the
    command itself writes) that holds nothing else, never over a run, data, text or anything else.
    Returns the folder to write: `out`, or where it links to when it is a symbolic link (the link
    stays and names the new folder)."""
    if URL.match(str(out)):  # (webdataset's writer would PUT to it, or run a pipe: command)
        raise error(f"{option} {out}: a URL; {option} is a local folder: write it here, then copy it where it goes "
                    "(mtgpt train reads --data from a URL)")
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise error(f"{option} {out} is the current folder or one above it; give a new folder, e.g. {option} NAME")
    check_creatable(out, option, error)
    if out.exists() and (refused := _refuses_folders(out.resolve().parent)):  # (the new one is written beside it)
        raise error(f"cannot write {out}: the new folder is written beside it first, and {out.resolve().parent} "
                    f"does not take new folders ({refused}); choose another {option}")
    if not (out.is_dir() and any(out.iterdir())):
        return out
    k = kind(out)
    mine = " or ".join(WRITTEN_BY[w].split(" (")[0] for w in writes if w in WRITTEN_BY)
    if k not in writes:
        raise error(f"{out} is {what(out)}{' and is not empty' if k == 'folder' else ''}; --overwrite replaces only "
                    f"{mine or 'what this command writes'}: choose another {option} (nothing was changed)")
    if others := foreign(out, k):
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise error(f"{out} is {what(out)} that also holds what mtgpt does not write there ({shown}); --overwrite "
                    f"replaces only {mine} that holds nothing else: move those out of it, or choose another "
                    f"{option} (nothing was changed)")
    if not overwrite:
        raise error(f"{out} is not empty: it is {what(out)}; choose another {option} or pass --overwrite to replace it")
    return out


def check_creatable(out: str | Path, option: str = "--out", error: type[ValueError] = ValueError) -> None:
    """Refuse a folder `out` that is a file or cannot be made: under a file, or in a folder this
    user cannot write to, or named with bytes that are not UTF-8 text (a Latin-1 name: the
    folder's files, a run's TensorBoard log, its JSON, cannot record it)."""
    out = Path(out)
    try:
        str(out.absolute()).encode("utf-8")
    except UnicodeEncodeError:  # (prepare, tokenizer train: a traceback; export: the codec's words alone)
        raise error(f"{option} {str(out)!r}: a name that is not UTF-8 text; give a folder whose name is "
                    "(nothing was changed)") from None
    if out.exists() and not out.is_dir():
        raise error(f"{out} exists and is not a folder; choose another {option}")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"cannot create {out}: {parent} is a file; choose another {option}")
    if not out.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"cannot create {out}: {parent} is not writable; choose another {option}")
    if not out.exists() and (refused := _refuses_folders(parent)):  # (where access() cannot tell: root in /proc)
        raise error(f"cannot create {out}: {parent} does not take new folders ({refused}); choose another {option}")


def _refuses_folders(parent: Path) -> str | None:
    """Why a new folder cannot be made in `parent` (tried: a read-only mount, /proc), or None."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mtgpt-check-", dir=parent))
    except OSError as e:
        return e.strerror or str(e)
    return None


def _beside(out: Path, what: str, pid: int | str) -> Path:
    """`.NAME.what-PID` beside `out`: the folder written first (tmp) or the one replaced (old). A
    name too long for one more suffix (255 bytes) is cut and told apart by a hash."""
    name = out.name
    if len(name.encode()) > 200:
        name = name.encode()[:180].decode(errors="ignore") + "-" + hashlib.sha1(out.name.encode()).hexdigest()[:12]
    return out.with_name(f".{name}.{what}-{pid}")


def temporary(out: Path) -> Path:
    """The temporary folder beside `out` that is written first (a fresh, empty one). Those that
    processes no longer running left for the same `out` (SIGKILL, a power cut), and old folders
    whose removal they did not finish, are removed."""
    for what in ("tmp", "old"):
        for stale in out.parent.glob(glob.escape(_beside(out, what, "").name) + "*"):
            pid = stale.name.rpartition(f".{what}-")[2]
            if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)) and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    tmp = _beside(out, "tmp", os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: running
        pass
    return True


def replace_folder(tmp: Path, out: Path, overwrite: bool = False, error: type[ValueError] = ValueError,
                   option: str = "--out") -> None:
    """Rename tmp to out. An existing out (allowed by --overwrite) is moved aside first and
    deleted only after the new folder is in place; without `overwrite`, an out that another
    command filled while this one wrote is refused (raising `error`), not replaced. Ctrl-C while
    the old folder is deleted ends the deleting (the new one is in place; the next command that
    writes `out` removes the rest)."""
    old = None
    if out.exists():
        if not overwrite and out.is_dir() and any(out.iterdir()):
            raise error(f"{out} was written by another command while this one ran; it is left as that one wrote "
                        f"it (give another {option}, or --overwrite to replace it)")
        old = _beside(out, "old", os.getpid())
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        try:
            shutil.rmtree(old, ignore_errors=True)
        except KeyboardInterrupt:
            pass
