"""Text -> webdataset tar shards of token ids, streaming, in bounded memory.

Pipeline: sources are read in chunks cut at line breaks (`sources.read_chunks`); threads decode
and tokenize the chunks (tiktoken releases the GIL, so threads scale across cores without
copying text between processes); the main thread, in input order, cuts the token stream into
samples of block_size + 1 tokens, sends each to the train or val split, and writes records of
`SAMPLES_PER_RECORD` samples (a split's last record: the rest) with webdataset's ShardWriter.
Output goes to a temporary folder beside `--out` that is renamed into place only when complete.

The tokenizer is GPT-2's, one given (`--tokenizer TOK_DIR`), or one trained here on the same
inputs first (`--vocab-size N`, see `train_tokenizer`); an own one is saved in the data folder and
the manifest records it (mtgpt.tokenizer). Only the tokenizer's ids differ: chunking, documents and
splits are the same rules for all (every tokenizer here cuts text with GPT-2's regex).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from mtgpt import __version__, folders, tokenizer
from mtgpt.config import seed_problem
from mtgpt.data.manifest import FORMAT, MANIFEST, sha256_file
from mtgpt.data.sources import DataError, Source, decode_utf8, read_chunks, replaced_warning, resolve_sources
from mtgpt.tokenizer import Tokenizer, TokenizerError

SAMPLES_PER_RECORD = 16  # samples per tar member: amortises tar's per-member cost (~50 us)
CHUNK_BYTES = 4 << 20  # text per tokenizer task


@dataclass
class SplitWriter:
    """Writes one split's records to `{split}-NNNNNN.tar` shards and remembers each shard."""

    folder: Path
    split: str
    shard_bytes: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    _writer: Any = None  # a webdataset.ShardWriter
    _records: int = 0
    _in_shard: int = 0
    _pending: np.ndarray | None = None
    _pending_mask: np.ndarray | None = None

    def add(self, samples: np.ndarray, masks: np.ndarray | None = None) -> None:
        """samples: (n, block_size + 1) uint16, and with loss masks (chat) their (n, block_size + 1)
        bool masks (always, or never); written in records of SAMPLES_PER_RECORD."""
        if self._pending is not None and len(self._pending):
            samples = np.concatenate([self._pending, samples])
            if masks is not None:
                masks = np.concatenate([self._pending_mask, masks])
        full = len(samples) - len(samples) % SAMPLES_PER_RECORD
        for i in range(0, full, SAMPLES_PER_RECORD):
            self._write(samples[i:i + SAMPLES_PER_RECORD], None if masks is None else masks[i:i + SAMPLES_PER_RECORD])
        self._pending = samples[full:].copy()
        self._pending_mask = None if masks is None else masks[full:].copy()

    def _write(self, record: np.ndarray, mask: np.ndarray | None = None) -> None:
        sample = {"__key__": f"{self._records:09d}", "tokens.u16": record.astype("<u2").tobytes()}
        if mask is not None:  # one byte per token: 1 = train on it as a target
            sample["mask.u8"] = mask.astype(np.uint8).tobytes()
        if self._writer is None:  # lazily: ShardWriter opens its first file at construction
            import webdataset as wds  # (here: it imports torch, seconds a mistyped TEXT... need not wait)

            pattern = str(self.folder.absolute() / f"{self.split}-%06d.tar")  # (never taken for a URL)
            # ShardWriter counts the members' bytes; a member takes a 512-byte header and is padded
            # to 512 on disk (a record of 16 x 65 tokens: 2,080 bytes in 3,072): --shard-size is the
            # files' size. (A float mtime added a 1 KB PAX header to every member: 4,096.)
            data = sum(len(v) for k, v in sample.items() if k != "__key__")
            disk = sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")
            self._writer = wds.ShardWriter(pattern, maxsize=max(1, self.shard_bytes * data // disk), maxcount=10**9,
                                           post=self._finished, verbose=0, mtime=0)
        self._writer.write(sample)
        self._records += 1
        self._in_shard += len(record)
        self.samples += len(record)

    def _finished(self, fname: str) -> None:
        # Called by ShardWriter when a shard is closed, before the record that overflowed it is
        # written, so _in_shard counts exactly this shard's samples.
        path = Path(fname)
        self.shards.append({"file": path.name, "samples": self._in_shard, "bytes": path.stat().st_size,
                            "sha256": sha256_file(path)})
        self._in_shard = 0

    def close(self) -> None:
        if self._pending is not None and len(self._pending):
            self._write(self._pending, self._pending_mask)
            self._pending = self._pending_mask = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def abort(self) -> None:
        """Close the open shard's file, unfinished (its folder is about to be removed): a tar
        stream left open would write to its closed file when garbage-collected."""
        if self._writer is not None and self._writer.tarstream is not None:
            self._writer.tarstream.close()
        self._writer = None


@contextmanager
def _aborted_on_error(writers: dict[str, SplitWriter]) -> Iterator[None]:
    try:
        yield
    except BaseException:  # an error, or Ctrl-C
        for w in writers.values():
            w.abort()
        raise


class ValSelector:
    """Sends evenly spaced samples to val: sample i is val when i * fraction + phase crosses an
    integer. The phase comes from the seed. Evenly spaced (not random) val samples cover every
    part of the corpus, and n samples give n * fraction val samples, give or take one."""

    def __init__(self, fraction: float, seed: int):
        self.fraction = fraction
        self.phase = random.Random(seed).random()
        self.seen = 0

    def __call__(self, n: int) -> np.ndarray:
        i = np.arange(self.seen, self.seen + n, dtype=np.float64)
        self.seen += n
        return np.floor((i + 1) * self.fraction + self.phase) > np.floor(i * self.fraction + self.phase)


def _separator_pattern(doc_separator: str | None) -> re.Pattern | None:
    if not doc_separator:
        return None
    return re.compile(r"^" + re.escape(doc_separator) + r"[ \t\r]*(?:\n|\Z)", re.MULTILINE)


def _tokenize(tok: Tokenizer, data: bytes, where: str, offset: int, strict: bool, sep: re.Pattern | None
              ) -> tuple[list[np.ndarray], int]:
    """One chunk -> (the ids of each piece between document separator lines, bad bytes)."""
    text, replaced = decode_utf8(data, strict, where, offset)
    pieces = sep.split(text) if sep else [text]
    return [tok.encode_to_numpy(piece) for piece in pieces], replaced


class Documents:
    """Joins the tokenized pieces of the chunks, in input order, into one stream with
    <|endoftext|> after each document. A document ends at a separator line and at the end of its
    source; one with no text (before a separator that starts a file, between two separators in
    a row, after one that ends a file) adds nothing, wherever the chunk boundaries fall."""

    def __init__(self, eot: int):
        self.count, self.eot = 0, eot
        self._open = False  # the current document has text

    def join(self, pieces: list[np.ndarray], source_ends: bool) -> np.ndarray:
        parts: list[np.ndarray] = []
        for i, ids in enumerate(pieces):
            if i > 0:  # a separator line stood between this piece and the one before
                self._end(parts)
            if len(ids):
                parts.append(ids)
                self._open = True
        if source_ends:
            self._end(parts)
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)).astype(np.uint16)

    def _end(self, parts: list[np.ndarray]) -> None:
        if self._open:
            parts.append(np.array([self.eot], dtype=np.uint32))
            self.count += 1
            self._open = False


def _chunks(sources: list[Source], separator: str | None):
    """(source index, offset, bytes, last chunk of its source?) in input order."""
    for i, src in enumerate(sources):
        last = None
        for offset, data in read_chunks(src, CHUNK_BYTES, separator):
            if last is not None:
                yield i, last[0], last[1], False
            last = (offset, data)
        if last is not None:
            yield i, last[0], last[1], True


def prepare(
    inputs: list[str],
    out: str | Path,
    block_size: int = 512,
    val_fraction: float = 0.01,
    seed: int = 1337,
    shard_size_mb: float = 100.0,
    overwrite: bool = False,
    strict: bool = False,
    doc_separator: str | None = None,
    glob: str | None = None,
    workers: int | None = None,
    quiet: bool = False,
    warn: Callable[[str], None] = print,
    fmt: str = "text",
    tok: str | Path | Tokenizer | None = None,
    vocab_size: int | None = None,
    train_on: str | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` into shards under `out`; returns the manifest (also in out/manifest.json).

    fmt "chat": the inputs are dialogue files (chatterbot YAML, or JSONL of {"messages": [...]});
    each conversation, in the chat template (see mtgpt.chat), starts its own sample, stored with
    a loss mask: train_on "bot" (None: the default) trains on the bot's replies only, "all" on
    every token (`_write_chat_shards`); plain text has no train_on.
    tok: "gpt2" (None: the default), a tokenizer folder, or a Tokenizer; vocab_size: train one of
    this size on the inputs instead (the text is read twice, so not from stdin)."""
    if block_size < 1:
        raise DataError(f"--block-size must be positive, got {block_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if (problem := seed_problem(seed)) is not None:  # (any int was taken, and recorded in manifest.json)
        raise DataError(f"--seed {problem}")
    if not 0 < shard_size_mb < float("inf"):
        raise DataError(f"--shard-size must be a positive number of MB, got {shard_size_mb}")
    if fmt not in ("text", "chat"):
        raise DataError(f"--format must be text or chat, got {fmt!r}")
    if train_on is not None and fmt != "chat":
        raise DataError("--train-on is for --format chat (which tokens of a conversation to train on); plain text "
                        "trains on every token: drop --train-on, or add --format chat")
    train_on = train_on or "bot"
    if train_on not in ("bot", "all"):
        raise DataError(f"--train-on must be bot or all, got {train_on!r}")
    if doc_separator is not None and fmt == "chat":
        raise DataError("--doc-separator is for plain text: with --format chat each conversation is a document; "
                        "drop --doc-separator")
    if doc_separator is not None and not doc_separator.strip():
        raise DataError(f"--doc-separator {doc_separator!r}: a line equal to LINE ends a document, and an empty "
                        "LINE would end one at every blank line; give a marker line (e.g. --doc-separator "
                        "'=====') or leave it out (each file is one document)")
    if vocab_size is not None and tok is not None:
        raise DataError("give --tokenizer (one made before) or --vocab-size (train one now), not both")
    tok = tok if tok is not None else tokenizer.GPT2
    try:
        if vocab_size is not None:
            tokenizer.check_vocab_size(vocab_size)
        elif not isinstance(tok, Tokenizer):
            tok = tokenizer.load(tok)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    out = folders.check_out(out, overwrite, error=DataError, writes=("data",))
    from mtgpt import chat  # (the files --format chat takes from a folder: chat.DIALOGUE_GLOBS)

    default = chat.DIALOGUE_GLOBS if fmt == "chat" else "**/*.txt"
    sources = resolve_sources(inputs, glob if glob is not None else default, warn=warn,  # (--glob '' is refused there)
                              glob_given=glob is not None, any_case=fmt == "chat" and glob is None)  # (b.YML too)
    if fmt == "text" and _looks_like_chat(sources):
        warn(f"note: {sources[0].name} looks like chat data (JSON lines of {{\"messages\": [...]}}), read here as "
             "plain text; to train on it as dialogue, prepare it with --format chat (which reads .jsonl files)")
    if fmt == "chat" and any(s.path is None for s in sources):
        raise DataError("--format chat reads files (YAML or JSONL), not stdin")
    if vocab_size is not None and any(s.path is None for s in sources):
        raise DataError("--vocab-size reads the text twice (to train the tokenizer, then to tokenize), so not from "
                        "stdin: save it to a file, or train one first with `mtgpt tokenizer train - --vocab-size "
                        f"{vocab_size} --out TOK_DIR` and pass --tokenizer TOK_DIR")
    # one thread more than cores: while the main thread (holding the GIL) cuts and writes samples,
    # a tokenizer thread may wait on the GIL; with one spare, no core idles (2 cores, 500 MB:
    # 33 s with 2 threads, 26.5 s with 3, 27.8 s with 4)
    workers = workers or (os.cpu_count() or 1) + 1
    started = time.time()  # (the manifest's "seconds": the whole of prepare, training a tokenizer included)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = folders.temporary(out)
    tmp.mkdir()
    try:
        read, extra = sources, {"content": fmt}
        conversations = tmp / ".conversations.txt"  # chat: the dialogue in the template, read like text
        if fmt == "chat":
            try:
                extra["conversations"] = chat.to_template_file([s.path for s in sources], conversations, strict)
            except chat.ChatDataError as e:
                raise DataError(str(e)) from None
            read = [Source("conversations", conversations, conversations.stat().st_size)]
            doc_separator = chat.DOC_SEPARATOR
        if vocab_size is not None:
            if not quiet:
                warn(f"note: training a {vocab_size:,}-token BPE vocabulary on the text first (then tokenizing it)")
            tok = train_tokenizer(read, vocab_size, strict, doc_separator, quiet)
            tok.info = tokenizer_info(tok, read, sources)
        tok.save(tmp)
        if fmt == "chat":
            manifest = _write_chat_shards([s.path for s in sources], tmp, block_size, val_fraction, seed,
                                          shard_size_mb, strict, quiet, warn, sources, extra, tok, train_on, started)
        else:
            manifest = _write_shards(read, tmp, block_size, val_fraction, seed, shard_size_mb, strict,
                                     doc_separator, workers, quiet, warn, sources, extra, tok, started)
        conversations.unlink(missing_ok=True)
        folders.replace_folder(tmp, out, overwrite, DataError)
    except BaseException as e:  # nothing half-written survives: not a crash, not Ctrl-C, not ENOSPC
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, DataError):
            raise DataError(f"prepare {out} failed: {e}; nothing was written (if the disk is "
                            "full, free some space or choose another --out)") from e
        raise
    return manifest


def _looks_like_chat(sources: list[Source]) -> bool:
    """Are all `sources` .jsonl or .json files whose first line is a {"messages": ...} object?"""
    for src in sources:
        if src.path is None or src.path.suffix not in (".jsonl", ".json"):
            return False
        with src.path.open("rb") as f:
            line = f.readline(1 << 20)
        try:
            first = json.loads(line.decode("utf-8-sig"))
        except ValueError:  # not UTF-8, or not JSON
            return False
        if not (isinstance(first, dict) and "messages" in first):
            return False
    return bool(sources)


def bytes_per_shard(shard_size_mb: float) -> int:
    """--shard-size in bytes, at least 1 (0 made every shard full at once: the first one empty)."""
    return max(1, int(shard_size_mb * 1e6))


def _write_shards(sources, tmp, block_size, val_fraction, seed, shard_size_mb, strict, separator,
                  workers, quiet, warn, listed, extra, tok: Tokenizer, started: float) -> dict[str, Any]:
    S = block_size + 1
    shard_bytes = bytes_per_shard(shard_size_mb)
    writers = {s: SplitWriter(tmp, s, shard_bytes) for s in ("train", "val")}
    is_val = ValSelector(val_fraction, seed)
    carry = np.zeros(0, dtype=np.uint16)
    total_tokens = text_bytes = separators = 0
    documents = Documents(tok.eot)
    sep = _separator_pattern(separator)
    replaced = [0] * len(sources)
    known = all(s.size is not None for s in sources)
    bar = tqdm(total=sum(s.size for s in sources) if known else None, unit="B", unit_scale=True,
               unit_divisor=1024, desc="prepare", disable=True if quiet else None, dynamic_ncols=True)
    with ThreadPoolExecutor(workers) as pool, _aborted_on_error(writers):
        inflight: deque = deque()
        chunks = _chunks(sources, separator)

        def submit_next() -> bool:
            item = next(chunks, None)
            if item is None:
                return False
            i, offset, data, last = item
            fut = pool.submit(_tokenize, tok, data, sources[i].name, offset, strict, sep)
            inflight.append((i, len(data), last, fut))
            return True

        while len(inflight) < 2 * workers and submit_next():  # bounded read-ahead: flat memory
            pass
        while inflight:
            i, nbytes, source_ends, fut = inflight.popleft()
            pieces, bad = fut.result()
            submit_next()
            separators += len(pieces) - 1
            replaced[i] += bad
            text_bytes += nbytes
            ids = documents.join(pieces, source_ends)
            total_tokens += len(ids)
            stream = np.concatenate([carry, ids])
            n = len(stream) // S
            samples = stream[: n * S].reshape(n, S)
            carry = stream[n * S:].copy()
            val = is_val(n)
            writers["train"].add(samples[~val])
            writers["val"].add(samples[val])
            bar.update(nbytes)
    bar.close()
    for w in writers.values():
        w.close()

    for src, bad in zip(sources, replaced):
        if bad:
            warn(replaced_warning(src.name, bad))
    if separator is not None and separators == 0:  # (a typo, or lines that end in a lone \r, went unsaid)
        warn(f"note: --doc-separator {separator!r} is never a line of its own in the text (the marker alone on a "
             "line that ends with a newline, \\n or \\r\\n), so each source is one document")
    if total_tokens == 0:
        raise DataError("the input holds no text; give files with text in them")
    stats = {"documents": documents.count, "tokens": total_tokens,
             "text_bytes": text_bytes,  # bytes read (UTF-8); text_bytes / tokens = bytes per token
             "dropped_tail_tokens": len(carry), "replaced_bytes": sum(replaced)}
    return _finish(tmp, writers, tok, block_size, val_fraction, seed, stats, extra, listed, started)


def _write_chat_shards(paths: list[Path], tmp: Path, block_size: int, val_fraction: float, seed: int,
                       shard_size_mb: float, strict: bool, quiet: bool, warn: Callable[[str], None],
                       listed: list[Source], extra: dict[str, Any], tok: Tokenizer, train_on: str, started: float
                       ) -> dict[str, Any]:
    """Chat data: each conversation (its template text and <|endoftext|>) starts its own sample, so
    no sample lets one conversation attend to another; one longer than a sample goes on in the
    next ones, each starting with the token the one before ended with (a sample's first token is
    never a target: without the overlap, a reply token there was never trained), and the last is
    padded with <|endoftext|>. Each sample is stored with its loss mask
    (mtgpt.chat.training_tokens; padding is never trained on); a sample with no trained target
    (the user's part of a long conversation) is left out. A conversation's samples all go to the
    same split, so val holds conversations the model never saw (and an empty val split is met with
    a --val-fraction that gives it one: _chat_val_fraction). Invalid UTF-8 is replaced and warned
    about per file, or refused when `strict`, as in text."""
    from mtgpt import chat

    S = block_size + 1
    writers = {s: SplitWriter(tmp, s, bytes_per_shard(shard_size_mb)) for s in ("train", "val")}
    is_val = ValSelector(val_fraction, seed)
    stats = {"documents": 0, "tokens": 0, "text_bytes": 0, "dropped_tail_tokens": 0, "replaced_bytes": 0,
             "loss_mask": True, "train_on": train_on, "trained_targets": 0, "padding_tokens": 0, "left_out_samples": 0}
    bar = tqdm(total=extra["conversations"], unit="conv", desc="prepare", disable=True if quiet else None,
               dynamic_ncols=True)
    replaced: dict[Path, int] = {}
    kept_samples: list[int] = []  # per conversation
    with _aborted_on_error(writers):
        for turns in chat.conversations(paths, strict, replaced):
            ids, mask = chat.training_tokens(tok, turns, train_on)
            ids, mask = np.append(ids, tok.eot), np.append(mask, False)
            n = -(-(len(ids) - 1) // block_size)  # samples of S tokens, block_size apart
            pad = n * block_size + 1 - len(ids)
            at = np.arange(n)[:, None] * block_size + np.arange(S)
            samples = np.concatenate([ids, np.full(pad, tok.eot)]).astype(np.uint16)[at]
            masks = np.concatenate([mask, np.zeros(pad, dtype=bool)])[at]
            keep = masks[:, 1:].any(1)  # a sample trains on targets 1..S-1
            writers["val" if is_val(1)[0] else "train"].add(samples[keep], masks[keep])
            kept_samples.append(int(keep.sum()))
            bar.update(1)
            stats["left_out_samples"] += int((~keep).sum())
            if not keep.any():  # nothing to train on: left out, and not counted as a document
                continue
            stats["documents"] += 1
            stats["tokens"] += len(ids)
            stats["text_bytes"] += len(chat.render(turns).encode("utf-8"))
            stats["padding_tokens"] += pad if keep[-1] else 0  # the padding stored (in the last sample, if kept)
            stats["trained_targets"] += int(masks[keep, 1:].sum())
    bar.close()
    for w in writers.values():
        w.close()
    for src in listed:
        if replaced.get(src.path):
            warn(replaced_warning(src.name, replaced[src.path]))
    stats["replaced_bytes"] = sum(replaced.values())
    if (idle := kept_samples.count(0)) and stats["trained_targets"]:
        warn(f"note: {idle} of {len(kept_samples)} conversation(s) give nothing to train on (no "
             f"{'bot reply' if train_on == 'bot' else 'text'}: one line, no messages, or only user and system "
             "turns); they are left out")
    if stats["trained_targets"] == 0:
        raise DataError("the conversations have no bot replies to train on; give dialogue with the bot's turns "
                        "(chatterbot YAML alternates user and bot lines)")
    if val_fraction > 0 and writers["val"].samples == 0 and writers["train"].samples > 0:
        fraction = _chat_val_fraction(kept_samples, seed)
        raise_to = f"raise --val-fraction to at least {fraction}, " if fraction else ""
        raise DataError(f"the val split is empty: {len(kept_samples)} conversation(s) ({writers['train'].samples} "
                        f"sample(s) of {S} tokens), --val-fraction {val_fraction}, and val takes whole conversations; "
                        f"{raise_to}give more conversations, or pass --val-fraction 0 to train without validation")
    return _finish(tmp, writers, tok, block_size, val_fraction, seed, stats, extra, listed, started)


def _chat_val_fraction(kept_samples: list[int], seed: int) -> float | None:
    """The smallest --val-fraction, k / conversations rounded up to 3 digits, with which ValSelector
    (one call per conversation) gives val a conversation that has samples and leaves train one;
    None if there is none (fewer than two conversations have samples)."""
    kept = np.array(kept_samples)
    n = len(kept)
    if (kept > 0).sum() < 2:
        return None
    for k in range(1, min(n, 1000)):
        scale = 10.0 ** (2 - np.floor(np.log10(k / n)))
        fraction = float(np.ceil(round(k / n * scale, 6)) / scale)
        val = ValSelector(fraction, seed)(n)
        if fraction < 1 and 0 < kept[val].sum() < kept.sum():
            return fraction
    return None


def _finish(tmp: Path, writers: dict[str, SplitWriter], tok: Tokenizer, block_size: int, val_fraction: float,
            seed: int, stats: dict[str, Any], extra: dict[str, Any], listed: list[Source], started: float
            ) -> dict[str, Any]:
    """Refuse splits that cannot train, then write manifest.json (returned)."""
    S = block_size + 1
    total_tokens = stats["tokens"]
    if writers["train"].samples + writers["val"].samples == 0:
        raise DataError(f"the corpus has {total_tokens} tokens, fewer than one sample of "
                        f"block_size + 1 = {S}; give more text or a smaller --block-size")
    if writers["train"].samples == 0:
        raise DataError(f"all {writers['val'].samples} sample(s) went to val; lower --val-fraction "
                        "or give more text")
    if val_fraction > 0 and writers["val"].samples == 0:
        n = writers["train"].samples
        raise_to = f"raise --val-fraction to at least {1 / n:.3g}, " if n > 1 else ""  # < 1, as allowed
        raise DataError(f"the val split is empty: {n} sample(s) of {S} tokens and --val-fraction "
                        f"{val_fraction}; {raise_to}give more text, or pass --val-fraction 0 to train "
                        "without validation")

    manifest = {
        "format": FORMAT,
        "mtgpt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": {**tok.identity(), "files": [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                                                  for p in (tmp / tokenizer.TOKENIZER_JSON, tmp / tokenizer.INFO_JSON)
                                                  if p.is_file()]},
        "block_size": block_size,
        "sample_tokens": S,
        "samples_per_record": SAMPLES_PER_RECORD,
        "dtype": "uint16",
        "seed": seed,
        "val_fraction": val_fraction,
        **stats,
        "splits": {s: {"samples": w.samples, "tokens": w.samples * S, "shards": w.shards}
                   for s, w in writers.items()},
        **extra,
        "sources": [{"name": s.name, "bytes": s.size} for s in listed],
        "seconds": round(time.time() - started, 2),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _texts(sources: list[Source], strict: bool, separator: str | None, bar: tqdm, replaced: dict[str, int]):
    """The text of `sources` as prepare reads it (chunks, without document separator lines); the
    invalid UTF-8 bytes replaced are counted per source name in `replaced`."""
    sep = _separator_pattern(separator)
    for src in sources:
        for offset, data in read_chunks(src, CHUNK_BYTES, separator):
            text, bad = decode_utf8(data, strict, src.name, offset)
            if bad:
                replaced[src.name] = replaced.get(src.name, 0) + bad
            bar.update(len(data))
            yield from (sep.split(text) if sep else [text])


def train_tokenizer(sources: list[Source], vocab_size: int, strict: bool = False, separator: str | None = None,
                    quiet: bool = False, replaced: dict[str, int] | None = None) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens trained on the text of `sources` (mtgpt.tokenizer.train);
    the invalid UTF-8 bytes it replaced are counted per source in `replaced`."""
    known = all(s.size is not None for s in sources)
    with tqdm(total=sum(s.size for s in sources) if known else None, unit="B", unit_scale=True, unit_divisor=1024,
              desc="tokenizer: read", disable=True if quiet else None, dynamic_ncols=True) as bar:
        try:
            return tokenizer.train(_texts(sources, strict, separator, bar, {} if replaced is None else replaced),
                                   vocab_size, progress=not quiet and sys.stderr.isatty())
        except TokenizerError as e:
            raise DataError(str(e)) from None


MEASURE_BYTES = 16 << 20  # bytes per token are measured on the first 16 MB of the training text


def tokenizer_info(tok: Tokenizer, read: list[Source], listed: list[Source]) -> dict[str, Any]:
    """What tokenizer_info.json says about the text `tok` was trained on: its sources and bytes per
    token there, beside GPT-2's on the same text (measured on the first MEASURE_BYTES)."""
    text, size = [], 0
    for src in read:
        for offset, data in read_chunks(src, CHUNK_BYTES):
            text.append(decode_utf8(data, False, src.name, offset)[0])
            size += len(data)
            if size >= MEASURE_BYTES:
                break
        if size >= MEASURE_BYTES:
            break
    sample = "".join(text)
    nbytes = len(sample.encode("utf-8"))
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mtgpt_version": __version__,
            "trained_on": {"sources": len(listed), "bytes": sum(s.size or 0 for s in listed),
                           "names": [s.name for s in listed[:10]] + (["..."] if len(listed) > 10 else [])},
            "bytes_per_token": round(nbytes / max(1, len(tok.encode(sample))), 4),
            "gpt2_bytes_per_token": round(nbytes / max(1, len(tokenizer.gpt2().encode(sample))), 4),
            "measured_on_bytes": nbytes}


def make_tokenizer(inputs: list[str], vocab_size: int, out: str | Path, overwrite: bool = False,
                   glob: str | None = None, strict: bool = False, quiet: bool = False,
                   warn: Callable[[str], None] = print) -> Tokenizer:
    """`mtgpt tokenizer train`: train on `inputs` (what prepare reads) and write the folder `out`
    (tokenizer.json, tokenizer_info.json) through a temporary folder, renamed when complete."""
    try:
        tokenizer.check_vocab_size(vocab_size)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    out = folders.check_out(out, overwrite, error=DataError, writes=("tokenizer",))
    sources = resolve_sources(inputs, glob if glob is not None else "**/*.txt", glob_given=glob is not None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = folders.temporary(out)
    try:
        tmp.mkdir()
        for i, src in enumerate(sources):
            if src.path is None:  # stdin is read once; it is read again to measure bytes per token
                kept = tmp / ".stdin.txt"
                with kept.open("wb") as f:
                    for _, data in read_chunks(src, CHUNK_BYTES):
                        f.write(data)
                sources[i] = Source(src.name, kept, kept.stat().st_size)
        replaced: dict[str, int] = {}
        tok = train_tokenizer(sources, vocab_size, strict, quiet=quiet, replaced=replaced)
        for name, count in replaced.items():  # (as prepare says it)
            warn(replaced_warning(name, count))
        tok.info = tokenizer_info(tok, sources, sources)
        tok.save(tmp)
        (tmp / ".stdin.txt").unlink(missing_ok=True)
        folders.replace_folder(tmp, out, overwrite, DataError)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # (a full disk: a traceback)
            raise DataError(f"tokenizer train {out} failed: {e}; nothing was written (if the disk is full, free "
                            "some space or choose another --out)") from None
        raise
    return tok
