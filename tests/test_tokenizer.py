import socket

import pytest

from mtgpt import tokenizer


def test_known_ids_and_vocab():
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.EOT == 50256
    enc = tokenizer.get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.decode([tokenizer.EOT]) == "<|endoftext|>"


@pytest.mark.parametrize("text", [
    "Café naïve façade — déjà vu",
    "emoji 🎉🐍 and flags 🇫🇷",
    "中文字符和日本語のテキスト、한국어",
    "tabs\tand\nnewlines\r\n  spaces   ",
])
def test_roundtrip(text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_endoftext_in_text_is_ordinary():
    ids = tokenizer.encode("a <|endoftext|> b")
    assert tokenizer.EOT not in ids
    assert tokenizer.decode(ids) == "a <|endoftext|> b"


def test_no_network(monkeypatch):
    """Building the tokenizer from scratch touches no socket."""
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tokenizer.get_tokenizer.cache_clear()
    try:
        assert tokenizer.encode("offline") == tokenizer.get_tokenizer().encode_ordinary("offline")
        assert len(tokenizer.encode("The quick brown fox")) == 4
    finally:
        tokenizer.get_tokenizer.cache_clear()


def test_hash_mismatch_is_refused(monkeypatch, tmp_path):
    bad = tmp_path / "encoder.json"
    bad.write_text("{}")
    monkeypatch.setattr(tokenizer, "ENCODER_JSON", bad)
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="sha256"):
            tokenizer.get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()
