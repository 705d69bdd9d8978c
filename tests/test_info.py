"""info.py in process: what `mtgpt info` says about a data folder, a run folder and the default model."""

from __future__ import annotations

import json
import os

import pytest

from mtgpt import checkpoint, info, rundir, tokenizer
from mtgpt.config import ModelConfig, TrainConfig
from mtgpt.data.manifest import load_manifest
from mtgpt.model import GPT
from tests.conftest import SONNETS, TINY


def test_default_model():
    text, ok = info.describe(None)
    assert ok and "default parameters: 30," in text  # the seed's 6 x 384 model, 30.1 M


def test_data_folder(tiny_data):
    text, ok = info.describe(str(tiny_data), verify=True)
    assert ok and "block size: 32" in text and "match their sha256" in text
    m = load_manifest(tiny_data)  # the train tokens `mtgpt train` prints, and what is stored
    n = m["splits"]["train"]["samples"]
    assert f"train: {n:,} sequences = {n * 32:,} train tokens (what `mtgpt train` counts: the predicted ones; " \
           f"{n * 33:,} stored)" in text
    assert f"sources: 1 ({SONNETS.stat().st_size / 1e3:.1f} KB)" in text  # (the 12 KB sonnets were "0.0 MB")
    assert [info._size(n) for n in (999, 12_345, 4_500_000, 1_234_567_890)] == ["999 bytes", "12.3 KB", "4.5 MB",
                                                                            "1.2 GB"]


def test_data_from_standard_input(tmp_path, monkeypatch):
    """Data prepared from stdin said "sources: 1 (0 bytes)" (its size is unknown before reading)."""
    import io
    import sys

    from mtgpt.data.prepare import prepare

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(SONNETS.read_bytes())))
    prepare(["-"], tmp_path / "d", block_size=16, val_fraction=0.0, quiet=True)
    assert f"sources: 1, standard input among them ({SONNETS.stat().st_size / 1e3:.1f} KB read)" in \
        info.describe(str(tmp_path / "d"))[0]


def test_run_folder(tmp_path):
    run = tmp_path / "run"
    model = GPT(ModelConfig(**TINY))
    checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, run)
    (run / rundir.TRAIN_CONFIG).write_text(json.dumps(TrainConfig(data="d", out=str(run), model=dict(TINY)).to_dict()))
    rows = [{"step": 10, "train/loss": 5.0}, {"step": 10, "val/loss": 5.5}, {"step": 20, "train/loss": 4.0},
            {"step": 20, "val/loss": 4.75}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rundir.write_last_stop(run, reason="max_steps", step=20, tokens=1280)
    (run / checkpoint.CKPT_DIR / "step_00000020").mkdir(parents=True)
    checkpoint.mark_complete(run, "step_00000020", {"step": 20}, keep_last=2)
    (run / checkpoint.CKPT_DIR / "step_00000030").mkdir()  # torn
    text, _ = info.describe(str(run))
    assert "2 layers, 2 heads, 32 wide, context 32" in text
    assert "last stop: max_steps at step 20 (1,280 tokens)" in text
    assert "train loss: 4.0000 at step 20" in text and "best 4.7500 at step 20" in text
    assert "checkpoints: step_00000020 (incomplete, ignored: step_00000030)" in text
    assert "val loss: none" not in text  # unknown whether the data had val: say nothing
    assert "data gone: d no longer exist(s); a resume takes --data NEW_PATH" in text  # (moved: it said nothing)
    # a run training now said "last stop: max_steps at step 20" (an earlier start's) next to newer losses
    rundir.write_run_files(run, json.loads((run / rundir.TRAIN_CONFIG).read_text()), {}, "x", 1, 0, None)
    rundir.lock_run(run)  # as its rank 0 does
    try:
        text, _ = info.describe(str(run))
        assert "last stop" not in text and f"training now: PID {os.getpid()} on " in text
    finally:
        rundir._held.pop().close()
    assert "last stop: none recorded (its last training ended without a clean stop" in info.describe(str(run))[0]
    cfg = TrainConfig(data="d", out=str(run), model=dict(TINY), micro_batch=4, grad_accum=3).to_dict()
    rundir.write_run_files(run, cfg, {}, "x", 2, 0, None)  # the banner's batch, ranks included
    assert "batch: micro 4 x accum 3 x 2 rank(s) = 24 sequences per step;" in info.describe(str(run))[0]
    # its best/: called a run folder with "checkpoints: none"; now what it is, of which run, from which step
    checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, run / "best",
                            {"step": "20", "val_loss": "4.75"})
    text = info.describe(str(run / "best"))[0]
    assert text.startswith(f"the best model of the run {run} ({run / 'best'}): step 20, val loss 4.7500\n")
    assert "checkpoints:" not in text and "run folder" not in text
    # the run's best is best/'s, also where best/ started again (a resume on other data, another val
    # set) and holds a later step than the lowest val loss logged: that one was named, best/ not
    rows += [{"step": 30, "val/loss": 4.9, "val/bpb": 1.5}, {"step": 40, "val/loss": 4.8, "val/bpb": 1.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, run / "best",
                            {"step": "40", "val_loss": "4.8"})
    text = info.describe(str(run))[0]
    assert "val loss: 4.8000 at step 40; best 4.8000 at step 40" in text, text
    assert "val bits per byte: 1.4000 at step 40; best 1.4000 (comparable" in text
    checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, run / "best",
                            {"step": "20", "val_loss": "4.75"})  # a best without bits per byte logged: none named
    assert "val bits per byte: 1.4000 at step 40 (comparable" in info.describe(str(run))[0]
    with pytest.raises(ValueError, match="--verify checks a data folder's shards: give the folder"):
        info.describe(None, verify=True)  # (with no PATH it was ignored)


def test_not_a_known_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a data folder .* or a tokenizer folder"):
        info.describe(str(tmp_path))
    with pytest.raises(ValueError, match="no such file or folder"):
        info.describe(str(tmp_path / "missing"))


def test_folder_kinds(tiny_data, tmp_path):
    """One rule says what a path is (info, and the errors that say which folder an option wants)."""
    from mtgpt import folders

    run = tmp_path / "run"
    (run / checkpoint.CKPT_DIR / "step_00000010").mkdir(parents=True)
    (run / rundir.TRAIN_CONFIG).write_text("{}")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / tokenizer.TOKENIZER_JSON).write_text("{}")
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "empty").mkdir()
    kinds = {tiny_data: "data", run: "run", run / "checkpoints": "checkpoint", run / "checkpoints" / "step_00000010":
             "checkpoint", tmp_path / "tok": "tokenizer", tmp_path / "a.txt": "file", tmp_path / "empty": "folder",
             tmp_path / "missing": "missing"}
    assert {path: folders.kind(path) for path in kinds} == kinds
    assert folders.what(run / "checkpoints" / "step_00000010") == f"a checkpoint inside the run {run}"
    # `mtgpt info --help` says it describes checkpoints: it refused them
    text, ok = info.describe(str(run / "checkpoints" / "step_00000010"))
    assert ok and text.startswith(f"checkpoint step_00000010 of the run {run}: incomplete (a save cut short)")
    assert f"run folder {run}" in text
    checkpoint.mark_complete(run, "step_00000010", {"step": 10, "tokens": 640, "world_size": 2, "zero_stage": 1,
                                                   "precision": "fp32"}, keep_last=2)
    assert info.describe(str(run / "checkpoints" / "step_00000010"))[0].startswith(
        f"checkpoint step_00000010 of the run {run}: step 10, 640 tokens, saved by 2 rank(s) at ZeRO-1 in fp32; "
        f"resume from it: mtgpt train --resume {run / 'checkpoints' / 'step_00000010'}")
    assert info.describe(str(run / "checkpoints"))[0].startswith(
        f"{run / 'checkpoints'} is in the run {run}: complete checkpoints step_00000010; --resume auto takes step_00000010")


def test_verify_reports_damaged_shards_of_an_own_tokenizer_folder(tmp_path):
    """--verify says which shard is damaged even where describing the folder reads samples (GPT-2's
    bytes per token on data of an own tokenizer): a truncated shard, and a flipped byte that makes
    a token id >= the vocabulary. (Both failed before verifying, telling the user to run --verify.)"""
    import shutil
    import tarfile

    from mtgpt.data import DataError
    from mtgpt.data.prepare import prepare

    (tmp_path / "t.txt").write_text("\n".join(f"line {i} of some text here" for i in range(3000)))
    data = tmp_path / "data300"
    prepare([str(tmp_path / "t.txt")], data, block_size=64, vocab_size=300, quiet=True)
    truncated, flipped = shutil.copytree(data, tmp_path / "truncated"), shutil.copytree(data, tmp_path / "flipped")
    with open(truncated / "train-000000.tar", "r+b") as f:
        f.truncate(20000)
    with tarfile.open(data / "train-000000.tar") as t:
        first = t.getmembers()[0].offset_data
    with open(flipped / "train-000000.tar", "r+b") as f:
        f.seek(first + 1)  # the high byte of the first token id: 0xff.. >= 300
        f.write(b"\xff")
    for folder, problem in ((truncated, "train-000000.tar: 20000 bytes, manifest says"),
                            (flipped, "train-000000.tar: sha256 differs from the manifest")):
        with pytest.raises(DataError, match="--verify"):  # without --verify: what to run
            info.describe(str(folder))
        text, ok = info.describe(str(folder), verify=True)
        assert not ok and f"verify: {folder / problem}" in text and "val-000000" not in text
    text, ok = info.describe(str(data), verify=True)
    assert ok and "GPT-2's, 50,257 tokens, on ~1 MB of this text" in text
    # a shard missing as well: --verify names every problem (it stopped at the missing one, and so
    # did plain info, before saying what the folder is)
    (flipped / "val-000000.tar").unlink()
    text, ok = info.describe(str(flipped), verify=True)
    assert not ok and f"verify: {flipped / 'val-000000.tar'}: listed in manifest.json but missing" in text
    assert f"verify: {flipped / 'train-000000.tar'}: sha256 differs" in text and "data folder" in text
    text, ok = info.describe(str(flipped))
    assert not ok and text.startswith(f"data folder {flipped}") and \
        f"damaged: {flipped / 'val-000000.tar'}: listed in manifest.json but missing" in text
