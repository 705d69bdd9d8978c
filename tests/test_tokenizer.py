"""mtgpt.tokenizer in process: GPT-2's offline, and byte-level BPEs trained on text (round trips,
the trainer's and the encoder's cuts, the Hugging Face form, identities, bad input)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import regex

from mtgpt import tokenizer
from mtgpt.tokenizer import TokenizerError
from tests.conftest import SONNETS

GPT2 = tokenizer.gpt2()
TEXTS = [
    "Café naïve façade — déjà vu",
    "emoji 🎉🐍 and flags 🇫🇷 and a family 👨‍👩‍👧",
    "中文字符和日本語のテキスト、한국어",
    "tabs\tand\nnewlines\r\n  spaces   \n\n\n    indented\t\t\n",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\tif x != 0: pass\n",
    "invalid \ufffd replaced, <|endoftext|> is text, don't we'll I'm",
    "   leading and trailing   ",
    "",
]


@pytest.fixture(scope="module")
def own() -> tokenizer.Tokenizer:
    """512 tokens trained on the sonnets (12 KB)."""
    return tokenizer.train([SONNETS.read_text()], 512)


def test_gpt2_known_ids_and_vocab():
    assert GPT2.encode("Hello world") == [15496, 995]
    assert GPT2.eot == 50256 and GPT2.vocab_size == 50257 and GPT2.is_gpt2
    assert GPT2.decode([GPT2.eot]) == "<|endoftext|>"
    assert GPT2.identity() == tokenizer.GPT2_IDENTITY


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(own, text):
    for tok in (GPT2, own):
        assert tok.decode(tok.encode(text)) == text


def test_endoftext_in_text_is_ordinary(own):
    for tok in (GPT2, own):
        ids = tok.encode("a <|endoftext|> b")
        assert tok.eot not in ids and tok.decode(ids) == "a <|endoftext|> b"
        assert tok.prompt("") == [tok.eot]


def test_no_network(monkeypatch):
    """Building GPT-2's tokenizer from scratch, and training one, touch no socket."""
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tokenizer.gpt2.cache_clear()
    try:
        assert len(tokenizer.gpt2().encode("The quick brown fox")) == 4
        assert tokenizer.train(["offline text, offline text"] * 3, 260).vocab_size == 260
    finally:
        tokenizer.gpt2.cache_clear()


def test_hash_mismatch_is_refused(monkeypatch, tmp_path):
    bad = tmp_path / "encoder.json"
    bad.write_text("{}")
    monkeypatch.setattr(tokenizer, "ENCODER_JSON", bad)
    tokenizer.gpt2.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="sha256"):
            tokenizer.gpt2()
    finally:
        tokenizer.gpt2.cache_clear()


def test_trained_vocabulary(own):
    assert own.vocab_size == 512 and own.eot == 511 and own.name == "bpe-512" and not own.is_gpt2
    assert all(own.token_bytes(b) == bytes([b]) for b in range(256))  # every byte is a token
    text = SONNETS.read_text()
    assert len(own.encode(text)) < len(text.encode()) / 2  # it learnt merges: > 2 bytes per token
    assert own.byte_lengths[own.encode(text)].sum() == len(text.encode()) and own.byte_lengths[own.eot] == 0


def test_training_and_encoding_cut_text_identically(own):
    """The trainer's pre-tokenizer cuts text where tiktoken's regex does (nanochat #291 was these
    two differing), and the trainer's own BPE and mtgpt's encoder (tiktoken over the same
    vocabulary) give the same tokens."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    b2u = tokenizer.bytes_to_unicode()
    u2b = {c: b for b, c in b2u.items()}
    pre = tokenizer._pre_tokenizer(tokenizer.PAT)  # what tokenizer.train gives the trainer
    for text in TEXTS + [SONNETS.read_text()]:
        pieces = [bytes(u2b[c] for c in piece).decode("utf-8") for piece, _ in pre.pre_tokenize_str(text)]
        assert pieces == regex.findall(tokenizer.PAT, text)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre
    hf.train_from_iterator([SONNETS.read_text()], trainers.BpeTrainer(
        vocab_size=512, min_frequency=2, special_tokens=[tokenizer.EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    for text in TEXTS + [SONNETS.read_text()]:
        text = text.replace(tokenizer.EOT_TEXT, "")  # Hugging Face reads it as the special token
        theirs = [bytes(u2b[c] for c in t) for t in hf.encode(text).tokens]
        assert theirs == [own.token_bytes(i) for i in own.encode(text)]


def test_hugging_face_form_gives_the_same_ids(own, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    own.save(tmp_path / "tok")
    hf = HFTokenizer.from_file(str(tmp_path / "tok" / tokenizer.TOKENIZER_JSON))
    for text in TEXTS + [SONNETS.read_text()]:
        text = text.replace(tokenizer.EOT_TEXT, "")
        assert hf.encode(text).ids == own.encode(text)
        assert hf.decode(own.encode(text)) == text
    assert hf.token_to_id(tokenizer.EOT_TEXT) == own.eot and hf.get_vocab_size() == 512
    # the one difference, as with GPT-2's: Hugging Face reads the literal text as the special token
    assert hf.encode("x <|endoftext|>").ids == own.encode("x ") + [own.eot]


def test_save_and_load(own, tmp_path):
    own = tokenizer.Tokenizer(own.name, own.ranks, info={"bytes_per_token": 2.5})
    own.save(tmp_path / "tok")
    back = tokenizer.load(tmp_path / "tok")
    assert back.identity() == own.identity() and back.ranks == own.ranks and back.info == own.info
    assert tokenizer.load(tmp_path / "tok" / tokenizer.TOKENIZER_JSON).sha256 == own.sha256
    info = json.loads((tmp_path / "tok" / tokenizer.INFO_JSON).read_text())
    assert info["sha256"] == own.sha256 and info["vocab_size"] == 512
    assert tokenizer.load("gpt2").is_gpt2
    GPT2.save(tmp_path / "g")  # GPT-2's writes no file: a folder without one means GPT-2
    assert not (tmp_path / "g" / tokenizer.TOKENIZER_JSON).exists() and tokenizer.for_folder(tmp_path / "g").is_gpt2


def test_gpt2_in_hugging_face_form_is_gpt2(tmp_path):
    """GPT-2's tokenizer.json as transformers writes it (ByteLevel with its own regex) is GPT-2's."""
    from mtgpt import hf

    hf.hf_tokenizer().save_pretrained(tmp_path)
    assert tokenizer.load(tmp_path).is_gpt2


def test_identity_depends_on_every_token(own):
    ranks = dict(own.ranks)
    a, b = (t for t, r in ranks.items() if r in (300, 301))
    ranks[a], ranks[b] = ranks[b], ranks[a]
    swapped = tokenizer.Tokenizer("bpe-512", ranks)
    assert swapped.sha256 != own.sha256 and not tokenizer.same(swapped.identity(), own.identity())


@pytest.mark.parametrize("size", [256, 100, 65537, 10**6])
def test_vocab_size_out_of_range(size):
    with pytest.raises(TokenizerError, match="at least 257 tokens .* at most 65,536"):
        tokenizer.train(["some text"], size)


def test_vocab_larger_than_the_text_can_fill():
    with pytest.raises(TokenizerError, match=r"the text has only \d+ merges seen at least twice, so it fills "
                                             r"\d+ of the 4,096 tokens asked for; ask for --vocab-size \d+ or fewer"):
        tokenizer.train([SONNETS.read_text()[:2000]], 4096)


def test_runs_without_whitespace_are_seen_in_bounded_pieces():
    """BpeTrainer's time grows with the longest word: a 1 MB run of letters held a 512-token
    training for over 400 s. Training sees such runs cut to LONGEST_WORD; all the text, in order;
    ordinary text is one piece, as it was."""
    import random

    text = SONNETS.read_text()
    assert list(tokenizer._bounded_words(text)) == [text]
    blob = "".join(random.Random(0).choice("abcdefghij") for _ in range(100_000))
    mixed = text + " x" + blob + "\n" + text
    pieces = list(tokenizer._bounded_words(mixed))
    assert "".join(pieces) == mixed and len(pieces) > 100_000 // tokenizer.LONGEST_WORD
    assert max(len(w) for p in pieces for w in p.split()) == tokenizer.LONGEST_WORD
    own = tokenizer.train([mixed], 400)  # (it learns from the blob's letters too)
    assert own.encode(mixed) and own.decode(own.encode(mixed)) == mixed


def test_empty_text_refused():
    with pytest.raises(TokenizerError, match="the text is empty"):
        tokenizer.train(["", ""], 300)


INTERRUPTED_IN_MERGES = """
import os, random, signal, threading, time
from mtgpt import tokenizer
random.seed(0)
words = ["".join(random.choices("abcdefghijklmnopqrstuvwxyz", k=random.randint(3, 10))) for _ in range(100_000)]
sent = []
def texts():
    for _ in range(300):
        yield " ".join(random.choices(words, k=2000))
    def interrupt():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)
    threading.Timer(0.5, interrupt).start()  # the text is read: tokenizers is merging (2-3 s here)
try:
    tokenizer.train(texts(), 30_000)
    print("finished")
except KeyboardInterrupt:
    print(f"interrupted {time.perf_counter() - sent[0]:.2f}")
"""


def test_ctrl_c_stops_training_in_the_merge_phase():
    """Ctrl-C in tokenizers' Rust merge loop (minutes on a large corpus) is taken at once; it
    waited for the loop to end (2-3 s after the signal on this corpus)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", INTERRUPTED_IN_MERGES], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.stdout.startswith("interrupted"), (out.stdout, out.stderr[-2000:])
    assert float(out.stdout.split()[1]) < 0.5, out.stdout


def test_an_error_reading_the_text_is_raised():
    def texts():
        yield SONNETS.read_text()
        raise OSError("the disk went away")
    with pytest.raises(OSError, match="the disk went away"):
        tokenizer.train(texts(), 300)


def test_not_a_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="not a tokenizer"):
        tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        tokenizer.load(tmp_path / "missing")
    (tmp_path / tokenizer.TOKENIZER_JSON).write_text("{not json")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        tokenizer.load(tmp_path)
    wordpiece = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Whitespace"}}
    (tmp_path / tokenizer.TOKENIZER_JSON).write_text(json.dumps(wordpiece))
    with pytest.raises(TokenizerError, match="not a byte-level BPE"):
        tokenizer.load(tmp_path)


def test_folder_holding_another_tokenizer_than_recorded(own, tmp_path):
    own.save(tmp_path)
    with pytest.raises(TokenizerError, match=r"records tokenizer gpt2 .* but holds bpe-512"):
        tokenizer.for_folder(tmp_path, tokenizer.GPT2_IDENTITY)
    (tmp_path / tokenizer.TOKENIZER_JSON).unlink()
    with pytest.raises(TokenizerError, match=r"records tokenizer bpe-512 .* \(tokenizer.json is missing\)"):
        tokenizer.for_folder(tmp_path, own.identity())
    # tokenizer.json replaced by another tokenizer's, tokenizer_info.json left: the name is the file's, not the info's
    other = tokenizer.train([SONNETS.read_text()], 300)
    (tmp_path / tokenizer.TOKENIZER_JSON).write_text(other.hf_json)
    with pytest.raises(TokenizerError, match=r"records tokenizer bpe-512 \(512 tokens, .*\) but holds bpe-300 \(300 tokens"):
        tokenizer.for_folder(tmp_path, own.identity())


def test_encoding_numpy_matches_list(own):
    text = SONNETS.read_text()
    assert np.array_equal(own.encode_to_numpy(text), np.array(own.encode(text)))


def test_a_folder_saved_before_tokenizers_were_recorded_is_gpt2s(tmp_path):
    """A run (config.json) or data folder (manifest.json) of an mtgpt that had only GPT-2's
    tokenizer records none: `--tokenizer OLD_RUN` was refused as "not a tokenizer", though the
    error of a fine-tune from that run named it as the fix, and sample/eval read it as GPT-2's.
    A Hugging Face folder without tokenizer.json, and a run with no model yet, are still refused."""
    run, data, hf, empty_run = (tmp_path / n for n in ("run", "data", "hf", "empty_run"))
    for folder in (run, data, hf, empty_run):
        folder.mkdir()
    (run / "config.json").write_text(json.dumps({"model_type": "mtgpt", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64,
                                                 "vocab_size": 50257}))
    (data / "manifest.json").write_text(json.dumps({"splits": {"train": {}, "val": {}}, "vocab_size": 50257}))
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    (empty_run / "train_config.json").write_text("{}")
    for folder in (run, data):
        assert tokenizer.load(folder).name == "gpt2"
    for folder in (hf, empty_run):
        with pytest.raises(TokenizerError, match="not a tokenizer"):
            tokenizer.load(folder)
