"""The benchmark scripts as a user runs them (each is a script that measures and prints; these
check that it runs, says how, and refuses what it cannot do): every --help, sample_speed's tiny
mode and a model of its own vocabulary, bad arguments as one line, a failed mtgpt command shown
with its error, nothing of the user's deleted. (gpu_check.py: tests/test_gpu_check.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SONNETS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(script: str, *args, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("[!_]*.py")))
def test_every_benchmark_says_how_to_run_it(script):
    """`--help` of every benchmark: engine_vs_plain.py and rounding_noise.py printed their
    docstring and exited 1 (no argument parser), and a non-integer seed was a traceback."""
    shown = bench(script, "--help", timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage:"), shown.stdout[-500:] + shown.stderr[-2000:]


def test_sample_speed_in_its_tiny_mode():
    """`benchmarks/sample_speed.py --tiny` asked a context-128 model for 20 + 256 tokens with its
    own defaults: Hugging Face's generate() failed (IndexError)."""
    ran = bench("sample_speed.py", "--tiny", "--repeat", "1")
    assert ran.returncode == 0 and "64 new tokens" in ran.stdout and "ratio" in ran.stdout, ran.stderr[-2000:]


def test_sample_speed_of_a_model_with_its_own_vocabulary(tmp_path):
    """--run of a model trained on an own vocabulary (`make demo`'s runs/demo): its export took
    GPT-2's tokenizer (HFError) and its prompt GPT-2's ids; and a length past the context is one line."""
    from mtgpt import checkpoint, tokenizer
    from mtgpt.config import ModelConfig
    from mtgpt.model import GPT

    tok = tokenizer.train([SONNETS.read_text()], 300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, block_size=128, n_layer=1, n_head=2, n_embd=32))
    checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, tmp_path / "m",
                            tok=tok)
    ran = bench("sample_speed.py", "--run", tmp_path / "m", "--new-tokens", 8, "--repeat", 1)
    assert ran.returncode == 0 and "8 new tokens" in ran.stdout, ran.stderr[-2000:]
    too_long = bench("sample_speed.py", "--run", tmp_path / "m", "--new-tokens", 200)
    assert too_long.returncode == 2 and "exceed the model's context of 128: give --new-tokens" in too_long.stderr


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    """--zero 10 ran ZeRO-1 labelled zero10_bf16; --vocab-multiple 0 was a ZeroDivisionError;
    --other of a folder that is no checkout timed the installed mtgpt as "other"; --keep of a
    folder of the user's deleted it with everything in it."""
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    for script, args, said in (
            ("train_throughput.py", ["--zero", "10"], "invalid choice: 10"),
            ("loss_speed.py", ["--vocab-multiple", "0"], "--vocab-multiple must be at least 1"),
            ("startup.py", ["--other", tmp_path], "is not an mtgpt checkout"),
            ("prepare.py", ["--sizes", "1", "--repeat", "1", "--keep", keep], "holds something that is not a data "
                                                                              "folder"),
            ("prepare.py", ["--repeat", "0"], "--repeat must be at least 1")):
        ran = bench(script, *args, timeout=120)
        assert ran.returncode == 2 and said in ran.stderr, (script, ran.stderr[-2000:])
    assert (keep / "notes.txt").read_text() == "mine"


def test_a_failed_mtgpt_command_is_shown_with_its_error():
    """A benchmark's mtgpt command that fails: only "returned non-zero exit status 1" in a traceback."""
    ran = bench("prepare.py", "--sizes", "1", "--repeat", "1", "--tokenizers", "10")
    assert ran.returncode == 1 and "Traceback" not in ran.stderr, ran.stderr[-2000:]
    assert "tokenizer train shakespeare --vocab-size 10" in ran.stderr and "failed (exit status 1)" in ran.stderr
    assert "Error: --vocab-size 10: a byte-level BPE has at least 257 tokens" in ran.stderr
