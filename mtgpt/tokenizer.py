"""Tokenizers: GPT-2's BPE (the default, offline) and byte-level BPEs trained on your own text.

Every tokenizer here is a byte-level BPE in tiktoken's terms: GPT-2's regex (`PAT`) cuts text
into pieces, every token is a byte string with a rank (the 256 single bytes among them, so any
text encodes and decodes back exactly), and `<|endoftext|>` is the one special token, the last
id. Encoding is tiktoken (Rust; its threads release the GIL, ~13 MB/s per core).

- GPT-2's files (`encoder.json`: 50257 tokens, `vocab.bpe`: 50000 merges) ship as package data
  under `mtgpt/assets/gpt2/`, checked against the sha256 hashes tiktoken pins for "gpt2";
  nothing is fetched at run time (`tiktoken.get_encoding("gpt2")` would download).
- `train()` makes one from text with Hugging Face `tokenizers`' BpeTrainer, whose pre-tokenizer
  is the same regex (a `Split`), so training and encoding cut text identically.
- On disk a tokenizer is `tokenizer.json` in Hugging Face's format (what `tokenizers` and
  `AutoTokenizer` read), with every merge tiktoken's ranks imply and `ignore_merges`, so both give
  the same ids, plus `tokenizer_info.json` (its identity and the text it was trained on). GPT-2's
  is never written: a data or model folder without `tokenizer.json` uses GPT-2's.

Identity: `identity()` = {"name", "vocab_size", "sha256"}, recorded in data manifests and model
folders; two tokenizers are the same when their sha256 is (a hash of the regex, the ranked tokens
and the special; GPT-2 keeps the sha256 of its encoder.json, which older manifests record).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from mtgpt.folders import TOKENIZER_JSON

ASSETS = Path(__file__).parent / "assets" / "gpt2"
ENCODER_JSON = ASSETS / "encoder.json"
VOCAB_BPE = ASSETS / "vocab.bpe"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

GPT2 = "gpt2"
GPT2_VOCAB_SIZE = 50257
EOT_TEXT = "<|endoftext|>"  # between documents; the last id of every tokenizer here
# GPT-2's pre-tokenizer regex, as tiktoken's own gpt2 definition.
PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
MIN_VOCAB = 257  # the 256 bytes and <|endoftext|>
LONGEST_WORD = 256  # characters of one run without whitespace that training sees whole (_bounded_words)
_LONG_RUN = re.compile(r"\S{%d,}" % (LONGEST_WORD + 1))
MAX_VOCAB = 1 << 16  # shards store ids as uint16
GPT2_IDENTITY = {"name": GPT2, "vocab_size": GPT2_VOCAB_SIZE, "sha256": ENCODER_JSON_SHA256}
INFO_JSON = "tokenizer_info.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be made or used. The message says why and what to do."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as byte-level BPE files (vocab, merges) write them."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


class Tokenizer:
    """A byte-level BPE: `ranks` (token bytes -> id, ids 0..V-2) plus <|endoftext|> = V - 1."""

    def __init__(self, name: str, ranks: dict[bytes, int], pattern: str = PAT, sha256: str | None = None,
                 info: dict[str, Any] | None = None):
        self.name, self.ranks, self.pattern = name, ranks, pattern
        self.info = dict(info or {})  # tokenizer_info.json beyond the identity: what it was trained on
        self.eot = len(ranks)
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise TokenizerError(f"tokenizer {name}: its token ids are not 0..{len(ranks) - 1}")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise TokenizerError(f"tokenizer {name}: not byte-level (some of the 256 single bytes have no token), "
                                 "so some text could not be encoded")
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT_TEXT: self.eot})
        self.sha256 = sha256 or content_sha256(ranks, pattern)

    @property
    def vocab_size(self) -> int:
        return self.eot + 1

    @property
    def is_gpt2(self) -> bool:
        return self.sha256 == ENCODER_JSON_SHA256

    def identity(self) -> dict[str, Any]:
        """What data manifests and model folders record; `same` compares these."""
        return {"name": self.name, "vocab_size": self.vocab_size, "sha256": self.sha256}

    def encode(self, text: str) -> list[int]:
        """Text -> ids. `<|endoftext|>` inside the text is ordinary text, never the special token."""
        return self.enc.encode_ordinary(text)

    def prompt(self, text: str) -> list[int]:
        """The ids a model continues: `text`'s, or <|endoftext|> alone (a new document) for ""."""
        return self.encode(text) or [self.eot]

    def encode_to_numpy(self, text: str) -> np.ndarray:
        return self.enc.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_bytes(self, token: int) -> bytes:
        return self.enc.decode_single_token_bytes(token)

    @functools.cached_property
    def byte_lengths(self) -> np.ndarray:
        """(vocab_size,) UTF-8 bytes of each token's text; <|endoftext|> counts 0 (it is no text).
        Bits per byte divide by the sum of these over the scored tokens."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, rank in self.ranks.items():
            out[rank] = len(token)
        return out

    @functools.cached_property
    def hf_json(self) -> str:
        """This tokenizer as Hugging Face `tokenizer.json` text (see `hf_tokenizer`)."""
        return hf_tokenizer(self).to_str(pretty=True)

    def save(self, folder: str | Path) -> Path:
        """Write `folder`/tokenizer.json and tokenizer_info.json (each to a temp name, then renamed).
        GPT-2's needs no file: a folder without tokenizer.json means GPT-2."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.is_gpt2:
            for name in (TOKENIZER_JSON, INFO_JSON):  # a folder written before by another tokenizer
                (folder / name).unlink(missing_ok=True)
            return folder
        path = folder / TOKENIZER_JSON
        if not path.is_file() or path.read_text(encoding="utf-8") != self.hf_json:  # saved at every checkpoint
            _write_atomic(path, self.hf_json)
        info = json.dumps({**self.identity(), "pattern": self.pattern, **self.info}, indent=2) + "\n"
        if not (folder / INFO_JSON).is_file() or (folder / INFO_JSON).read_text(encoding="utf-8") != info:
            _write_atomic(folder / INFO_JSON, info)
        return folder


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def content_sha256(ranks: dict[bytes, int], pattern: str) -> str:
    """A hash of what decides the ids: the regex, the tokens in rank order and the special."""
    h = hashlib.sha256(json.dumps({"pattern": pattern, "special": {EOT_TEXT: len(ranks)}}).encode())
    for token in sorted(ranks, key=ranks.__getitem__):
        h.update(token.hex().encode() + b"\n")
    return h.hexdigest()


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Do two identities (`Tokenizer.identity()`, a manifest's "tokenizer") name the same tokenizer?"""
    return a.get("sha256") == b.get("sha256") and a.get("vocab_size") == b.get("vocab_size")


def describe(identity: dict[str, Any]) -> str:
    return f"{identity['name']} ({identity['vocab_size']:,} tokens, sha256 {identity['sha256'][:12]})"


# ----------------------------------------------------------------------------- GPT-2


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def gpt2() -> Tokenizer:
    """GPT-2's tokenizer. Raises if the shipped files do not match the pinned hashes."""
    for path, want in ((ENCODER_JSON, ENCODER_JSON_SHA256), (VOCAB_BPE, VOCAB_BPE_SHA256)):
        got = _sha256(path)
        if got != want:
            raise RuntimeError(f"{path} has sha256 {got}, expected {want}: reinstall mtgpt")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(VOCAB_BPE), encoder_json_file=str(ENCODER_JSON),
        vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256,
    )
    tok = Tokenizer(GPT2, ranks, PAT, sha256=ENCODER_JSON_SHA256)
    assert tok.vocab_size == GPT2_VOCAB_SIZE, tok.vocab_size
    return tok


@functools.lru_cache(maxsize=1)
def _gpt2_content_sha256() -> str:
    return content_sha256(gpt2().ranks, PAT)




# ----------------------------------------------------------------------------- Hugging Face format


def _pre_tokenizer(pattern: str):
    """The regex, then bytes to GPT-2's printable stand-ins: how `tokenizers` cuts text like tiktoken."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def hf_tokenizer(tok: Tokenizer):
    """A `tokenizers.Tokenizer` that gives `tok`'s ids: a BPE whose merges are every split of every
    token into two tokens, ordered by the rank of the token they make (tiktoken merges the pair
    whose concatenation ranks lowest, whatever pair made it in training; transformers converts
    tiktoken files the same way), and `ignore_merges` (a piece that is a token is taken whole, as
    tiktoken does)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, processors

    b2u = bytes_to_unicode()
    text = {token: "".join(b2u[b] for b in token) for token in tok.ranks}
    merges = []
    for token, rank in tok.ranks.items():
        for i in range(1, len(token)):
            left, right = tok.ranks.get(token[:i]), tok.ranks.get(token[i:])
            if left is not None and right is not None:
                merges.append((rank, left, right, text[token[:i]], text[token[i:]]))
    merges.sort()
    vocab = {text[token]: rank for token, rank in tok.ranks.items()}
    vocab[EOT_TEXT] = tok.eot
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], fuse_unk=False,
                                ignore_merges=True))
    hf.pre_tokenizer = _pre_tokenizer(tok.pattern)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    return hf


def _pattern_of(pre: dict[str, Any] | None) -> str | None:
    """The regex of a byte-level pre-tokenizer in tokenizer.json: ours (Split + ByteLevel without
    its regex) or GPT-2's (ByteLevel with its own regex, which cuts as PAT does)."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return PAT
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if (isinstance(steps, list) and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and isinstance(steps[0].get("pattern"), dict) and "Regex" in steps[0]["pattern"]
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space")):
        return steps[0]["pattern"]["Regex"]
    return None


def from_hf_json(text: str, where: str) -> Tokenizer:
    """A Tokenizer from Hugging Face `tokenizer.json` text: a byte-level BPE with <|endoftext|> as
    its last id (what mtgpt writes, and GPT-2's). Anything else is refused, saying why."""
    try:
        data = json.loads(text)
        model = data["model"]
    except (ValueError, KeyError, TypeError):
        raise TokenizerError(f"{where}: not a Hugging Face tokenizer.json") from None
    pattern = _pattern_of(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pattern is None or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{where}: not a byte-level BPE with GPT-2's way of cutting text (mtgpt uses "
                             "those only); make one with `mtgpt tokenizer train`")
    u2b = _unicode_to_bytes()
    vocab = dict(model["vocab"])
    for added in data.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    eot = vocab.pop(EOT_TEXT, None)
    if eot != len(vocab):
        raise TokenizerError(f"{where}: {EOT_TEXT} must be its last token (id {len(vocab)}), got id {eot}")
    try:
        ranks = {bytes(u2b[c] for c in token): rank for token, rank in vocab.items()}
    except KeyError:
        raise TokenizerError(f"{where}: has tokens that are not byte-level BPE tokens (or special tokens "
                             f"besides {EOT_TEXT}); mtgpt cannot use it") from None
    if len(ranks) == GPT2_VOCAB_SIZE - 1 and pattern == PAT and content_sha256(ranks, pattern) == _gpt2_content_sha256():
        return gpt2()
    info, path = {}, Path(where).with_name(INFO_JSON)
    if path.is_file():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    if not isinstance(info, dict):  # (notes about the tokenizer: not what it is; any other JSON is dropped)
        info = {}
    if info.get("sha256") not in (None, content_sha256(ranks, pattern)):
        info = {}  # written for another tokenizer (tokenizer.json replaced since): its name would be wrong
    name = info.get("name") or f"bpe-{len(ranks) + 1}"
    info = {k: v for k, v in info.items() if k not in ("name", "vocab_size", "sha256", "pattern")}
    return Tokenizer(name, ranks, pattern, info=info)


def recorded(folder: str | Path) -> dict[str, Any] | None:
    """The tokenizer identity a data folder's manifest.json or a model folder's config.json records
    (None when neither records one)."""
    folder = Path(folder)
    for name in ("manifest.json", "config.json"):
        try:
            found = json.loads((folder / name).read_text()).get("tokenizer")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(found, dict) and "sha256" in found:
            return found
    return None


def _saved_before_tokenizers(folder: Path) -> bool:
    """A model (run, best/) or data folder of an mtgpt that had only GPT-2's tokenizer: its
    config.json (model_type mtgpt, not Hugging Face's gpt2) or manifest.json records none, and no
    tokenizer.json is beside it. (Sample, eval and --init-from read such a run as GPT-2's; a
    --tokenizer of it was refused, and the error that asked for it named it as the fix.)"""
    if (folder / TOKENIZER_JSON).exists():
        return False
    for name, mtgpt_keys in (("config.json", "n_embd"), ("manifest.json", "splits")):
        try:
            found = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(found, dict) and mtgpt_keys in found and found.get("model_type", "mtgpt") == "mtgpt" \
                and "tokenizer" not in found:
            return True
    return False


def load(spec: str | Path) -> Tokenizer:
    """`gpt2`; a folder: a tokenizer folder (`mtgpt tokenizer train`), or a data, run or model
    folder (its own tokenizer: GPT-2's if it records that), or a Hugging Face folder holding
    tokenizer.json; or a tokenizer.json file."""
    if str(spec) == GPT2:
        return gpt2()
    path = Path(spec)
    if path.is_dir():
        if (found := recorded(path)) is not None:  # a data or run folder: the tokenizer it records, checked
            return for_folder(path, found)
        if _saved_before_tokenizers(path):
            return gpt2()
        path = path / TOKENIZER_JSON
        if not path.is_file():
            raise TokenizerError(f"{spec}: not a tokenizer (no {TOKENIZER_JSON} in it); give gpt2, or a folder made by "
                                 "`mtgpt tokenizer train` (or a data or run folder, to use its tokenizer)")
    elif not path.is_file():
        raise TokenizerError(f"{spec}: no such tokenizer; give gpt2, or a folder made by `mtgpt tokenizer train`")
    return _read(path)


def _read(path: Path) -> Tokenizer:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot be read ({e})") from None
    return from_hf_json(text, str(path))


def for_folder(folder: str | Path, identity: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer of a data or model folder: its tokenizer.json, or GPT-2's when it has none.
    `identity` (what its manifest or config.json records) is checked against what is found."""
    folder = Path(folder)
    tok = _read(folder / TOKENIZER_JSON) if (folder / TOKENIZER_JSON).is_file() else gpt2()
    if identity is not None and not same(identity, tok.identity()):
        missing = "" if (folder / TOKENIZER_JSON).is_file() else f" ({TOKENIZER_JSON} is missing)"
        raise TokenizerError(f"{folder} records tokenizer {describe(identity)} but holds {describe(tok.identity())}"
                             f"{missing}; restore its {TOKENIZER_JSON}, or make the folder again")
    return tok


# ----------------------------------------------------------------------------- training


def train(texts: Iterable[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (the 256 bytes, merges seen at least twice, and
    <|endoftext|>), trained on `texts` with Hugging Face `tokenizers` (GPT-2's regex first)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = _pre_tokenizer(PAT)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    seen = 0

    def counted():
        nonlocal seen
        for text in texts:
            seen += len(text)
            yield from _bounded_words(text)

    _interruptible(lambda: hf.train_from_iterator(counted(), trainer))
    if seen == 0:
        raise TokenizerError("the text is empty: give files with text in them")
    vocab = hf.get_vocab()
    if len(vocab) < vocab_size:
        raise TokenizerError(f"the text has only {len(vocab) - MIN_VOCAB:,} merges seen at least twice, so it fills "
                             f"{len(vocab):,} of the {vocab_size:,} tokens asked for; ask for --vocab-size "
                             f"{len(vocab)}" + (" (bytes only, no merges)" if len(vocab) <= MIN_VOCAB else " or fewer") +
                             ", or give more text")
    u2b = _unicode_to_bytes()
    vocab.pop(EOT_TEXT)
    by_id = sorted(vocab, key=vocab.__getitem__)
    tokens = [bytes([b]) for b in range(256)] + [t for t in (bytes(u2b[c] for c in s) for s in by_id) if len(t) > 1]
    return Tokenizer(f"bpe-{vocab_size}", {t: i for i, t in enumerate(tokens)})


def _bounded_words(text: str) -> Iterable[str]:
    """`text` in pieces in which no run without whitespace is longer than LONGEST_WORD characters
    (the runs cut where they exceed it): BpeTrainer's time grows with the longest word, and one
    minified or unbroken 1 MB run in a corpus held a 512-token training for over 400 s (the 5 MB
    Shakespeare alone: 4 s). Ordinary text passes as one piece."""
    at = 0
    for run in _LONG_RUN.finditer(text):
        if run.start() > at:
            yield text[at:run.start()]
        yield from (text[i:min(i + LONGEST_WORD, run.end())] for i in range(run.start(), run.end(), LONGEST_WORD))
        at = run.end()
    if at < len(text):
        yield text[at:]


_UNFINISHED: list[threading.Event] = []  # one per training whose thread may still be inside tokenizers' code


def _interruptible(work) -> None:
    """Run `work` in a thread while this one waits: Python runs a Ctrl-C (or SIGTERM) handler only in
    the main thread, between bytecodes, so while tokenizers' Rust merge loop ran (minutes on a large
    corpus) Ctrl-C did nothing until it ended. The loop releases the GIL, so the wait here is
    interrupted at once; the thread is a daemon, which cannot be stopped: a process that goes on to
    exit asks training_in_background first. An error in `work` is raised here."""
    failed: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            work()
        except BaseException as e:  # raised in the caller's thread below
            failed.append(e)
        finally:
            done.set()

    _UNFINISHED.append(done)
    threading.Thread(target=run, name="bpe-train", daemon=True).start()
    while not done.wait(0.1):  # (not Thread.join: interrupted, it can mark a running thread as ended)
        pass
    _UNFINISHED.remove(done)
    if failed:
        raise failed[0]


def training_in_background() -> bool:
    """Whether an interrupted training still runs in its thread. The process must then end with
    os._exit, not Python's exit: the thread, inside tokenizers' Rust code when the interpreter shut
    down, aborted the process ("FATAL: exception not rethrown", SIGABRT) where Ctrl-C ends it with 130."""
    return any(not done.is_set() for done in _UNFINISHED)


def check_vocab_size(vocab_size: int) -> None:
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise TokenizerError(f"--vocab-size {vocab_size}: a byte-level BPE has at least {MIN_VOCAB} tokens (the 256 "
                             f"bytes and {EOT_TEXT}) and at most {MAX_VOCAB:,} (shards store ids as uint16); "
                             "pick one between, e.g. 8192")

