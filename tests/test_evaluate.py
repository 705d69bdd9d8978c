"""mtgpt eval: every token scored once with context; the numbers against a hand computation."""

from __future__ import annotations

import json
import itertools
import math

import pytest
import torch

from mtgpt import checkpoint, tokenizer
from mtgpt.config import ModelConfig
from mtgpt.evaluate import score_ids, score_text, windows
from mtgpt.model import GPT
from tests.conftest import SONNETS, TINY, run_mtgpt

GPT2 = tokenizer.gpt2()


@pytest.mark.parametrize("n, block, stride", [(2, 16, 8), (16, 16, 8), (17, 16, 8), (100, 16, 8), (100, 16, 16),
                                               (100, 16, 1), (53, 7, 3), (20, 2, 1)])
def test_windows_score_every_token_once(n, block, stride):
    scored = []
    for begin, end, first in itertools.islice(windows(n, block, stride), n):  # bounded: never hangs
        assert end - begin <= block and begin < first <= end
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_against_a_hand_computation():
    """The windowed score equals scoring each token alone, from the start of the window the rule
    gives it: windows of 16 + 1 tokens, 8 apart, so token t >= 17 sees the 9..16 tokens before it."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "block_size": 16})).eval()
    ids = GPT2.encode(SONNETS.read_text())[:60]
    nll, count = score_ids(model, ids, stride=8)
    by_hand = 0.0
    for t in range(1, len(ids)):
        start = 0 if t < 17 else ((t - 17) // 8 + 1) * 8  # the window whose new tokens include t
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[start:t]]))
        by_hand -= torch.log_softmax(logits[0, -1].double(), dim=-1)[ids[t]].item()
    assert count == 59
    assert abs(nll - by_hand) < 1e-4 * count


def test_cli_json_and_bits_per_byte(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    checkpoint.save_weights(dict(model.named_parameters()), model.config, tmp_path / "run")
    text = SONNETS.read_text()[:2000]
    (tmp_path / "a.txt").write_text(text)
    rows = json.loads(run_mtgpt("eval", tmp_path / "run", tmp_path / "a.txt", "--json", "--stride", "8").stdout)
    row = rows[0]
    direct = score_text(checkpoint.load_model(tmp_path / "run"), GPT2, text, "a", stride=8)
    assert row["tokens"] == len(GPT2.encode(text)) == direct.tokens
    assert abs(row["loss"] - direct.loss) < 1e-6
    assert abs(row["bits_per_byte"] - row["nll"] / math.log(2) / len(text.encode())) < 1e-9
    assert abs(row["ppl"] - math.exp(row["loss"])) < 1e-6 * row["ppl"]
    assert abs(row["loss"] - math.log(50257)) < 0.5  # an untrained model
    # --dtype bf16 scores the bf16 weights (as sample, chat and serve load them): close, not equal
    half = json.loads(run_mtgpt("eval", tmp_path / "run", tmp_path / "a.txt", "--json", "--stride", "8",
                                "--dtype", "bf16").stdout)[0]
    assert half["tokens"] == row["tokens"] and 0 < abs(half["loss"] - row["loss"]) < 0.05


def test_bad_input(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    checkpoint.save_weights(dict(model.named_parameters()), model.config, tmp_path / "run")
    for args, message in [([tmp_path / "missing.txt"], "no such file"),
                          ([SONNETS, "--stride", "64"], "--stride must be between 1 and the block size 32"),
                          ([SONNETS, "--stride", "0"], "--stride must be between 1 and the block size 32")]:
        proc = run_mtgpt("eval", tmp_path / "run", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    folder = tmp_path_factory.mktemp("eval") / "run"
    checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, folder)
    return folder


def invoke(*args, input=None):
    from click.testing import CliRunner

    from mtgpt.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def test_reads_inputs_as_prepare_does(run, tmp_path):
    """Files, folders of *.txt and - for stdin, as prepare takes them; invalid UTF-8 is replaced
    with a warning (--strict refuses it), a file with NUL bytes is binary, as prepare says."""
    text = SONNETS.read_text()[:500]
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 " + text.encode())
    result = invoke("eval", run, tmp_path / "latin.txt", "--json")
    assert result.exit_code == 0, result.output
    assert f"warning: {tmp_path / 'latin.txt'}: 1 invalid UTF-8 byte(s) replaced with U+FFFD" in result.output
    strict = invoke("eval", run, tmp_path / "latin.txt", "--strict")
    assert strict.exit_code == 1 and "invalid UTF-8 at byte 3" in strict.output
    (tmp_path / "nul.txt").write_bytes(b"abc\0def")
    result = invoke("eval", run, tmp_path / "nul.txt")
    assert result.exit_code == 1 and "looks like a binary file" in result.output

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text(text)
    (tmp_path / "folder" / "b.txt").write_text(text[:200])
    rows = json.loads(invoke("eval", run, tmp_path / "folder", "--json").output)
    assert [r["name"] for r in rows] == [str(tmp_path / "folder" / "a.txt"), str(tmp_path / "folder" / "b.txt"), "total"]
    piped = json.loads(invoke("eval", run, "-", "--json", input=text).output)
    assert piped[0]["name"] == "-" and {k: piped[0][k] for k in ("tokens", "nll")} == {k: rows[0][k] for k in ("tokens", "nll")}


def test_progress_bar_on_a_terminal(run, monkeypatch, capsys):
    """A bar over the tokens scored, on stderr when it is a terminal (as prepare's and train's)."""
    import io
    import sys

    from mtgpt.evaluate import score_text

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    text = SONNETS.read_text()[:2000]
    score = score_text(checkpoint.load_model(run), GPT2, text, "a.txt", stride=16)
    assert "eval a.txt" in stderr.getvalue() and f"{score.tokens}/{score.tokens}" in stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar
    score_text(checkpoint.load_model(run), GPT2, text, "a.txt", stride=16)
    assert sys.stderr.getvalue() == ""


def test_block_size_one_is_a_bigram_model():
    """A model with a context of 1 token scores every token from the one before it (and ends)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "block_size": 1})).eval()
    ids = GPT2.encode(SONNETS.read_text())[:30]
    nll, count = score_ids(model, ids, stride=1)
    with torch.no_grad():
        logits, _ = model(torch.tensor(ids[:-1])[:, None])  # each token alone, a batch of 29
    by_hand = -torch.log_softmax(logits[:, 0].double(), dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).sum()
    assert count == 29 and abs(nll - by_hand.item()) < 1e-4 * count


def test_reads_the_bytes_as_prepare_does(tmp_path):
    """CRLF stays CRLF (35 bytes and 15 tokens, where LF would be 32 and 12), and a leading
    byte-order mark is not text."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    checkpoint.save_weights(dict(model.named_parameters()), model.config, tmp_path / "run")
    text = "Hello there.\r\nHow are you?\r\nFine.\r\n"
    (tmp_path / "crlf.txt").write_bytes(text.encode())
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    rows = json.loads(run_mtgpt("eval", tmp_path / "run", tmp_path / "crlf.txt", tmp_path / "bom.txt",
                                "--json").stdout)
    assert rows[0]["bytes"] == 35 and rows[0]["tokens"] == len(GPT2.encode(text)) == 15
    assert len(GPT2.encode(text.replace("\r\n", "\n"))) == 12
    assert {k: rows[1][k] for k in ("bytes", "tokens", "nll")} == {k: rows[0][k] for k in ("bytes", "tokens", "nll")}


def test_a_file_gone_before_its_turn_is_one_line_after_the_scores_so_far(run, tmp_path, monkeypatch):
    """A file removed after eval listed it (it scores one file at a time, for minutes on a folder)
    was a FileNotFoundError traceback, and nothing of the files scored before it was shown."""
    from mtgpt import evaluate

    text = SONNETS.read_text()[:300]
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text(text)
    scored = evaluate.score_text

    def score_then_remove(*args, **kw):  # (while a.txt is scored, b.txt goes)
        (tmp_path / "b.txt").unlink(missing_ok=True)
        return scored(*args, **kw)

    monkeypatch.setattr(evaluate, "score_text", score_then_remove)
    result = invoke("eval", run, tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt")
    lines = result.output.splitlines()
    shown = str(tmp_path / "a.txt") if len(str(tmp_path / "a.txt")) <= 60 else "..." + str(tmp_path / "a.txt")[-57:]
    assert result.exit_code == 1 and lines[0].startswith("text ") and lines[1].startswith(shown + " ")
    assert lines[2:] == [f"Error: {tmp_path / 'b.txt'}: No such file or directory; the 1 file(s) above were scored"]


def test_a_text_with_no_tokens_is_refused_in_one_line(run, tmp_path):
    """Empty stdin, or a file holding only a byte-order mark (not text), has nothing to score:
    one error line, as prepare refuses such files, with --json too."""
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf")
    for args, input, error in ((["-"], "", "-: no text to score (it holds no tokens); give text with at least one "
                                "character"),
                               ([tmp_path / "bom.txt"], None, f"{tmp_path / 'bom.txt'}: the file holds only a byte-order "
                                "mark (not text); give a file with text in it")):
        for json_flag in ([], ["--json"]):
            result = invoke("eval", run, *args, *json_flag, input=input)
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert result.exit_code == 1 and lines == [f"Error: {error}"], result.output


def test_a_run_given_as_text_or_the_arguments_swapped(run, tmp_path):
    """eval has no --glob: a run or data folder given as TEXT is named as what it is, a folder
    without *.txt says what eval reads, and a text file given as RUN with the run after it is
    the two arguments swapped."""
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "empty").mkdir()
    for args, says in [
        ([run, run], f"Error: {run} is a model folder (model.safetensors, config.json), not text; give text files, "
                     "folders of *.txt, - for stdin, or a built-in corpus"),
        ([run, tmp_path / "empty"], f"Error: {tmp_path / 'empty'}: no files matching '**/*.txt' in this folder; "
                                    "name the text files to score"),
        ([tmp_path / "a.txt", run], f"Error: {tmp_path / 'a.txt'} is a file and {run} is a model folder (model."
                                    f"safetensors, config.json): give the run first: `mtgpt eval {run} "
                                    f"{tmp_path / 'a.txt'}`")]:
        result = invoke("eval", *args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and lines == [says], result.output
        assert "--glob" not in result.output
