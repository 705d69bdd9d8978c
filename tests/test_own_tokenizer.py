"""An own tokenizer through every command: `mtgpt tokenizer train`, `prepare --tokenizer` and
`--vocab-size`, a 2-rank training with a 512-token vocabulary, then sample, chat, eval, info,
export --hf (AutoTokenizer gives mtgpt's ids) and --init-from; and each bad input refused with one
line, nothing half-written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mtgpt import checkpoint, tokenizer
from mtgpt.config import ConfigError, TrainConfig
from mtgpt.data import DataError, load_manifest, verify
from mtgpt.data.loader import load_val
from mtgpt.data.prepare import prepare
from tests.conftest import SONNETS, TINY, TINY_ARGS, run_mtgpt

GPT2 = tokenizer.gpt2()
MIXED = "Shall I compare thee — café, 中文, 🎉, <tag> x  \n\tdef f(): pass"


def one_error_line(proc: subprocess.CompletedProcess, match: str) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("warning", "note:"))]
    assert len(lines) == 1 and lines[0].startswith("Error:") and match in lines[0], proc.stderr
    return lines[0]


def stream_of(data_dir) -> list[int]:
    from tests.test_data import all_train_samples

    return np.concatenate([np.frombuffer(s, "<u2") for s in all_train_samples(data_dir)]).tolist()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe512"
    proc = run_mtgpt("tokenizer", "train", SONNETS, "--vocab-size", "512", "--out", out)
    assert "bpe-512, 512 tokens" in proc.stdout and "GPT-2's:" in proc.stdout
    return out


@pytest.fixture(scope="module")
def data512(tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "d512"
    run_mtgpt("prepare", SONNETS, "--out", out, "--block-size", "32", "--val-fraction", "0.1",
              "--tokenizer", tok_dir, "--quiet")
    return out


@pytest.fixture(scope="module")
def run512(data512, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "r512"
    run_mtgpt("train", "--data", data512, "--out", run, "--nproc", "2", *TINY_ARGS, "--micro-batch", "4",
              "--lr", "1e-2", "--max-steps", "20", "--eval-every", "10", "--eval-samples", "8", "--log-every", "5")
    return run


def test_tokenizer_folder_and_info(tok_dir):
    tok = tokenizer.load(tok_dir)
    assert tok.vocab_size == 512 and tok.info["bytes_per_token"] > 2 and tok.info["gpt2_bytes_per_token"] > 2
    text = run_mtgpt("info", tok_dir).stdout
    assert "bpe-512 (512 tokens" in text and "bytes per token on that text" in text and "GPT-2's:" in text


def test_prepare_ids_equal_encoding_the_file_whole(tok_dir, data512, tmp_path):
    tok = tokenizer.load(tok_dir)
    prepare([str(SONNETS)], tmp_path / "all", block_size=32, val_fraction=0.0, quiet=True, tok=tok_dir)
    stream = stream_of(tmp_path / "all")
    assert stream == [*tok.encode(SONNETS.read_text()), tok.eot][:len(stream)] and len(stream) > 3000
    m = load_manifest(data512)
    assert tokenizer.same(m["tokenizer"], tok.identity()) and m["tokenizer"]["name"] == "bpe-512"
    assert [f["file"] for f in m["tokenizer"]["files"]] == ["tokenizer.json", "tokenizer_info.json"]
    assert m["text_bytes"] == SONNETS.stat().st_size and not verify(data512)
    assert tokenizer.for_folder(data512, m["tokenizer"]).ranks == tok.ranks
    info = run_mtgpt("info", data512).stdout
    assert f"bytes per token: {m['text_bytes'] / (m['tokens'] - m['documents']):.2f} (GPT-2's, 50,257 tokens, on ~1 MB" \
        in info


def test_bytes_per_token_leave_out_the_end_of_text_after_each_document(tmp_path):
    """prepare and info divided by every token, one <|endoftext|> per document included, and the
    tokenizer's own figure (and GPT-2's next to it) did not: on many small files an own vocabulary
    was said to be worse than GPT-2's while it was better. Every figure counts the text alone."""
    (tmp_path / "many").mkdir()
    lines = [line for line in SONNETS.read_text().splitlines() if line.strip()]
    for i in range(0, 300, 3):
        (tmp_path / "many" / f"{i:04d}.txt").write_text("\n".join(lines[i:i + 3]) + "\n")
    m = prepare([str(tmp_path / "many")], tmp_path / "d", block_size=16, val_fraction=0.0, quiet=True, vocab_size=300)
    from mtgpt.data.manifest import bytes_per_token

    assert m["documents"] == 100 and m["text_bytes"] / m["tokens"] < bytes_per_token(m)
    assert bytes_per_token(m) == pytest.approx(tokenizer.load(tmp_path / "d").info["bytes_per_token"], rel=0.01)


def test_vocab_size_trains_one_on_the_same_text(tmp_path):
    m = prepare([str(SONNETS)], tmp_path / "d", block_size=16, val_fraction=0.0, quiet=True, vocab_size=300)
    tok = tokenizer.load(tmp_path / "d")
    assert m["tokenizer"]["name"] == "bpe-300" and tok.vocab_size == 300 and tok.info["trained_on"]["sources"] == 1
    assert stream_of(tmp_path / "d") == [*tok.encode(SONNETS.read_text()), tok.eot][:len(stream_of(tmp_path / "d"))]
    # said before it starts (outside a terminal there is no progress bar), and in the time prepare reports
    said: list[str] = []
    began = time.time()
    m = prepare([str(SONNETS)], tmp_path / "e", block_size=16, val_fraction=0.0, vocab_size=300, warn=said.append)
    took = time.time() - began
    assert said == ["note: training a 300-token BPE vocabulary on the text first (then tokenizing it)"]
    assert m["seconds"] >= 0.9 * took - 0.05  # the whole of it, training the tokenizer included


def test_a_gpt2_data_folder_is_unchanged(tiny_data):
    m = load_manifest(tiny_data)
    assert m["tokenizer"] == {**tokenizer.GPT2_IDENTITY, "files": []}
    assert not (tiny_data / "tokenizer.json").exists()


def test_two_ranks_train_sample_chat_eval(run512, data512):
    rows = [json.loads(line) for line in (run512 / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val] == [10, 20]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert abs(train[0] - math.log(512)) < 1.0 and train[-1] < train[0]
    # val/bpb = summed loss / ln 2 / the UTF-8 bytes of the very val tokens scored (both ranks' shares)
    m = load_manifest(data512)
    tok = tokenizer.for_folder(data512, m["tokenizer"])
    targets = torch.cat([load_val(data512, m, 8, r, 2, 512)[1] for r in range(2)])
    targets = targets[targets >= 0]  # a filler row's targets are -1, not scored
    nbytes = tok.byte_lengths[targets.numpy()].sum()
    for r in val:
        assert r["val/bpb"] == pytest.approx(r["val/loss"] * targets.numel() / math.log(2) / nbytes, rel=1e-6)
    config = json.loads((run512 / "config.json").read_text())
    assert config["vocab_size"] == 512 and tokenizer.same(config["tokenizer"], tok.identity())
    for folder in (run512, run512 / "best"):
        assert checkpoint.load_tokenizer(folder).ranks == tok.ranks
    out = run_mtgpt("sample", run512, "--prompt", "Shall I", "--max-new-tokens", "20", "--seed", "1").stdout
    assert out.startswith("Shall I") and len(out) > len("Shall I") + 10
    chat = run_mtgpt("chat", run512, "--seed", "1", "--max-new-tokens", "12", input="Hello 中文 🎉\n/quit\n").stdout
    assert "you> Hello 中文 🎉" in chat and "bot> " in chat
    ev = json.loads(run_mtgpt("eval", run512, SONNETS, "--json").stdout)[0]
    assert ev["tokens"] == len(tok.encode(SONNETS.read_text())) and ev["bytes"] == SONNETS.stat().st_size
    assert 0 < ev["bits_per_byte"] < 8 * math.log(512) / math.log(2)
    info = run_mtgpt("info", run512).stdout
    assert "tokenizer: bpe-512 (512 tokens" in info and "val bits per byte:" in info and "ln(512)" in info


def test_export_to_hugging_face_gives_the_same_ids_and_logits(run512, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_mtgpt("export", run512, "--hf", tmp_path / "hf")
    # a class transformers 4 has as well (setup.py allows it): 5 wrote "TokenizersBackend", which 4 refuses
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    tok = checkpoint.load_tokenizer(run512)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (MIXED, SONNETS.read_text()):
        assert theirs(text)["input_ids"] == tok.encode(text)
        assert theirs.decode(tok.encode(text)) == text
    assert theirs.eos_token_id == tok.eot == 511
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = checkpoint.load_model(run512)
    ids = torch.tensor([tok.encode(MIXED)[:32]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ours(ids)[0], atol=1e-4)
    # and back: --init-from-hf with data prepared with that folder's tokenizer
    data = tmp_path / "d"
    run_mtgpt("prepare", SONNETS, "--out", data, "--block-size", "32", "--tokenizer", tmp_path / "hf", "-q")
    assert tokenizer.same(load_manifest(data)["tokenizer"], tok.identity())
    from mtgpt.train import make_plan

    cfg = TrainConfig(data=str(data), out=str(tmp_path / "ft"), init_from_hf=str(tmp_path / "hf"),
                      model={**TINY, "vocab_size": 512})
    make_plan(cfg, world_size=1, cuda=False)


def test_a_model_and_data_of_other_tokenizers_are_refused(run512, data512, tiny_data, tmp_path):
    from mtgpt.train import make_plan

    proc = run_mtgpt("train", "--data", tiny_data, "--out", tmp_path / "ft", "--init-from", run512, check=False)
    one_error_line(proc, "reads tokenizer bpe-512 (512 tokens")
    assert f"prepare the data again with --tokenizer {run512}" in proc.stderr and not (tmp_path / "ft").exists()
    # the fix it names works: the GPT-2 text prepared with the run's tokenizer
    again = tmp_path / "again"
    run_mtgpt("prepare", SONNETS, "--out", again, "--block-size", "32", "--tokenizer", run512, "-q")
    make_plan(TrainConfig(data=str(again), out=str(tmp_path / "ft"), init_from=str(run512),
                          model={**TINY, "vocab_size": 512}), world_size=1, cuda=False)
    # a 512-token run resumed on GPT-2 data from the command line (the model is the run's), and on
    # data of another 512-token tokenizer
    proc = run_mtgpt("train", "--data", tiny_data, "--out", run512, "--resume", "auto", check=False)
    line = one_error_line(proc, "the run reads tokenizer bpe-512 (512 tokens")
    assert "the data was prepared with gpt2 (50,257 tokens" in line and f"prepare the data with --tokenizer {run512}" in line
    other = tmp_path / "other"
    prepare([str(SONNETS)], other, block_size=32, quiet=True, tok=tokenizer.train([SONNETS.read_text()[::-1]], 512))
    for data in (tiny_data, other):
        cfg = TrainConfig(data=str(data), out=str(run512), resume="auto", model={**TINY, "vocab_size": 512})
        with pytest.raises(ConfigError, match="cannot resume .* the run reads tokenizer bpe-512 .* the data was "
                                              "prepared with"):
            make_plan(cfg, world_size=2, cuda=False)


@pytest.mark.parametrize("args, match", [
    (["--vocab-size", "100"], "at least 257 tokens"),
    (["--vocab-size", "70000"], "at most 65,536 (shards store ids as uint16)"),
    (["--vocab-size", "8192"], "merges seen at least twice, so it fills"),
    (["--vocab-size", "300", "--tokenizer", "gpt2x"], "not both"),
    (["--tokenizer", "NOWHERE"], "no such tokenizer"),
    (["--tokenizer", "EMPTY"], "not a tokenizer"),
])
def test_bad_tokenizer_options_leave_nothing(tmp_path, args, match):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / a) if a in ("NOWHERE", "EMPTY") else a for a in args]
    proc = run_mtgpt("prepare", SONNETS, "--out", tmp_path / "d", *args, check=False)
    one_error_line(proc, match)
    assert not (tmp_path / "d").exists() and [p.name for p in tmp_path.iterdir()] == ["EMPTY"]


def test_tokenizer_train_bad_input(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    for inputs, match in (([tmp_path / "empty.txt"], "empty"), ([tmp_path / "bin.txt"], "binary"),
                          ([SONNETS], "merges seen at least twice")):
        proc = run_mtgpt("tokenizer", "train", *inputs, "--vocab-size", "8192", "--out", tmp_path / "t", check=False)
        one_error_line(proc, match)
        assert not (tmp_path / "t").exists()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep.txt").write_text("mine")
    proc = run_mtgpt("tokenizer", "train", SONNETS, "--vocab-size", "300", "--out", tmp_path / "t", check=False)
    one_error_line(proc, "not empty")
    assert (tmp_path / "t" / "keep.txt").read_text() == "mine"
    # invalid UTF-8 is replaced, and said as prepare says it (it was replaced without a word)
    (tmp_path / "bad.txt").write_bytes(SONNETS.read_bytes() + b"ab\xffcd\n" * 3)
    proc = run_mtgpt("tokenizer", "train", tmp_path / "bad.txt", "--vocab-size", "300", "--out", tmp_path / "t2")
    assert f"warning: {tmp_path / 'bad.txt'}: 3 invalid UTF-8 byte(s) replaced with U+FFFD (use --strict to refuse " \
        "such files)" in proc.stderr, proc.stderr


def test_stdin(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mtgpt", "tokenizer", "train", "-", "--vocab-size", "300", "--out",
                           str(tmp_path / "t")], input=SONNETS.read_bytes(), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert tokenizer.load(tmp_path / "t").info["measured_on_bytes"] == SONNETS.stat().st_size
    assert not list((tmp_path / "t").glob(".*"))
    proc = subprocess.run([sys.executable, "-m", "mtgpt", "prepare", "-", "--vocab-size", "300", "--out",
                           str(tmp_path / "d")], input=SONNETS.read_bytes(), capture_output=True, text=False, timeout=120)
    assert proc.returncode != 0 and b"not from stdin" in proc.stderr and not (tmp_path / "d").exists()


def test_data_folder_with_its_tokenizer_gone(data512, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(data512, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer.json: listed in manifest.json but missing"):
        load_manifest(broken)


def test_a_data_folders_replaced_tokenizer_is_refused_as_prepare_tokenizer(data512, tok_dir, tmp_path):
    """`prepare --tokenizer DATA_DIR` whose tokenizer.json was replaced by another tokenizer's used
    it without a word (train and info refuse that folder): the one it records is checked."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(data512, other)
    tokenizer.train([SONNETS.read_text()], 300).save(tmp_path / "t300")
    shutil.copy(tmp_path / "t300" / "tokenizer.json", other / "tokenizer.json")
    with pytest.raises(tokenizer.TokenizerError, match=rf"{other} records tokenizer bpe-512 .* but holds bpe-300"):
        tokenizer.load(other)
    with pytest.raises(DataError, match="records tokenizer bpe-512 .* but holds bpe-300"):
        prepare([str(SONNETS)], tmp_path / "d", block_size=32, tok=str(other), quiet=True)
    assert not (tmp_path / "d").exists() and tokenizer.load(data512).vocab_size == 512


def test_serve_reads_the_runs_tokenizer(run512):
    """mtgpt serve, through the official openai client: the greedy text is `mtgpt sample`'s, and
    the prompt is counted in the run's tokens."""
    from mtgpt.sample import SampleConfig, generate, load_for_inference
    from tests.test_serve import Served

    model, tok = load_for_inference(str(run512), False, "cpu")
    expected = generate(model, tok, "Shall I", SampleConfig(max_new_tokens=12, temperature=0, stop_at_eot=True))[0]
    served = Served(run512)
    try:
        got = served.client().completions.create(model="r512", prompt="Shall I", max_tokens=12, temperature=0)
        assert got.choices[0].text == expected and got.usage.prompt_tokens == len(tok.encode("Shall I"))
        status, body, _ = served.request("POST", "/v1/completions", {"model": "r512", "prompt": [600], "max_tokens": 1})
        assert status == 400 and "outside the vocabulary" in body["error"]["message"]
    finally:
        assert served.stop() == 0


def test_suggested_commands_quote_paths_with_spaces(tmp_path):
    """`tokenizer train --out "my tok"` said `--tokenizer my tok`, which a shell splits in two."""
    from click.testing import CliRunner

    from mtgpt.cli import main

    out = tmp_path / "my tok"
    result = CliRunner().invoke(main, ["tokenizer", "train", str(SONNETS), "--vocab-size", "300", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"--tokenizer '{out}' --out DATA_DIR" in result.output
