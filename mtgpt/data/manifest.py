"""`manifest.json`: what a prepared data folder holds, and the checks made before using it.

A data folder is `manifest.json` plus tar shards `train-NNNNNN.tar` / `val-NNNNNN.tar`. Each tar
member is one record: `samples_per_record` samples (the last record of each split: the rest, 1 to
`samples_per_record`) of `block_size + 1` uint16 token ids, stored raw (little-endian). A sample is
the unit of training: inputs are its first block_size tokens, targets the last block_size. Samples
never depend on batch size or rank count. A folder made with an own tokenizer also holds it
(tokenizer.json, tokenizer_info.json), listed with its size and sha256 under the manifest's
"tokenizer" like the shards; without it the tokenizer is GPT-2's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mtgpt import folders
from mtgpt.data import remote
from mtgpt.data.sources import DataError
from mtgpt.folders import MANIFEST

FORMAT = "mtgpt-shards/1"


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(data_dir: str | Path, cache: str | Path | None = None, whole: bool = True) -> dict[str, Any]:
    """Read and sanity-check a data folder's manifest; DataError says what to run if it is not one,
    or (`whole`) if a file it lists is missing. `data_dir` may be a URL (mtgpt.data.remote): its
    manifest is fetched and checked alike (from its copy in `cache`, --data-cache, when the URL
    cannot be reached)."""
    if remote.is_url(data_dir):
        return _checked(remote.read_manifest(str(data_dir), cache=cache)[0], str(data_dir))
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise _not_data(data_dir)
    try:
        manifest = _checked(json.loads(path.read_text()), path)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); prepare the data again") from None
    for entry in data_files(manifest) if whole else []:
        if not (data_dir / entry["file"]).is_file():
            raise DataError(f"{data_dir / entry['file']}: listed in {MANIFEST} but missing; prepare the data again")
    return manifest


def missing(data_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """The files the manifest lists that are not there, each as a problem."""
    return [f"{data_dir / e['file']}: listed in {MANIFEST} but missing" for e in data_files(manifest)
            if not (data_dir / e["file"]).is_file()]


def _not_data(path: Path) -> DataError:
    """Why `path` is no data folder, with the fix that fits what it is (mtgpt.folders): text is
    prepared into a new folder; nothing that holds something else is offered as --out."""
    kind = folders.kind(path)
    if kind == "missing":
        return DataError(f"{path}: no such folder; create it with `mtgpt prepare TEXT... --out {path}`")
    if kind == "folder" and not any(path.iterdir()):
        return DataError(f"{path} is an empty folder, not a prepared data folder (no {MANIFEST}); "
                         f"create it with `mtgpt prepare TEXT... --out {path}`")
    if kind in ("file", "folder"):  # text, presumably
        out = Path("data") / (path.stem or "text")
        if out.absolute() == path.absolute():
            out = out.with_name(out.name + "-shards")
        return DataError(f"{path} is {folders.what(path)}, not a prepared data folder (no {MANIFEST}); to train on "
                         f"its text, prepare it first: `mtgpt prepare {path} --out {out}`, then pass --data {out}")
    return DataError(f"{path} is {folders.what(path)}, not a prepared data folder (no {MANIFEST}); --data wants a "
                     "folder written by `mtgpt prepare TEXT... --out DATA_DIR`")


def data_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file of a data folder besides the manifest, as {"file", "bytes", "sha256"}: the
    shards, then the tokenizer's files (none for GPT-2's)."""
    return ([s for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
            + list(manifest["tokenizer"].get("files", [])))


def bytes_per_token(manifest: dict[str, Any]) -> float:
    """The text's UTF-8 bytes per token of its tokenizer: the <|endoftext|> after each document
    (or conversation) is no token of the text, and is left out, as the GPT-2 figure it is
    compared with leaves it out (counted, 20,000 small files scored an own vocabulary below
    GPT-2's while it was above)."""
    return manifest["text_bytes"] / max(1, manifest["tokens"] - manifest.get("documents", 0))


def older_chat(manifest: dict[str, Any]) -> str | None:
    """What to say about chat data (`--format chat`) prepared by an mtgpt before loss masks: it
    trains on every token, the users' lines too, with conversations packed across samples; None
    for any other folder."""
    if manifest.get("content") != "chat" or manifest.get("loss_mask"):
        return None
    return ("chat data prepared by an older mtgpt, without loss masks: training on it learns the users' lines "
            "too, not the replies alone; prepare it again (mtgpt prepare ... --format chat)")


def identity(manifest: dict[str, Any]) -> str:
    """What the train split holds, in 16 hex digits (of its shards' sha256s, in order): the same for
    the same prepared data wherever its folder is, or under another --data name; another for data
    prepared again from other text or with another seed (a resume tells them apart by it)."""
    shards = manifest["splits"]["train"]["shards"]
    return hashlib.sha256(" ".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]


def _checked(manifest: Any, where: str | Path) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where}: not an mtgpt manifest of format {FORMAT}; prepare the data again "
                        "with this version of mtgpt")
    return manifest


def check_compatible(manifest: dict[str, Any], data_dir: str | Path, vocab_size: int, block_size: int,
                     resumed: bool = False) -> None:
    """Refuse data whose tokenizer has another vocabulary size than the model, or with blocks
    of another size than the model's context (`resumed`: the model is a resumed run's, whose
    context cannot change). (Which tokenizer a model reads is checked where the model comes
    from: mtgpt.train.check_tokenizer.)"""
    tok = manifest["tokenizer"]
    if tok["vocab_size"] != vocab_size:
        raise DataError(f"{data_dir} was prepared with tokenizer {tok['name']} of {tok['vocab_size']:,} tokens but "
                        f"the model has {vocab_size:,}; leave vocab_size out of the config (it follows the data)")
    if manifest["block_size"] != block_size and resumed:
        raise DataError(f"{data_dir} holds samples of block_size {manifest['block_size']} but the resumed run's "
                        f"model has context {block_size}, which a resume cannot change: prepare the data again "
                        f"with --block-size {block_size}")
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
    problems = missing(data_dir, manifest)  # (each file checked, whatever the others are)
    for entry in data_files(manifest):
        path = data_dir / entry["file"]
        if not path.is_file():
            continue
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupt file)")
    return problems
