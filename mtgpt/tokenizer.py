"""The GPT-2 BPE tokenizer, offline.

The vocabulary files are OpenAI's GPT-2 release (`encoder.json`: 50257 tokens, `vocab.bpe`: 50000
merges), shipped as package data under `mtgpt/assets/gpt2/` and checked against the sha256 hashes
tiktoken pins for "gpt2". Encoding is tiktoken (Rust, ~13 MB/s per core), built from those files;
nothing is fetched at run time (`tiktoken.get_encoding("gpt2")` would download).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

ASSETS = Path(__file__).parent / "assets" / "gpt2"
ENCODER_JSON = ASSETS / "encoder.json"
VOCAB_BPE = ASSETS / "vocab.bpe"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

NAME = "gpt2"
VOCAB_SIZE = 50257
EOT = 50256  # <|endoftext|>, between documents
EOT_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer regex, as tiktoken's own gpt2 definition.
PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vocab_sha256() -> str:
    """One hash for the vocabulary, recorded in data manifests (sha256 of encoder.json)."""
    return ENCODER_JSON_SHA256


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding. Raises if the shipped files do not match the pinned hashes."""
    for path, want in ((ENCODER_JSON, ENCODER_JSON_SHA256), (VOCAB_BPE, VOCAB_BPE_SHA256)):
        got = _sha256(path)
        if got != want:
            raise RuntimeError(f"{path} has sha256 {got}, expected {want}: reinstall mtgpt")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(VOCAB_BPE), encoder_json_file=str(ENCODER_JSON),
        vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256,
    )
    enc = tiktoken.Encoding(NAME, pat_str=PAT, mergeable_ranks=ranks, special_tokens={EOT_TEXT: EOT})
    assert enc.n_vocab == VOCAB_SIZE, enc.n_vocab
    return enc


def encode(text: str) -> list[int]:
    """Text -> token ids. `<|endoftext|>` inside the text is ordinary text, never the special token."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids: list[int]) -> str:
    return get_tokenizer().decode(ids)
