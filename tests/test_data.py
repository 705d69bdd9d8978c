"""Data: text -> shards (prepare) and shards -> batches (loader), on real webdataset tar files."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mtgpt import tokenizer
from mtgpt.data import DataError, load_manifest, verify
from mtgpt.data import prepare as prepare_mod
from mtgpt.data.loader import ConsumerStream, TrainBatches, _records, load_val
from mtgpt.data.prepare import prepare
from tests.conftest import SONNETS


def all_train_samples(data_dir: Path) -> list[bytes]:
    m = load_manifest(data_dir)
    out = []
    for shard in m["splits"]["train"]["shards"]:
        for record in _records(data_dir / shard["file"], m["sample_tokens"], 50257, shard["samples"]):
            out += [row.tobytes() for row in record]
    return out


def test_manifest_and_shards(tiny_data):
    m = load_manifest(tiny_data)
    assert m["block_size"] == 32 and m["sample_tokens"] == 33
    assert m["tokenizer"]["vocab_size"] == 50257 and m["tokenizer"]["sha256"].startswith("196139")
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert len(train["shards"]) >= 3  # --shard-size 0.002 MB
    assert train["samples"] == sum(s["samples"] for s in train["shards"]) == len(all_train_samples(tiny_data))
    assert abs(val["samples"] - (train["samples"] + val["samples"]) * 0.1) < 1  # evenly spaced
    assert train["samples"] + val["samples"] == m["tokens"] // 33
    assert m["sources"][0]["bytes"] == SONNETS.stat().st_size
    assert verify(tiny_data) == []


def test_tokens_match_whole_file_tokenization(tmp_path, monkeypatch):
    """Cutting the text into chunks (here 1 KB) gives exactly the ids of tokenizing it whole."""
    monkeypatch.setattr(prepare_mod, "CHUNK_BYTES", 1000)
    out = tmp_path / "d"
    prepare([str(SONNETS)], out, block_size=32, val_fraction=0.0, quiet=True)
    stream = np.concatenate([np.frombuffer(s, "<u2") for s in all_train_samples(out)])
    want = tokenizer.encode(SONNETS.read_text()) + [tokenizer.EOT]
    assert stream.tolist() == want[: len(stream)]
    assert len(want) - len(stream) < 33


def test_documents_separated_by_endoftext(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n" * 20)
    (tmp_path / "b.txt").write_text("second document\nDOC\nthird document\n" * 3)
    out = tmp_path / "d"
    m = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], out, block_size=8, val_fraction=0.0,
                doc_separator="DOC", quiet=True)
    assert m["documents"] == 5  # a.txt, then b.txt split by 3 separator lines into 4 documents
    ids = np.concatenate([np.frombuffer(s, "<u2") for s in all_train_samples(out)]).tolist()
    text = tokenizer.decode(ids)
    assert "DOC" not in text
    assert text.startswith("first document\n") and "<|endoftext|>second document" in text


def test_val_split_is_deterministic(tmp_path):
    a = prepare([str(SONNETS)], tmp_path / "a", block_size=16, val_fraction=0.2, seed=1, quiet=True)
    b = prepare([str(SONNETS)], tmp_path / "b", block_size=16, val_fraction=0.2, seed=1, quiet=True)
    c = prepare([str(SONNETS)], tmp_path / "c", block_size=16, val_fraction=0.2, seed=2, quiet=True)
    sha = lambda m: [s["sha256"] for s in m["splits"]["val"]["shards"]]  # noqa: E731
    assert sha(a) == sha(b) and sha(a) != sha(c)


def _consumer_epoch(data_dir, k, n, seed=0):
    m = load_manifest(data_dir)
    stream = ConsumerStream(data_dir, m, seed, k, n)
    samples = stream.samples()
    return [next(samples).tobytes() for _ in range(stream.epoch_length(0))]


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_disjoint_and_cover_epoch(tiny_data, ranks, workers):
    """Through the real DataLoader: rank r's batches come round-robin from its workers; over one
    epoch the ranks see disjoint samples that together are every train sample once."""
    m = load_manifest(tiny_data)
    seen: list[bytes] = []
    for rank in range(ranks):
        batches = TrainBatches(tiny_data, m, micro_batch=1, rank=rank, world=ranks, seed=0, num_workers=workers)
        w_count = max(1, workers)
        lengths = [ConsumerStream(tiny_data, m, 0, rank * w_count + w, ranks * w_count).epoch_length(0)
                   for w in range(w_count)]
        per_worker: list[list[bytes]] = [[] for _ in range(w_count)]
        for j in range(max(lengths) * w_count):
            x, y = next(batches)
            per_worker[j % w_count].append(torch.cat([x[0], y[0, -1:]]).numpy().astype("<u2").tobytes())
        for w in range(w_count):
            seen += per_worker[w][: lengths[w]]
    assert Counter(seen) == Counter(all_train_samples(tiny_data))


def test_small_corpus_splits_by_sample(tiny_data):
    """More readers than shards: every reader reads all shards and keeps every n-th sample."""
    m = load_manifest(tiny_data)
    n = len(m["splits"]["train"]["shards"]) + 2
    seen = [s for k in range(n) for s in _consumer_epoch(tiny_data, k, n)]
    assert Counter(seen) == Counter(all_train_samples(tiny_data))


def test_too_few_samples_for_readers(tiny_data):
    m = load_manifest(tiny_data)
    with pytest.raises(DataError, match="fewer than the"):
        ConsumerStream(tiny_data, m, 0, 0, m["splits"]["train"]["samples"] + 1)


def test_targets_are_inputs_shifted(tiny_data):
    x, y = next(TrainBatches(tiny_data, load_manifest(tiny_data), micro_batch=4, rank=0, world=1, seed=0))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def _take(batches, n):
    return [torch.cat([x, y[:, -1:]], 1) for x, y in (next(batches) for _ in range(n))]


@pytest.mark.parametrize("workers", [0, 2])
def test_deterministic_and_resumable(tiny_data, workers):
    m = load_manifest(tiny_data)
    make = lambda seed, start=0: TrainBatches(tiny_data, m, 3, rank=1, world=2, seed=seed,  # noqa: E731
                                              num_workers=workers, start=start)
    first = _take(make(5), 40)  # 40 batches of 3 > one epoch of a rank's ~37 samples
    assert all(torch.equal(a, b) for a, b in zip(first, _take(make(5), 40)))
    assert not all(torch.equal(a, b) for a, b in zip(first, _take(make(6), 40)))
    for start in (1, 7, 13, 30):  # inside the first epoch, and in the second
        resumed = make(5, start)
        assert resumed.state_dict()["batches"] == start
        assert all(torch.equal(a, b) for a, b in zip(first[start:], _take(resumed, 40 - start)))


def test_endless_on_uneven_shards(tiny_data):
    """3 ranks over unequal shares: every rank can draw batches well past its first epoch."""
    m = load_manifest(tiny_data)
    lengths = []
    for rank in range(3):
        stream = ConsumerStream(tiny_data, m, 0, rank, 3)
        lengths.append(stream.epoch_length(0))
        samples = stream.samples()
        for _ in range(3 * max(lengths)):
            assert next(samples).shape == (33,)
    assert len(set(lengths)) > 1 or True  # shares may be equal; the stream must not end either way


def test_val_is_fixed_and_split(tiny_data):
    m = load_manifest(tiny_data)
    full = load_val(tiny_data, m, 6, 0, 1)
    assert full.shape == (6, 33)
    assert torch.equal(full, load_val(tiny_data, m, 6, 0, 1))
    parts = [load_val(tiny_data, m, 6, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts).sort(0).values, full.sort(0).values)


# ---------------------------------------------------------------- bad input


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare([str(tmp_path / "nope.txt")], tmp_path / "d", quiet=True)
    _nothing_written(tmp_path, tmp_path / "d")


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "d", quiet=True)
    _nothing_written(tmp_path, tmp_path / "d")


def test_binary_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(DataError, match="model.bin: looks like a binary file"):
        prepare([str(tmp_path / "model.bin")], tmp_path / "d", quiet=True)
    _nothing_written(tmp_path, tmp_path / "d")


def test_corpus_shorter_than_a_block(tmp_path):
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(DataError, match="fewer than one sample"):
        prepare([str(tmp_path / "short.txt")], tmp_path / "d", block_size=64, quiet=True)
    _nothing_written(tmp_path, tmp_path / "d")


def test_existing_out_refused_then_overwritten(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        prepare([str(SONNETS)], out, block_size=32, quiet=True)
    assert (out / "precious.txt").read_text() == "keep me"
    prepare([str(SONNETS)], out, block_size=32, val_fraction=0.1, quiet=True, overwrite=True)
    assert (out / "manifest.json").is_file() and not (out / "precious.txt").exists()


def test_truncated_shard_is_named(tiny_data, tmp_path):
    data = tmp_path / "copy"
    shutil.copytree(tiny_data, data)
    m = load_manifest(data)
    shard = data / m["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert verify(data)
    with pytest.raises(DataError, match=shard.name):
        for _ in range(200):
            next(TrainBatches(data, m, micro_batch=1, rank=0, world=1, seed=0))


def test_not_a_data_folder(tmp_path):
    with pytest.raises(DataError, match="not a prepared data folder"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not an mtgpt manifest"):
        load_manifest(tmp_path)
