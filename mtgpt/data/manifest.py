"""`manifest.json`: what a prepared data folder holds, and the checks made before using it.

A data folder is `manifest.json` plus tar shards `train-NNNNNN.tar` / `val-NNNNNN.tar`. Each tar
member is one record: `samples_per_record` samples of `block_size + 1` uint16 token ids, stored
raw (little-endian). A sample is the unit of training: inputs are its first block_size tokens,
targets the last block_size. Samples never depend on batch size or rank count.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mtgpt.data import remote
from mtgpt.data.sources import DataError

FORMAT = "mtgpt-shards/1"
MANIFEST = "manifest.json"


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check a data folder's manifest; DataError says what to run if it is not one.
    `data_dir` may be a URL (mtgpt.data.remote): its manifest is fetched and checked alike."""
    if remote.is_url(data_dir):
        return _checked(remote.read_manifest(str(data_dir))[0], str(data_dir))
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such folder; create it with `mtgpt prepare TEXT... --out {data_dir}`")
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared data folder (no {MANIFEST}); "
                        f"create it with `mtgpt prepare TEXT... --out {data_dir}`")
    try:
        manifest = _checked(json.loads(path.read_text()), path)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); prepare the data again") from None
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            if not (data_dir / shard["file"]).is_file():
                raise DataError(f"{data_dir / shard['file']}: shard listed in {MANIFEST} is missing; "
                                "prepare the data again")
    return manifest


def _checked(manifest: Any, where: str | Path) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where}: not an mtgpt manifest of format {FORMAT}; prepare the data again "
                        "with this version of mtgpt")
    return manifest


def check_compatible(manifest: dict[str, Any], data_dir: str | Path, vocab_sha256: str,
                     vocab_size: int, block_size: int) -> None:
    """Refuse data made with another tokenizer, or with blocks shorter than the model's context."""
    tok = manifest["tokenizer"]
    if tok["sha256"] != vocab_sha256 or tok["vocab_size"] != vocab_size:
        raise DataError(f"{data_dir} was prepared with tokenizer {tok['name']!r} (vocab {tok['vocab_size']}, "
                        f"sha256 {tok['sha256'][:12]}…) but the model uses vocab {vocab_size} "
                        f"(sha256 {vocab_sha256[:12]}…); prepare the data again with this mtgpt")
    if manifest["block_size"] != block_size:
        raise DataError(f"{data_dir} holds samples of block_size {manifest['block_size']} but the model's "
                        f"block_size is {block_size}: pass --block-size {manifest['block_size']}, or "
                        f"prepare again with --block-size {block_size}")
    if manifest["splits"]["train"]["samples"] == 0:
        raise DataError(f"{data_dir} has no training samples; prepare it from more text")


def verify(data_dir: str | Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """Check every shard's size and sha256 against the manifest. Returns the problems found."""
    data_dir = Path(data_dir)
    manifest = manifest or load_manifest(data_dir)
    problems = []
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            path = data_dir / shard["file"]
            if path.stat().st_size != shard["bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
            elif sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest (corrupt shard)")
    return problems
