"""Text -> webdataset tar shards of token ids, streaming, in bounded memory.

Pipeline: sources are read in chunks cut at line breaks (`sources.read_chunks`); threads decode
and tokenize the chunks (tiktoken releases the GIL, so threads scale across cores without
copying text between processes); the main thread, in input order, cuts the token stream into
samples of block_size + 1 tokens, sends each to the train or val split, and writes records of
`SAMPLES_PER_RECORD` samples with webdataset's ShardWriter. Output goes to a temporary folder
beside `--out` that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import webdataset as wds
from tqdm import tqdm

from mtgpt import __version__, tokenizer
from mtgpt.data.manifest import FORMAT, MANIFEST, sha256_file
from mtgpt.data.sources import DataError, Source, decode_utf8, read_chunks, resolve_sources

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
    _writer: wds.ShardWriter | None = None
    _records: int = 0
    _in_shard: int = 0
    _pending: np.ndarray | None = None

    def add(self, samples: np.ndarray) -> None:
        """samples: (n, block_size + 1) uint16; written in records of SAMPLES_PER_RECORD."""
        if self._pending is not None and len(self._pending):
            samples = np.concatenate([self._pending, samples])
        full = len(samples) - len(samples) % SAMPLES_PER_RECORD
        for i in range(0, full, SAMPLES_PER_RECORD):
            self._write(samples[i:i + SAMPLES_PER_RECORD])
        self._pending = samples[full:].copy()

    def _write(self, record: np.ndarray) -> None:
        if self._writer is None:  # lazily: ShardWriter opens its first file at construction
            pattern = str(self.folder / f"{self.split}-%06d.tar")
            self._writer = wds.ShardWriter(pattern, maxsize=self.shard_bytes, maxcount=10**9,
                                           post=self._finished, verbose=0, mtime=0.0)
        self._writer.write({"__key__": f"{self._records:09d}", "tokens.u16": record.astype("<u2").tobytes()})
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
            self._write(self._pending)
            self._pending = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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


def _tokenize(data: bytes, where: str, offset: int, strict: bool, sep: re.Pattern | None
              ) -> tuple[list[np.ndarray], int]:
    """One chunk -> (the ids of each piece between document separator lines, bad bytes)."""
    text, replaced = decode_utf8(data, strict, where, offset)
    enc = tokenizer.get_tokenizer()
    pieces = sep.split(text) if sep else [text]
    return [enc.encode_to_numpy(piece, disallowed_special=()) for piece in pieces], replaced


class Documents:
    """Joins the tokenized pieces of the chunks, in input order, into one stream with
    <|endoftext|> after each document. A document ends at a separator line and at the end of its
    source; one with no text (before a separator that starts a file, between two separators in
    a row, after one that ends a file) adds nothing, wherever the chunk boundaries fall."""

    def __init__(self):
        self.count = 0
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
            parts.append(np.array([tokenizer.EOT], dtype=np.uint32))
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


def _replace_folder(tmp: Path, out: Path) -> None:
    """Rename tmp to out. An existing out (allowed by --overwrite) is moved aside first and
    deleted only after the new folder is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} is not empty; choose another --out or pass --overwrite to replace it")


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
) -> dict[str, Any]:
    """Tokenize `inputs` into shards under `out`; returns the manifest (also in out/manifest.json).

    fmt "chat": the inputs are dialogue files (chatterbot YAML, or JSONL of {"messages": [...]});
    each conversation becomes one document in the chat template (see mtgpt.chat)."""
    if block_size < 1:
        raise DataError(f"--block-size must be positive, got {block_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not shard_size_mb > 0:
        raise DataError(f"--shard-size must be a positive number of MB, got {shard_size_mb}")
    if fmt not in ("text", "chat"):
        raise DataError(f"--format must be text or chat, got {fmt!r}")
    out = Path(out)
    check_out(out, overwrite)
    sources = resolve_sources(inputs, glob or ("**/*.yml" if fmt == "chat" else "**/*.txt"))
    if fmt == "chat" and any(s.path is None for s in sources):
        raise DataError("--format chat reads files (YAML or JSONL), not stdin")
    workers = workers or os.cpu_count() or 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        read, extra = sources, {"content": fmt}
        conversations = tmp / ".conversations.txt"  # chat: the dialogue in the template, read like text
        if fmt == "chat":
            from mtgpt import chat

            try:
                extra["conversations"] = chat.to_template_file([s.path for s in sources], conversations)
            except chat.ChatDataError as e:
                raise DataError(str(e)) from None
            read = [Source("conversations", conversations, conversations.stat().st_size)]
            doc_separator = chat.DOC_SEPARATOR
        manifest = _write_shards(read, tmp, block_size, val_fraction, seed, shard_size_mb, strict,
                                 doc_separator, workers, quiet, warn, sources, extra)
        conversations.unlink(missing_ok=True)
        _replace_folder(tmp, out)
    except BaseException as e:  # nothing half-written survives: not a crash, not Ctrl-C, not ENOSPC
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, DataError):
            raise DataError(f"prepare {out} failed: {e}; nothing was written (if the disk is "
                            "full, free some space or choose another --out)") from e
        raise
    return manifest


def _write_shards(sources, tmp, block_size, val_fraction, seed, shard_size_mb, strict, separator,
                  workers, quiet, warn, listed, extra) -> dict[str, Any]:
    started = time.time()
    S = block_size + 1
    shard_bytes = int(shard_size_mb * 1e6)
    writers = {s: SplitWriter(tmp, s, shard_bytes) for s in ("train", "val")}
    is_val = ValSelector(val_fraction, seed)
    carry = np.zeros(0, dtype=np.uint16)
    total_tokens = 0
    documents = Documents()
    sep = _separator_pattern(separator)
    replaced = [0] * len(sources)
    known = all(s.size is not None for s in sources)
    bar = tqdm(total=sum(s.size for s in sources) if known else None, unit="B", unit_scale=True,
               unit_divisor=1024, desc="prepare", disable=True if quiet else None, dynamic_ncols=True)
    tokenizer.get_tokenizer()  # build it once here, not in every thread at the same time
    with ThreadPoolExecutor(workers) as pool:
        inflight: deque = deque()
        chunks = _chunks(sources, separator)

        def submit_next() -> bool:
            item = next(chunks, None)
            if item is None:
                return False
            i, offset, data, last = item
            fut = pool.submit(_tokenize, data, sources[i].name, offset, strict, sep)
            inflight.append((i, len(data), last, fut))
            return True

        while len(inflight) < 2 * workers and submit_next():  # bounded read-ahead: flat memory
            pass
        while inflight:
            i, nbytes, source_ends, fut = inflight.popleft()
            pieces, bad = fut.result()
            submit_next()
            replaced[i] += bad
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
            warn(f"warning: {src.name}: {bad} invalid UTF-8 byte(s) replaced with U+FFFD "
                 "(use --strict to refuse such files)")
    if total_tokens == 0:
        raise DataError("the input holds no text; give files with text in them")
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
        "tokenizer": {"name": tokenizer.NAME, "vocab_size": tokenizer.VOCAB_SIZE,
                      "sha256": tokenizer.vocab_sha256()},
        "block_size": block_size,
        "sample_tokens": S,
        "samples_per_record": SAMPLES_PER_RECORD,
        "dtype": "uint16",
        "seed": seed,
        "val_fraction": val_fraction,
        "documents": documents.count,
        "tokens": total_tokens,
        "dropped_tail_tokens": len(carry),
        "replaced_bytes": sum(replaced),
        "splits": {s: {"samples": w.samples, "tokens": w.samples * S, "shards": w.shards}
                   for s, w in writers.items()},
        **extra,
        "sources": [{"name": s.name, "bytes": s.size} for s in listed],
        "seconds": round(time.time() - started, 2),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
