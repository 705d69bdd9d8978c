"""mtgpt.folders in process: writing a folder whole. Another command that filled --out while this
one wrote is not replaced; Ctrl-C while the old folder is deleted leaves the new one in place and
the rest of the old is removed by the next command; a --out name too long for the temporary
folder's suffix still works; a folder that takes no new one, and a full disk, are one line."""

from __future__ import annotations

import shutil

import pytest

from mtgpt import folders
from mtgpt.data import DataError
from mtgpt.data.prepare import prepare
from tests.conftest import SONNETS


def _made(path, text: str):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_an_out_another_command_filled_meanwhile_is_not_replaced(tmp_path):
    """Two prepares (or exports) into one new --out: both said they had written it, and the
    second's replaced the first's without --overwrite."""
    out = tmp_path / "out"
    tmp = _made(folders.temporary(out), "mine")
    _made(out, "theirs")  # written by another command while this one ran
    with pytest.raises(DataError, match="was written by another command while this one ran; it is left as that"):
        folders.replace_folder(tmp, out, error=DataError)
    assert (out / "f.txt").read_text() == "theirs"
    with pytest.raises(DataError, match=r"\(give another --hf, or --overwrite to replace it\)"):  # (export: "--out")
        folders.replace_folder(tmp, out, error=DataError, option="--hf")
    folders.replace_folder(tmp, out, overwrite=True)
    assert (out / "f.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty --out is taken without --overwrite, as at the start
    folders.replace_folder(_made(folders.temporary(empty), "new"), empty)
    assert (empty / "f.txt").read_text() == "new"


def test_ctrl_c_while_the_old_folder_is_deleted(tmp_path, monkeypatch):
    """It said "nothing was written (out is as it was)" with the new folder in place, and left the
    half-deleted old one (159 MB there) for good: the next command now removes it."""
    out = _made(tmp_path / "out", "old")
    tmp = _made(folders.temporary(out), "new")
    rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if ".old-" in str(path):
            raise KeyboardInterrupt
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    folders.replace_folder(tmp, out, overwrite=True)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert (out / "f.txt").read_text() == "new"
    [left] = tmp_path.glob(".out.old-*")
    left.rename(tmp_path / ".out.old-999999999")  # as if of a process that has ended
    folders.temporary(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_long_out_name(tmp_path):
    """A 250-byte --out (a legal name) was "File name too long" for its `.NAME.tmp-PID`."""
    out = tmp_path / ("d" * 250)
    assert len(folders.temporary(out).name.encode()) <= 255
    prepare([str(SONNETS)], out, block_size=8, val_fraction=0.0, quiet=True)
    assert (out / "manifest.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_an_out_whose_name_is_not_utf8_is_one_line_for_prepare_tokenizer_and_export(tmp_path):
    """A Latin-1 byte in the name: prepare and tokenizer train were a UnicodeEncodeError traceback,
    export --hf the codec's words alone ('utf-8' codec can't encode ...), train --out one line."""
    import os

    from tests.conftest import run_mtgpt
    from tests.test_own_tokenizer import one_error_line

    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    model = tmp_path / "model"
    from mtgpt import checkpoint
    from mtgpt.config import ModelConfig
    from mtgpt.model import GPT
    from tests.conftest import TINY

    tiny = GPT(ModelConfig(**TINY))
    checkpoint.save_weights({k: v.detach() for k, v in tiny.named_parameters()}, tiny.config, model)
    for args, option in ((["prepare", SONNETS, "--out", bad], "--out"),
                         (["tokenizer", "train", SONNETS, "--vocab-size", "300", "--out", bad], "--out"),
                         (["export", model, "--hf", bad], "--hf")):
        proc = run_mtgpt(*args, check=False)
        one_error_line(proc, f"{option} {bad!r}: a name that is not UTF-8 text; give a folder whose name is "
                             "(nothing was changed)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_existing_out_whose_folder_takes_no_new_one(tmp_path):
    """An existing (empty) --out in a folder that takes no new folder (a read-only mount; /proc
    here, for root too): the temporary folder beside it was an OSError traceback."""
    with pytest.raises(DataError, match=r"cannot write /proc/sys/kernel: the new folder is written beside it first, "
                                        r"and /proc/sys does not take new folders"):
        folders.check_out("/proc/sys/kernel", overwrite=True, error=DataError)


def test_a_full_disk_is_one_line_for_export_and_tokenizer_train(tmp_path, monkeypatch):
    """ENOSPC while writing: export and tokenizer train were tracebacks (prepare said it in one line)."""
    import errno

    import torch

    from mtgpt import hf, tokenizer
    from mtgpt.config import ModelConfig
    from mtgpt.data.prepare import make_tokenizer
    from mtgpt.model import GPT

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokenizer.Tokenizer, "save", full)
    with pytest.raises(DataError, match=r"tokenizer train .*tok failed: \[Errno 28\] No space left on device; nothing "
                                        r"was written \(if the disk is full"):
        make_tokenizer([str(SONNETS)], 300, tmp_path / "tok", quiet=True)
    from transformers import GPT2LMHeadModel

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", full)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    with pytest.raises(hf.HFError, match=r"export to .*hf failed: \[Errno 28\] No space left on device; nothing was "
                                         r"written"):
        hf.export(dict(model.named_parameters()), model.config, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_weights_follow_the_umask(tmp_path):
    """model.safetensors of a run, best/ and an export were chmod 0644 whatever the umask (077:
    every other file 0600, the weights world-readable)."""
    import subprocess
    import sys

    script = """
import os, sys
from pathlib import Path
os.umask(int(sys.argv[2], 8))
from mtgpt import checkpoint, hf
from mtgpt.config import ModelConfig
from mtgpt.model import GPT
m = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8))
w = {k: v.detach() for k, v in m.named_parameters()}
out = Path(sys.argv[1])
checkpoint.save_weights(w, m.config, out / "run")
hf.export(w, m.config, out / "hf")
"""
    for umask, mode in (("077", 0o600), ("022", 0o644), ("002", 0o664)):
        out = tmp_path / umask
        subprocess.run([sys.executable, "-c", script, str(out), umask], check=True)
        for f in (out / "run" / "model.safetensors", out / "hf" / "model.safetensors", out / "run" / "config.json"):
            assert f.stat().st_mode & 0o777 == mode, (umask, f, oct(f.stat().st_mode))
