"""Shards -> batches: one global, shuffled, resumable order of training samples, and a fixed val set.

One order for every world size. Each epoch e is a uniform random permutation of the whole train
split, seeded with (seed, e): every batch is a fair sample of the corpus, however it was sharded
and whatever its size, and every epoch visits every sample exactly once. Global position g (all
ranks together, counted from the start of the run) is sample perm_{g // N}[g % N].

Rank r's share. Micro-batch j of rank r (j counted from the run's start position P) holds the
samples at positions P + j * micro * world + r * micro + [0, micro). An optimizer step of
grad_accum micro-batches on each of `world` ranks so covers one contiguous run of global
positions: global batch k holds the same samples for 1, 2 or 8 ranks and any number of
DataLoader workers (worker w of W makes micro-batches j = w, w + W, ...; the DataLoader takes
them round-robin, so the rank sees them in order). Resume is the position alone: a run that has
trained on P samples continues at P, on any number of ranks.

Random access. Shards are webdataset tars written by `mtgpt prepare`; the tar headers are read
once to find each record's bytes, and samples are read through memory maps (the page cache does
the rest). A data folder at a URL is fetched into a local cache first (`mtgpt.data.remote`).
"""

from __future__ import annotations

import mmap
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtgpt.data.sources import DataError

VERIFY_HINT = "check the folder with `mtgpt info DATA_DIR --verify` and prepare it again"


class Split:
    """Random access to the samples of one split of a local data folder, by index in the order
    `prepare` wrote them. Shards are checked against the manifest (size, sample count) when
    indexed; token ids are checked when read."""

    def __init__(self, data_dir: str | Path, manifest: dict[str, Any], split: str, vocab_size: int = 50257):
        self.paths = [Path(data_dir) / s["file"] for s in manifest["splits"][split]["shards"]]
        self.sample_bytes = 2 * manifest["sample_tokens"]
        self.vocab_size = vocab_size
        shard_of, offsets, counts = [], [], []
        for k, (path, shard) in enumerate(zip(self.paths, manifest["splits"][split]["shards"])):
            records = _index_shard(path, shard, self.sample_bytes)
            shard_of += [k] * len(records)
            offsets += [offset for offset, _ in records]
            counts += [n for _, n in records]
        self.record_shard = np.array(shard_of, dtype=np.int64)
        self.record_offset = np.array(offsets, dtype=np.int64)
        self.record_first = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # first sample of each
        self._maps: list[mmap.mmap | None] = [None] * len(self.paths)  # opened on first use, per process

    def __len__(self) -> int:
        return int(self.record_first[-1])

    def __getstate__(self) -> dict[str, Any]:  # to DataLoader workers: indexes, not open maps
        return {**self.__dict__, "_maps": [None] * len(self.paths)}

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Samples `indices` as a (len(indices), sample_tokens) uint16 array."""
        record = np.searchsorted(self.record_first, indices, side="right") - 1
        start = self.record_offset[record] + (indices - self.record_first[record]) * self.sample_bytes
        out = np.empty((len(indices), self.sample_bytes // 2), dtype="<u2")
        for row, (k, at) in enumerate(zip(self.record_shard[record].tolist(), start.tolist())):
            out[row] = np.frombuffer(self._map(k), dtype="<u2", count=self.sample_bytes // 2, offset=at)
        if len(out) and out.max() >= self.vocab_size:
            bad = self.paths[self.record_shard[record][np.argmax(out.max(1) >= self.vocab_size)]]
            raise DataError(f"shard {bad} holds token ids >= the vocab size {self.vocab_size}; {VERIFY_HINT}")
        return out

    def _map(self, k: int) -> mmap.mmap:
        if self._maps[k] is None:
            with self.paths[k].open("rb") as f:
                self._maps[k] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[k]


def _index_shard(path: Path, shard: dict[str, Any], sample_bytes: int) -> list[tuple[int, int]]:
    """(byte offset, samples) of each record of one shard, from its tar headers."""
    size = path.stat().st_size if path.is_file() else None
    if size != shard["bytes"]:
        raise DataError(f"shard {path} is truncated or replaced: {size} bytes, the manifest says "
                        f"{shard['bytes']}; {VERIFY_HINT}")
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"shard {path} is corrupt ({e}); {VERIFY_HINT}") from e
    records = []
    for m in members:
        if not m.name.endswith(".tokens.u16") or m.size % sample_bytes or m.offset_data + m.size > size:
            raise DataError(f"shard {path}: member {m.name} is not a record of {sample_bytes // 2}-token "
                            f"samples; {VERIFY_HINT}")
        records.append((m.offset_data, m.size // sample_bytes))
    if sum(n for _, n in records) != shard["samples"]:
        raise DataError(f"shard {path} holds {sum(n for _, n in records)} samples, the manifest says "
                        f"{shard['samples']}; {VERIFY_HINT}")
    return records


class Order:
    """Global position -> train sample index: epoch after epoch, each a fresh permutation."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        epochs = positions // self.n
        out = np.empty_like(positions)
        for e in np.unique(epochs).tolist():  # a batch spans at most two epochs
            here = epochs == e
            out[here] = self.permutation(e)[positions[here] % self.n]
        return out


def rank_positions(start: int, j: int, micro_batch: int, rank: int, world: int) -> np.ndarray:
    """The global positions of micro-batch j of `rank` (see the module docstring)."""
    first = start + j * micro_batch * world + rank * micro_batch
    return np.arange(first, first + micro_batch, dtype=np.int64)


class _RankDataset(IterableDataset):
    """What each DataLoader worker (or the main process, with 0 workers) iterates: batches."""

    def __init__(self, split: Split, micro_batch: int, rank: int, world: int, seed: int, workers: int,
                 start: int):
        self.split, self.micro_batch, self.rank, self.world = split, micro_batch, rank, world
        self.seed, self.workers, self.start = seed, max(1, workers), start

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        order = Order(len(self.split), self.seed)
        j = 0 if info is None else info.id
        while True:
            positions = rank_positions(self.start, j, self.micro_batch, self.rank, self.world)
            yield torch.from_numpy(self.split.read(order[positions]).astype(np.int64))  # (B, T + 1)
            j += self.workers


class TrainBatches:
    """(x, y) batches for one rank from the train `Split`, each (micro_batch, block_size) int64,
    endless. `start` is the global position to begin at (samples the run has trained on, all
    ranks together).

    `state_dict()` is what a checkpoint needs to continue the order, on any number of ranks."""

    def __init__(self, split: Split, micro_batch: int, rank: int, world: int, seed: int,
                 num_workers: int = 0, start: int = 0, device: torch.device | str = "cpu"):
        self.micro_batch, self.world, self.seed, self.start = micro_batch, world, seed, start
        self.consumed = 0  # micro-batches this rank has taken
        self.device = torch.device(device)
        self.train_samples = len(split)
        dataset = _RankDataset(split, micro_batch, rank, world, seed, num_workers, start)
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                 pin_memory=self.device.type == "cuda",
                                 prefetch_factor=4 if num_workers else None)
        self._it: Iterator[torch.Tensor] | None = None

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it).to(self.device, non_blocking=True)
        self.consumed += 1
        return batch[:, :-1], batch[:, 1:]  # inputs, targets shifted by one

    @property
    def position(self) -> int:
        """The global position after the micro-batches every rank has taken so far (ranks take
        them in step, so this is the same on every rank)."""
        return self.start + self.consumed * self.micro_batch * self.world

    def state_dict(self) -> dict[str, int]:
        return {"samples": self.position, "seed": self.seed, "train_samples": self.train_samples}


def resume_position(state: dict[str, Any], seed: int, train_samples: int) -> int | None:
    """The global position to continue a saved order (`TrainBatches.state_dict()`), or None when
    it cannot continue: another seed, another train split, or a checkpoint from before the global
    order (then the data order starts over, a new shuffle)."""
    if "samples" not in state or (state["seed"], state["train_samples"]) != (seed, train_samples):
        return None
    return state["samples"]


def load_val(data_dir: str | Path, manifest: dict[str, Any], n_samples: int, rank: int, world: int,
             vocab_size: int = 50257) -> torch.Tensor:
    """The fixed val set: n_samples val samples spread evenly over the whole val split (so every
    part of the corpus, every file, is evaluated, not just the first), this rank's share (every
    world-th of them). Returns (n_local, block_size + 1) int64; the same tokens at every
    evaluation. Every rank gets the same number of samples (ZeRO-3 needs the same number of
    forward passes on every rank): n is rounded down to a multiple of world, and with fewer
    samples than ranks each rank evaluates them all."""
    total = manifest["splits"]["val"]["samples"]
    n = min(n_samples, total)
    if n >= world:
        n = n // world * world
    if n == 0:
        return torch.zeros(0, manifest["sample_tokens"], dtype=torch.int64)
    wanted = ((np.arange(n) + 0.5) * total / n).astype(np.int64)  # evenly spaced, distinct
    if n >= world:
        wanted = wanted[rank::world]
    return torch.from_numpy(Split(data_dir, manifest, "val", vocab_size).read(wanted).astype(np.int64))
