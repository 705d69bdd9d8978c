"""The `mtgpt` command: --help everywhere, and one clear error line for bad input, before any
training process starts."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from click.testing import CliRunner

from mtgpt.cli import main
from mtgpt.config import ModelConfig, TrainConfig, dump_json
from tests.conftest import SONNETS, TINY_ARGS


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command", [[], ["prepare"], ["train"], ["sample"], ["chat"], ["serve"], ["info"], ["worker"]])
def test_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_help_command_and_a_positional_argument_to_train():
    """`mtgpt help train` was "No such command 'help'"; `mtgpt train data` and `mtgpt train RUN`
    were click's bare "Got unexpected extra argument"."""
    assert invoke("help", "train").output == invoke("train", "--help").output
    assert invoke("help").output == invoke("--help").output
    usage_error(invoke("help", "trian"), "no command 'trian'; `mtgpt --help` lists them")
    usage_error(invoke("train", "data", "--out", "x"), "Got unexpected extra argument (data); train takes options "
                "only: the data is --data DIR, a run to go on with is --out RUN --resume auto")
    # launch/train.py (= mtgpt worker) is one rank: --nproc names the launchers that start N
    usage_error(invoke("worker", "--nproc", "2"), "(launch/train.py is one rank: start N with `deepspeed --num_gpus N "
                "launch/train.py ...` or `torchrun --nproc_per_node N launch/train.py ...`")


def test_prepare_list():
    result = invoke("prepare", "--list")
    assert result.exit_code == 0 and "shakespeare" in result.output and "pip install" in result.output


def one_error_line(result, match):
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert match in lines[0], lines[0]


def test_prepare_errors(tmp_path):
    one_error_line(invoke("prepare", tmp_path / "missing.txt", "--out", tmp_path / "d"), "no such file")
    (tmp_path / "empty.txt").write_text("")
    one_error_line(invoke("prepare", tmp_path / "empty.txt", "--out", tmp_path / "d"), "empty")
    (tmp_path / "x.bin").write_bytes(b"\x00\x01" * 100)
    one_error_line(invoke("prepare", tmp_path / "x.bin", "--out", tmp_path / "d"), "binary")
    assert not (tmp_path / "d").exists()


def test_prepare_and_info(tmp_path):
    result = invoke("prepare", SONNETS, "--out", tmp_path / "d", "--block-size", "32", "--val-fraction", "0.1", "-q")
    assert result.exit_code == 0, result.output
    result = invoke("info", tmp_path / "d", "--verify")
    assert result.exit_code == 0 and "block size: 32" in result.output and "match their sha256" in result.output


def test_info_default_model():
    result = invoke("info")
    assert "30,142,848" in result.output


def test_train_on_folder_that_is_not_data(tmp_path):
    one_error_line(invoke("train", "--data", tmp_path, "--out", tmp_path / "run"), "not a prepared data folder")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, match", [
    (["--n-head", "3"], "does not divide"),
    (["--ds-config", "zero2_fp16"], "fp16 needs a GPU"),
    (["--ds-config", "nope"], "not one of the bundled"),
    (["--max-time", "later"], "not a duration"),
    (["--resume", "/no/such/run"], "not a run folder"),
    (["--data", "b=x:-1"], "the weight must be a positive finite number, got -1"),
    # a value given as an option is named as the option (it said "max_steps must ...")
    (["--max-steps", "0"], "Error: --max-steps must be a positive integer, got 0"),
    (["--block-size", "0"], "Error: --block-size must be a positive integer, got 0"),
    (["--min-lr-ratio", "2"], "Error: --min-lr-ratio must be in [0, 1], got 2.0"),
    (["--eval-samples", "0"], "Error: --eval-samples must be a positive integer, got 0"),
])
def test_train_config_errors(tiny_data, tmp_path, args, match):
    one_error_line(invoke("train", "--data", tiny_data, "--out", tmp_path / "run", *TINY_ARGS, *args), match)
    assert not (tmp_path / "run").exists()


def test_a_config_file_of_wrong_types_is_one_line(tiny_data, tmp_path):
    """`--config FILE` with "compile": "false" (compiled) or "lr": "1e-3" (a traceback in every rank)."""
    for bad, match in (({"compile": "false"}, 'compile must be true or false, or null, got "false"'),
                       ({"lr": "1e-3"}, 'lr must be a number, got "1e-3"; write it without the quotes')):
        (tmp_path / "c.json").write_text(json.dumps({"data": [str(tiny_data)], **bad}))
        one_error_line(invoke("train", "--config", tmp_path / "c.json", "--out", tmp_path / "run", *TINY_ARGS), match)
        assert not (tmp_path / "run").exists()


def test_train_batch_disagreement(tiny_data, tmp_path):
    ds = json.loads((__import__("mtgpt.ds_config", fromlist=["x"]).bundled_dir() / "zero1_fp32.json").read_text())
    ds["train_batch_size"] = 24
    dump_json(ds, tmp_path / "ds.json")
    one_error_line(invoke("train", "--data", tiny_data, "--out", tmp_path / "run", *TINY_ARGS,
                          "--ds-config", tmp_path / "ds.json", "--micro-batch", "4", "--nproc", "2"),
                   "train_batch_size is 24 but micro_batch 4 x grad_accum 1 x 2 rank(s) = 8")


def _fake_run(run, n_layer, block_size=32):
    """A run folder as training leaves it: its config and one complete checkpoint tag."""
    cfg = TrainConfig(data="d", out=str(run), model=ModelConfig(n_layer=n_layer, n_head=2, n_embd=32,
                                                                 block_size=block_size))
    run.mkdir()
    dump_json(cfg.to_dict(), run / "train_config.json")
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000010" / "COMPLETE").write_text("{}")


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else b"") for p in folder.rglob("*"))


def test_overwrite_replaces_only_what_the_command_writes(tiny_data, model_run, tmp_path, monkeypatch):
    """prepare / tokenizer train / export --overwrite never delete a run, a data folder, a folder of
    text or notes, or the current folder (nothing changes; one line says so), and refuse an --out
    that cannot be made before any work; they replace their own kind of folder."""
    import shutil

    _fake_run(tmp_path / "run", 2)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("keep me")
    shutil.copytree(tiny_data, tmp_path / "data")
    (tmp_path / "afile").write_text("")
    keep = {name: _tree(tmp_path / name) for name in ("run", "notes", "data")}
    commands = {"prepare": (["prepare", SONNETS, "--block-size", "32"], "--out", "a data folder"),
                "tokenizer": (["tokenizer", "train", SONNETS, "--vocab-size", "300", "-q"], "--out", "a tokenizer folder"),
                "export": (["export", model_run], "--hf", "a Hugging Face model folder")}
    for command, (args, option, mine) in commands.items():
        for name in ("run", "notes", "data"):
            if command == "prepare" and name == "data":
                continue
            one_error_line(invoke(*args, option, tmp_path / name, "--overwrite"),
                           f"--overwrite replaces only {mine}: choose another {option} (nothing was changed)")
        one_error_line(invoke(*args, option, tmp_path / "afile" / "sub"), f"{tmp_path / 'afile'} is a file")
        monkeypatch.chdir(tmp_path / "notes")
        one_error_line(invoke(*args, option, ".", "--overwrite"), "is the current folder or one above it")
        one_error_line(invoke(*args, option, "..", "--overwrite"), "is the current folder or one above it")
        monkeypatch.chdir(tmp_path)
    assert {name: _tree(tmp_path / name) for name in keep} == keep
    for command, (args, option, _) in commands.items():  # their own kind: replaced
        assert invoke(*args, option, tmp_path / command).exit_code == 0
        assert invoke(*args, option, tmp_path / command, "--overwrite").exit_code == 0


@pytest.mark.parametrize("command", [["prepare", SONNETS, "--block-size", "32", "--out"],
                                     ["tokenizer", "train", SONNETS, "--vocab-size", "300", "--out"],
                                     ["export", "RUN", "--hf"]])
@pytest.mark.parametrize("url", ["http://127.0.0.1:9/data/x", "pipe:cat>out.tar", "s3://bucket/x"])
def test_an_out_that_is_a_url_is_refused(model_run, tmp_path, monkeypatch, command, url):
    """prepare --out http://... PUT its shards to the server (webdataset's writer opens URLs), and
    pipe:... ran the command, left folders named after them and said "nothing was written"."""
    monkeypatch.chdir(tmp_path)
    option = command[-1]
    one_error_line(invoke(*[model_run if a == "RUN" else a for a in command], url),
                   f"{option} {url}: a URL; {option} is a local folder: write it here, then copy it where it goes")
    assert list(tmp_path.iterdir()) == []


def test_out_that_cannot_be_made(tiny_data, tmp_path):
    (tmp_path / "afile").write_text("")
    result = invoke("train", "--data", tiny_data, "--out", tmp_path / "afile" / "run", *TINY_ARGS)
    one_error_line(result, f"cannot create {tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} is a file")


def test_resuming_an_out_that_holds_no_run_names_the_out_not_the_data(tmp_path):
    """`mtgpt train --out RUN/best --resume auto` said "--data is required" (given, a new run
    trained into best/): the --out is what is wrong."""
    _fake_run(tmp_path / "run", 2)
    (tmp_path / "run" / "best").mkdir()
    (tmp_path / "run" / "best" / "model.safetensors").write_bytes(b"weights")
    one_error_line(invoke("train", "--out", tmp_path / "run" / "best", "--resume", "auto"),
                   f"--out {tmp_path / 'run' / 'best'} is inside the run {tmp_path / 'run'}")
    one_error_line(invoke("train", "--out", tmp_path / "new", "--resume", "auto"), "--data is required")


def test_out_is_another_run(tiny_data, tmp_path):
    _fake_run(tmp_path / "run", 2)
    one_error_line(invoke("train", "--data", tiny_data, "--out", tmp_path / "run", *TINY_ARGS),
                   "already holds a run; pass --resume auto")


def test_resume_other_shape(tiny_data, tmp_path):
    _fake_run(tmp_path / "run", 3)
    one_error_line(invoke("train", "--data", tiny_data, "--out", tmp_path / "run", *TINY_ARGS, "--resume", "auto"),
                   "another shape (n_layer 3 -> 2)")


def test_resume_without_out_asks_for_out(tmp_path, monkeypatch):
    """`mtgpt train --resume auto` with no --out asked for --data, which a resumed run does not need."""
    monkeypatch.chdir(tmp_path)
    one_error_line(invoke("train", "--resume", "auto", "--max-steps", "5"),
                   "--out is required: the run folder to resume (its data and settings come from it)")


def test_resume_on_data_of_another_block_size(tiny_data, tmp_path):
    """The fix offered was '--block-size 32, or prepare again with --block-size 64'; the first one
    then failed as 'another shape': a resumed run's context cannot change."""
    run = tmp_path / "run"
    _fake_run(run, 2, block_size=64)
    one_error_line(invoke("train", "--data", tiny_data, "--out", run, "--resume", "auto"),
                   "holds samples of block_size 32 but the resumed run's model has context 64, which a resume cannot "
                   "change: prepare the data again with --block-size 64")


def test_sample_without_model(tmp_path):
    one_error_line(invoke("sample", tmp_path, "--prompt", "hi"), "has no model")


def test_sample_bad_prompt_file(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe\xfa")
    one_error_line(invoke("sample", tmp_path, "--prompt-file", tmp_path / "p.txt"), "not UTF-8")


def test_a_prompt_file_with_a_byte_order_mark(model_run, tmp_path):
    """An editor's byte-order mark is not text (as prepare and eval read files): not in the prompt."""
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfROMEO:")
    result = invoke("sample", model_run, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", "3", "--seed", "1")
    plain = invoke("sample", model_run, "--prompt", "ROMEO:", "--max-new-tokens", "3", "--seed", "1")
    assert result.exit_code == 0 and result.output.startswith("ROMEO:") and result.output == plain.output


def test_info_not_a_folder_we_know(tmp_path):
    one_error_line(invoke("info", tmp_path), "is not a data folder (no manifest.json), a run folder")


def test_worker_error_printed_once(tiny_data, tmp_path):
    """Started directly by a launcher with a bad option, only rank 0 prints the error (the ranks
    agree on it before any trains)."""
    import subprocess
    import sys

    from mtgpt.world import free_port

    for bad, said in ((["--n-head", "3"], "does not divide"),
                      (["--max-step", "6"], "No such option '--max-step'")):  # (click's: every rank printed it)
        args = ["worker", "--data", tiny_data, "--out", tmp_path / "run", *TINY_ARGS, *bad]
        env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "DS_ACCELERATOR": "cpu"}
        procs = [subprocess.Popen([sys.executable, "-m", "mtgpt", *map(str, args)], env={**env, "RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        (_, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
        assert [p.returncode for p in procs] == [2, 2], err0 + err1
        assert err0.count(said) == 1 and "Error" not in err1 and "Usage" not in err1, (err0, err1)


def test_every_training_option_is_declared_once(tiny_data):
    """`mtgpt train --help` and build_config come from the config's fields: every field a run
    records in train_config.json (but the vocabulary and biases, which follow the tokenizer and
    GPT-2) is an option, with the field's help and default, and sets exactly that field."""
    import dataclasses

    from mtgpt.cli import build_config, config_fields

    declared = {f.name for _, f in config_fields()}
    recorded = set(TrainConfig().to_dict()) - {"model"} | set(ModelConfig().__dict__) - {"vocab_size", "bias"}
    assert declared == recorded
    help_text = "".join(invoke("train", "--help").output.split())  # whitespace aside (lines wrap)
    for _, f in config_fields():
        assert "--" + f.name.replace("_", "-") in help_text
        assert "".join(f.metadata["help"].split()) in help_text
    assert "".join("Checkpoint every N steps (and at the end). [default: 1000]".split()) in help_text
    values = {"n_layer": 3, "dropout": 0.25, "lr": 1e-3, "max_time": "30m", "compile": False,
              "init_from": None, "keep_last": 5}
    cfg = build_config({"data": str(tiny_data), "out": "o", **values})
    assert (cfg.model.n_layer, cfg.model.dropout, cfg.lr, cfg.max_time, cfg.compile, cfg.keep_last) == \
        (3, 0.25, 1e-3, "30m", False, 5)
    assert cfg.model.block_size == 32  # not given: the data's
    assert dataclasses.replace(cfg, lr=TrainConfig.lr).lr == 6e-4


def usage_error(result, match):
    """A click usage error: exit 2, the command's usage, and one "Error:" line that names the option."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and match in errors[0], result.output


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """A run folder holding a tiny random model, as training saves it (weights and config only)."""
    import torch

    from mtgpt import checkpoint
    from mtgpt.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    run = tmp_path_factory.mktemp("runs") / "tiny"
    checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, run)
    return run


def test_data_that_is_a_run_folder(tmp_path):
    """The fix suggested never points --out at the run (--overwrite would delete it)."""
    _fake_run(tmp_path / "run1", 2)
    result = invoke("train", "--data", tmp_path / "run1", "--out", tmp_path / "run2", *TINY_ARGS)
    one_error_line(result, f"{tmp_path / 'run1'} is a run folder (what `mtgpt train` writes), not a prepared data folder")
    assert f"--out {tmp_path / 'run1'}" not in result.output and "mtgpt prepare TEXT... --out DATA_DIR" in result.output
    assert not (tmp_path / "run2").exists()


def test_data_that_is_a_text_file(tmp_path):
    (tmp_path / "my.txt").write_text("some text\n")
    result = invoke("train", "--data", tmp_path / "my.txt", "--out", tmp_path / "run", *TINY_ARGS)
    one_error_line(result, f"{tmp_path / 'my.txt'} is a file, not a prepared data folder")
    assert f"`mtgpt prepare {tmp_path / 'my.txt'} --out data/my`, then pass --data data/my" in result.output


def test_data_that_is_a_folder_of_text(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some text\n")
    result = invoke("train", "--data", tmp_path / "texts", "--out", tmp_path / "run", *TINY_ARGS)
    one_error_line(result, f"`mtgpt prepare {tmp_path / 'texts'} --out data/texts`, then pass --data data/texts")


def test_sample_a_data_folder_or_a_checkpoint(tiny_data, tmp_path):
    result = invoke("sample", tiny_data, "--prompt", "hi")
    one_error_line(result, f"{tiny_data} is a data folder (what `mtgpt prepare` writes), not a run folder; "
                           f"train a model on it: `mtgpt train --data {tiny_data} --out RUN_DIR`")
    assert f"--out {tiny_data}`" not in result.output
    _fake_run(tmp_path / "run", 2)
    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    one_error_line(invoke("sample", step, "--prompt", "hi"),
                   f"{step} is a checkpoint inside the run {tmp_path / 'run'}; give the run folder: {tmp_path / 'run'}")
    one_error_line(invoke("sample", tmp_path / "run", "--prompt", "hi"),
                   f"{tmp_path / 'run'} has checkpoints (the latest: step_00000010) but no model.safetensors; write it "
                   f"again from the latest with `mtgpt train --out {tmp_path / 'run'} --resume auto`")


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_prepare_workers_at_least_one(tmp_path, workers):
    one_error_line(invoke("prepare", SONNETS, "--out", tmp_path / "d", "--workers", workers, "-q"),
                   f"--workers must be >= 1, got {workers}")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("command", [["sample", "--prompt", "hi"], ["chat"], ["serve"], ["eval", SONNETS]])
@pytest.mark.parametrize("device", ["tpu", "", "cuda:x", "cpu:0"])
def test_bad_device(model_run, command, device):
    one_error_line(invoke(command[0], model_run, *command[1:], "--device", device),
                   f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def test_serve_port_in_range(model_run):
    usage_error(invoke("serve", model_run, "--port", "99999"), "Invalid value for '--port'")
    usage_error(invoke("serve", model_run, "--port", "0"), "Invalid value for '--port'")


@pytest.mark.parametrize("command", ["prepare", "tokenizer", "prepare --vocab-size"])
def test_interrupted_leaves_nothing_and_no_traceback(command, tmp_path):
    """Ctrl-C while the shards are being written (or the tokenizer trained): one clean line, no
    half-written --out, no temporary folder left beside it, and no traceback of a tar stream
    closed after its file (or click's bare "Aborted!")."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "big.txt").write_text(SONNETS.read_text() * 1600)  # 20 MB: seconds of tokenizing
    args, busy = {"prepare": (["prepare", "big.txt", "--block-size", "32"], ".out.tmp-*/train-*.tar"),
                  "tokenizer": (["tokenizer", "train", "big.txt", "--vocab-size", "4096"], ".out.tmp-*"),
                  "prepare --vocab-size": (["prepare", "big.txt", "--vocab-size", "4096"], ".out.tmp-*")}[command]
    proc = subprocess.Popen([sys.executable, "-m", "mtgpt", *args, "--out", "out"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 60
    while not list(tmp_path.glob(busy)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if command != "prepare":  # into the tokenizer's training itself: tokenizers' thread runs on after Ctrl-C, and aborted
        time.sleep(0.5)  # the interpreter's exit when it called back into Python ("FATAL: exception not rethrown")
    assert proc.poll() is None, f"{command} finished before it could be interrupted: give it more text"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # as a shell counts Ctrl-C (it was 1)
    assert "Exception ignored" not in err and "Traceback" not in err, err
    said = [line for line in err.splitlines() if line.strip()]  # (--vocab-size: a note that it trains one first)
    assert said[-1] == "Error: interrupted; nothing was written (out is as it was)"
    assert all(line.startswith("note: training a 4,096-token BPE") for line in said[:-1]), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


@pytest.mark.parametrize("command", ["prepare", "export"])
def test_sigterm_leaves_nothing(command, tmp_path):
    """SIGTERM (timeout, kill, a cancelled Slurm job) while the shards (or a Hugging Face export)
    are written is cleaned up as Ctrl-C is: one line, exit 143, no temporary folder left beside
    --out (export left a 125 MB half-written one, and said nothing)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if command == "prepare":
        (tmp_path / "big.txt").write_text(SONNETS.read_text() * 1600)  # 20 MB: seconds of tokenizing
        args, busy = ["prepare", "big.txt", "--block-size", "32", "--shard-size", "0.005", "--out"], ".out.tmp-*/train-*.tar"
    else:  # a model big enough (45 M parameters, 180 MB) to be caught writing
        from mtgpt import checkpoint
        from mtgpt.model import GPT

        model = GPT(ModelConfig(n_layer=6, n_head=8, n_embd=512, block_size=64))
        checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, tmp_path / "big")
        args, busy = ["export", "big", "--hf"], ".out.tmp-*"
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.Popen([sys.executable, "-m", "mtgpt", *args, "out"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 60
    while not list(tmp_path.glob(busy)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"{command} finished before it could be terminated: give it more to write"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert [line for line in err.splitlines() if line.strip()] == ["Error: terminated; nothing was written (out is as it was)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("args, match", [
    (["--shard-size", "inf"], "--shard-size must be a positive number of MB, got inf"),
    (["--seed", "-1"], "--seed must be between 0 and 4294967295"),  # (train's range; any int was taken)
    (["--seed", "99999999999999999999"], "--seed must be between 0 and 4294967295"),
    (["--glob", "/tmp/*.txt"], "--glob '/tmp/*.txt': the pattern is matched inside each folder given, so it is relative"),
    (["--glob", ""], "--glob '': the pattern is matched inside each folder"),  # (it was the default, silently)
    (["--out", "/proc/nope/x"], "cannot create /proc/nope/x: /proc"),
])
def test_prepare_bad_values_are_one_line(tmp_path, args, match):
    """Values that gave a traceback: an infinite shard size, an absolute --glob, an --out that
    cannot be made even by root."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(SONNETS.read_text())
    one_error_line(invoke("prepare", tmp_path / "texts", "--out", tmp_path / "d", "-q", *args), match)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("args, match", [
    (["--train-on", "all"], "--train-on is for --format chat"),
    (["--doc-separator", ""], "--doc-separator '': a line equal to LINE ends a document"),
    (["--format", "chat", "--doc-separator", "==="], "--doc-separator is for plain text"),
    (["-"], "- (stdin) is given more than once, and stdin can be read only once"),
    (["--tokenizer", "gpt2", "--vocab-size", "300"], "give --tokenizer (one made before) or --vocab-size"),
    (["--glob", "*.md"], "--glob '*.md' picks files inside the folders given, and no folder is"),
])
def test_prepare_options_that_would_be_ignored_are_refused(tmp_path, args, match):
    one_error_line(invoke("prepare", "-", "--out", tmp_path / "d", "-q", *args), match)
    assert not (tmp_path / "d").exists()


def test_a_glob_with_only_files_is_refused(tmp_path):
    """--glob picks files in the folders given: with files only it was ignored without a word."""
    for command in (["prepare", SONNETS, "--out", tmp_path / "d"], ["tokenizer", "train", SONNETS, "--vocab-size",
                                                                     "300", "--out", tmp_path / "d"]):
        one_error_line(invoke(*command, "--glob", "*.md"), "picks files inside the folders given, and no folder is")
    assert not (tmp_path / "d").exists()
    assert invoke("prepare", SONNETS, tmp_path, "--glob", "*.md", "--out", tmp_path / "e", "-q").exit_code != 0  # a folder: used


def test_nproc_at_least_one(tiny_data, tmp_path):
    usage_error(invoke("train", "--nproc", "0", "--data", tiny_data, "--out", tmp_path / "run", *TINY_ARGS,
                       "--n-head", "3"), "Invalid value for '--nproc'")


def test_prompt_and_prompt_file_together(model_run, tmp_path):
    (tmp_path / "p.txt").write_text("from the file")
    usage_error(invoke("sample", model_run, "--prompt", "X", "--prompt-file", tmp_path / "p.txt"),
                "give --prompt or --prompt-file, not both")


@pytest.mark.parametrize("command", [["sample", "--prompt", "hi"], ["chat"]])
def test_max_new_tokens_at_least_one(model_run, command):
    one_error_line(invoke(command[0], model_run, *command[1:], "--max-new-tokens", "0", "--device", "cpu"),
                   "--max-new-tokens must be >= 1, got 0")


def test_verify_is_for_data_folders(model_run, tmp_path):
    from mtgpt.tokenizer import INFO_JSON, TOKENIZER_JSON

    one_error_line(invoke("info", model_run, "--verify"),
                   f"--verify checks a data folder's shards; {model_run} is a model folder")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / TOKENIZER_JSON).write_text("{}")
    (tmp_path / "tok" / INFO_JSON).write_text("{}")
    one_error_line(invoke("info", tmp_path / "tok", "--verify"),
                   f"--verify checks a data folder's shards; {tmp_path / 'tok'} is a tokenizer folder")


def test_export_overwrite(model_run, tmp_path, monkeypatch):
    """--overwrite replaces an export only once the new one is complete; a failed export keeps the
    old. It replaces only an export that holds nothing else (it deleted a model card, a run copied
    in, anything), and through a symbolic link the folder linked to (it replaced the link with a
    folder and left the old link behind as .NAME.old-PID)."""
    from mtgpt import hf

    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("the old export")
    one_error_line(invoke("export", model_run, "--hf", out), "is a folder and is not empty; --overwrite replaces")
    (out / "old.txt").unlink()
    assert invoke("export", model_run, "--hf", out).exit_code == 0  # (an empty folder is written into)
    old = '{"the old export": 1}'
    (out / "generation_config.json").write_text(old)
    one_error_line(invoke("export", model_run, "--hf", out), "is not empty: it is a Hugging Face model folder")

    (out / "README.md").write_text("my model card")
    (out / "my_run" / "checkpoints").mkdir(parents=True)
    kept = _tree(out)
    one_error_line(invoke("export", model_run, "--hf", out, "--overwrite"),
                   f"{out} is a Hugging Face model folder (what `mtgpt export --hf` writes) that also holds what mtgpt "
                   "does not write there (README.md, my_run/); --overwrite replaces only a Hugging Face model folder "
                   "that holds nothing else: move those out of it, or choose another --hf (nothing was changed)")
    assert _tree(out) == kept
    (out / "README.md").unlink()
    (out / "my_run" / "checkpoints").rmdir()
    (out / "my_run").rmdir()

    def fail(*args, **kwargs):
        raise hf.HFError("the tokenizer cannot be written")

    with monkeypatch.context() as m:
        m.setattr(hf, "hf_tokenizer", fail)  # after the model is written
        result = invoke("export", model_run, "--hf", out, "--overwrite")
        assert result.exit_code == 1 and "Error: the tokenizer cannot be written" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and (out / "generation_config.json").read_text() == old
    result = invoke("export", model_run, "--hf", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "generation_config.json").read_text() != old and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

    (tmp_path / "latest").symlink_to("hf")
    (out / "generation_config.json").write_text(old)
    result = invoke("export", model_run, "--hf", tmp_path / "latest", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "latest").resolve() == out.resolve()
    assert (out / "generation_config.json").read_text() != old and sorted(p.name for p in tmp_path.iterdir()) == \
        ["hf", "latest"]


def test_a_fine_tune_resumes_without_the_model_it_started_from(tiny_data, tmp_path):
    """`mtgpt train --out FT --resume auto` of a run started with --init-from, after that model was
    deleted: the checkpoint holds everything; neither the command nor its ranks (which get the
    resolved config as --config) read the source again."""
    from mtgpt import cli
    from tests.conftest import TINY
    from tests.test_rundir import _complete

    run = tmp_path / "ft"
    _complete(run, 5)
    saved = TrainConfig(data=[str(tiny_data)], out=str(run), model={**TINY, "vocab_size": 50257, "vocab_multiple": 1},
                        micro_batch=4, batch_size=8, init_from=str(tmp_path / "deleted")).to_dict()
    dump_json(saved, run / "train_config.json")

    def options(command, *args):
        params = getattr(cli, command).make_context(command, [str(a) for a in args]).params
        return {k: v for k, v in params.items() if k not in ("nproc", "local_rank", "deepspeed_flag")}

    cfg = cli.build_config(options("train", "--out", run, "--resume", "auto", "--max-steps", 10))
    assert cfg.to_dict() == {**saved, "resume": "auto", "max_steps": 10}
    dump_json(cfg.to_dict(), tmp_path / "resolved.json")  # what mtgpt.launcher hands its ranks
    assert cli.build_config(options("worker", "--config", tmp_path / "resolved.json")) == cfg


def test_a_resumed_run_starts_on_its_own_number_of_ranks(tiny_data, tmp_path, monkeypatch):
    """`mtgpt train --out RUN --resume auto` of a 1-rank run (batch 4 = micro 4 x 1 rank) starts 1
    rank, not the default 2 (on which the batch would not divide); --nproc still decides."""
    from mtgpt import launcher
    from tests.conftest import TINY
    from tests.test_rundir import _complete

    run = tmp_path / "r1"
    _complete(run, 5)
    dump_json(TrainConfig(data=[str(tiny_data)], out=str(run), model={**TINY, "vocab_size": 50257}, micro_batch=4,
                          batch_size=4).to_dict(), run / "train_config.json")
    dump_json({"world_size": 1}, run / "run_info.json")
    started = []
    monkeypatch.setattr(launcher, "launch_local", lambda cfg, nproc, **_: started.append(nproc) or 0)
    assert invoke("train", "--out", run, "--resume", "auto", "--max-steps", 10).exit_code == 0
    assert invoke("train", "--out", run, "--resume", "auto", "--max-steps", 10, "--nproc", 2,
                  "--micro-batch", 2).exit_code == 0
    assert started == [1, 2]


def test_a_run_records_its_local_folders_as_absolute_paths(tiny_data, tmp_path, monkeypatch):
    """So that `--resume auto` from another directory finds them; names, weights, URLs kept."""
    import shutil

    from mtgpt.cli import absolute_paths, build_config
    from mtgpt.config import data_sources

    shutil.copytree(tiny_data, tmp_path / "d")
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert absolute_paths("data", ["d"]) == [f"d={tmp_path / 'd'}"]
    monkeypatch.chdir(tmp_path / "base")  # ../d recorded as .../base/../d: a resume failed once base/ was gone
    assert absolute_paths("data", ["../d"]) == [f"d={tmp_path / 'd'}"]
    monkeypatch.chdir(tmp_path)
    given = ["d:3", "b=e:0.25", "http://127.0.0.1:8000/x:0.5"]  # (one folder twice is refused: data_sources)
    recorded = absolute_paths("data", given)
    assert recorded[0] == f"d={tmp_path / 'd'}:3" and recorded[1] == f"b={tmp_path / 'e'}:0.25" and recorded[2] == given[2]
    assert [(s.name, s.weight) for s in data_sources(recorded)] == [(s.name, s.weight) for s in data_sources(given)]
    assert absolute_paths("init_from", "base") == str(tmp_path / "base") and absolute_paths("init_from", "gone") == "gone"
    (tmp_path / "my_ds.json").write_text("{}")  # a DeepSpeed JSON of the user's; a bundled config's name is kept
    assert absolute_paths("ds_config", "my_ds.json") == str(tmp_path / "my_ds.json")
    assert absolute_paths("ds_config", "zero2_bf16") == "zero2_bf16"
    cfg = build_config({"data": ["d"], "out": "run"})
    assert cfg.data == [f"d={tmp_path / 'd'}"] and cfg.out == "run"
    # the run's record: its folder too (`--config run/train_config.json` from elsewhere trained a new
    # run in ./run there), and a checkpoint it resumed from
    from mtgpt import rundir

    (tmp_path / "run" / "checkpoints" / "step_2").mkdir(parents=True)
    rundir.write_run_files("run", cfg.replace(resume="run/checkpoints/step_2").to_dict(), {}, "zero1_fp32", 1, 0, None)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = build_config({"config_file": "../run/train_config.json", "max_steps": 3})
    assert again.out == str(tmp_path / "run") and again.resume == str(tmp_path / "run" / "checkpoints" / "step_2")
    assert again.data == cfg.data


def test_help_as_a_deepspeed_user_asks_for_it():
    """`python launch/train.py -h` said "No such option '-h'"; DeepSpeed's own --deepspeed and
    --deepspeed_config (deepspeed.add_config_arguments) were refused; chat's --seed spoke of a
    --num-samples chat does not have."""
    import subprocess
    import sys
    from pathlib import Path

    launch = Path(__file__).resolve().parents[1] / "launch" / "train.py"
    shown = subprocess.run([sys.executable, str(launch), "-h"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith("Usage: launch/train.py [OPTIONS]")
    options = main.commands["worker"].make_context("worker", ["--deepspeed", "--deepspeed_config", "zero1_fp32"]).params
    assert options["ds_config"] == "zero1_fp32" and options["deepspeed_flag"]
    assert "--num-samples" not in invoke("chat", "--help").output and "--num-samples" in invoke("sample", "--help").output


def test_ctrl_c_that_an_import_swallows_still_ends_the_command():
    """`import torch` turns a KeyboardInterrupt raised at one moment of its start (about 0.2 s in,
    here) into nothing and goes on: Ctrl-C then had `mtgpt train` train the whole run. The window
    in which `train` imports keeps the signal, and raises it again after the import."""
    from mtgpt import cli

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with cli._imports_interruptible():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # (the handler runs here)
            except KeyboardInterrupt:
                pass  # what the import does
    assert signal.getsignal(signal.SIGINT) is before
    with cli._imports_interruptible():  # no signal: nothing
        pass


# `mtgpt ARGS` in a fresh Python that says, last, whether it imported torch (seconds on a laptop).
TELLS_TORCH = ("import sys\nfrom mtgpt.cli import main\ntry:\n    main()\nfinally:\n"
               "    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n")


@pytest.mark.parametrize("args, rc, match", [
    (["sample", "{missing}"], 1, "missing: no such folder; give a run folder written by `mtgpt train`"),
    (["sample", "{data}", "--best"], 1, "is a data folder (what `mtgpt prepare` writes), not a run folder"),
    (["chat", "{missing}"], 1, "no such folder"),
    (["serve", "{data}"], 1, "not a run folder; train a model on it"),
    (["export", "{missing}", "--hf", "{tmp}/hf"], 1, "no such folder"),
    (["eval", "{missing}", str(SONNETS)], 1, "no such folder"),
    (["eval", "{tmp}", "{missing}"], 1, "missing: no such file or folder"),
    (["info", "{missing}"], 1, "missing: no such file or folder"),
    (["prepare", "{missing}", "--out", "{tmp}/out"], 1, "missing: no such file or folder"),
    (["prepare", str(SONNETS)], 2, "--out is required"),
    (["eval", "{missing}"], 2, "Missing argument 'TEXT...'"),
    (["train", "--n-layers", "2"], 2, "No such option '--n-layers'"),
    (["train", "--data", "{missing}", "--out", "{tmp}/run"], 1, "missing: no such folder; create it with `mtgpt prepare"),
    (["train", "--data", str(SONNETS), "--out", "{tmp}/run"], 1, "is a file, not a prepared data folder"),
])
def test_a_mistake_is_said_before_torch_is_imported(tmp_path, args, rc, match):
    """A mistyped path or option took 2 to 4 s to be said here: every command imported torch (and
    a usage error imported it to ask which rank it was) before looking at what it was given."""
    import subprocess
    import sys

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    args = [a.format(missing=tmp_path / "missing", data=tmp_path / "data", tmp=tmp_path) for a in args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", TELLS_TORCH, *args], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == rc and match in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == "torch imported: False", proc.stderr


def test_info_of_a_data_folder_imports_no_torch(tiny_data):
    """`mtgpt info DATA` reads a manifest and a tokenizer: it took 3.7 s here, of which 3 importing torch."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", TELLS_TORCH, "info", str(tiny_data)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and f"data folder {tiny_data}" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == "torch imported: False", proc.stderr
