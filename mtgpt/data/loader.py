"""Shards -> batches: an endless, deterministic, resumable stream per rank, and a fixed val set.

Who reads what. Every data reader is a *consumer*: DataLoader worker w of rank r is consumer
k = r * W + w of N = world * W (W = max(1, num_workers)). Each epoch, the train shards are
shuffled with (seed, epoch) and then
  - with at least N shards, consumer k reads shards[k::N] (what webdataset's `split_by_node`
    followed by `split_by_worker` does, with rank and worker passed in explicitly);
  - with fewer shards than consumers (small corpora), every consumer reads all shards and keeps
    sample i when i % N == k.
Either way the consumers read disjoint samples and together cover the epoch once. Within its
share a consumer shuffles samples in a buffer seeded with (seed, epoch, k).

No hang on an uneven tail. Consumers never run dry: each one goes on to its next epoch, so every
rank can draw as many batches as the training loop asks for. An "epoch" of the run is counted in
tokens (tokens seen / train tokens), not by any rank reaching its end.

Resume. The stream is a pure function of (seed, world, W, micro_batch): the state to save is the
number of batches this rank has consumed. On resume each consumer skips whole epochs by
arithmetic and replays the rest of the current one, so the next batch is exactly the one that
would have come.
"""

from __future__ import annotations

import itertools
import random
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtgpt.data.sources import DataError

SHUFFLE_BUFFER = 2048  # samples (~2 MB at block_size 512)


def _records(path: Path, sample_tokens: int, vocab_size: int, expected: int) -> Iterator[np.ndarray]:
    """Yield each record of one shard as a (n, sample_tokens) uint16 array. A truncated or
    corrupt shard raises DataError naming it."""
    seen = 0
    try:
        for sample in wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()):
            data = sample["tokens.u16"]
            if len(data) % (2 * sample_tokens):
                raise ValueError(f"record {sample['__key__']} holds {len(data)} bytes, not a whole "
                                 f"number of {sample_tokens}-token samples")
            record = np.frombuffer(data, dtype="<u2").reshape(-1, sample_tokens)
            if record.max(initial=0) >= vocab_size:
                raise ValueError(f"record {sample['__key__']} holds token ids >= vocab size {vocab_size}")
            seen += len(record)
            yield record
    except (ValueError, KeyError, OSError, tarfile.TarError) as e:
        raise DataError(f"shard {path} is corrupt or truncated ({e}); check the folder with "
                        "`mtgpt info DATA_DIR --verify` and prepare it again") from e
    if seen != expected:
        raise DataError(f"shard {path} is truncated: {seen} samples, the manifest says {expected}; "
                        "check with `mtgpt info DATA_DIR --verify` and prepare it again")


class ConsumerStream:
    """The endless sample stream of consumer k of N (see the module docstring)."""

    def __init__(self, data_dir: str | Path, manifest: dict[str, Any], seed: int, k: int, n: int,
                 vocab_size: int = 50257):
        self.data_dir = Path(data_dir)
        self.shards = manifest["splits"]["train"]["shards"]
        self.sample_tokens = manifest["sample_tokens"]
        self.vocab_size = vocab_size
        self.seed, self.k, self.n = seed, k, n
        total = sum(s["samples"] for s in self.shards)
        if len(self.shards) < n and total < n:
            raise DataError(f"{data_dir} has {total} training samples, fewer than the {n} data readers "
                            "(ranks x max(1, num_workers)); use fewer ranks or workers, a smaller "
                            "--block-size, or more text")

    def _epoch_shards(self, epoch: int) -> list[dict[str, Any]]:
        order = list(self.shards)
        random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        return order[self.k::self.n] if len(order) >= self.n else order

    def epoch_length(self, epoch: int) -> int:
        """Samples this consumer reads in `epoch` (known from the manifest, nothing read)."""
        if len(self.shards) >= self.n:
            return sum(s["samples"] for s in self._epoch_shards(epoch))
        total = sum(s["samples"] for s in self.shards)
        return (total - self.k + self.n - 1) // self.n

    def _epoch_samples(self, epoch: int) -> Iterator[np.ndarray]:
        strided = len(self.shards) < self.n
        index = 0
        for shard in self._epoch_shards(epoch):
            for record in _records(self.data_dir / shard["file"], self.sample_tokens,
                                   self.vocab_size, shard["samples"]):
                if strided:  # keep global sample indices i with i % n == k
                    first = (self.k - index) % self.n
                    yield from record[first::self.n]
                else:
                    yield from record
                index += len(record)

    def samples(self, skip: int = 0) -> Iterator[np.ndarray]:
        """Endless: epoch after epoch, each shuffled in a buffer; the first `skip` samples dropped."""
        epoch = 0
        while skip >= self.epoch_length(epoch) > 0:  # whole epochs: skipped by arithmetic
            skip -= self.epoch_length(epoch)
            epoch += 1
        while True:
            rng = random.Random(f"samples-{self.seed}-{epoch}-{self.k}")
            stream = wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=rng)(self._epoch_samples(epoch))
            yield from itertools.islice(stream, skip, None)
            skip = 0
            epoch += 1


class _RankDataset(IterableDataset):
    """What each DataLoader worker (or the main process, with 0 workers) iterates: batches."""

    def __init__(self, data_dir, manifest, micro_batch, rank, world, seed, num_workers, start, vocab_size):
        self.args = (data_dir, manifest, seed)
        self.micro_batch, self.rank, self.world = micro_batch, rank, world
        self.workers, self.start, self.vocab_size = max(1, num_workers), start, vocab_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        w = 0 if info is None else info.id
        # The DataLoader takes batches round-robin from its workers, starting with worker 0. Batch
        # j of the whole stream belongs to reader j % W, so after `start` batches worker w plays
        # reader (w + start) % W, which has already produced ceil((start - reader) / W) batches.
        reader = (w + self.start) % self.workers
        done = max(0, -(-(self.start - reader) // self.workers))
        data_dir, manifest, seed = self.args
        stream = ConsumerStream(data_dir, manifest, seed, self.rank * self.workers + reader,
                                self.world * self.workers, self.vocab_size)
        samples = stream.samples(skip=done * self.micro_batch)
        while True:
            batch = np.stack(list(itertools.islice(samples, self.micro_batch)))  # (B, T+1) uint16
            yield torch.from_numpy(batch.astype(np.int64))


class TrainBatches:
    """(x, y) batches for one rank, each (micro_batch, block_size) int64, endless.

    `state_dict()` is what a checkpoint needs to continue the stream exactly."""

    def __init__(self, data_dir: str | Path, manifest: dict[str, Any], micro_batch: int, rank: int,
                 world: int, seed: int, num_workers: int = 0, start: int = 0,
                 device: torch.device | str = "cpu", vocab_size: int = 50257):
        self.micro_batch, self.world, self.seed, self.num_workers = micro_batch, world, seed, num_workers
        self.consumed = start
        self.device = torch.device(device)
        dataset = _RankDataset(data_dir, manifest, micro_batch, rank, world, seed, num_workers, start,
                               vocab_size)
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

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.consumed, "world": self.world, "num_workers": self.num_workers,
                "micro_batch": self.micro_batch, "seed": self.seed}


def resume_position(state: dict[str, int], world: int, num_workers: int, micro_batch: int,
                    seed: int) -> int | None:
    """Batches to skip to continue a saved stream (`TrainBatches.state_dict()`), or None when
    the stream now has another shape (then the data order starts over, a new shuffle)."""
    same = (state["world"], state["num_workers"], state["micro_batch"], state["seed"]) == \
        (world, num_workers, micro_batch, seed)
    return state["batches"] if same else None


def load_val(data_dir: str | Path, manifest: dict[str, Any], n_samples: int, rank: int, world: int,
             vocab_size: int = 50257) -> torch.Tensor:
    """The fixed val set: n_samples val samples spread evenly over the whole val split (so every
    part of the corpus, every file, is evaluated, not just the first), this rank's share (every
    world-th of them). Returns (n_local, block_size + 1) int64; the same tokens at every
    evaluation. Every rank gets the same number of samples (ZeRO-3 needs the same number of
    forward passes on every rank): n is rounded down to a multiple of world, and with fewer
    samples than ranks each rank evaluates them all."""
    data_dir = Path(data_dir)
    total = manifest["splits"]["val"]["samples"]
    n = min(n_samples, total)
    if n >= world:
        n = n // world * world
    if n == 0:
        return torch.zeros(0, manifest["sample_tokens"], dtype=torch.int64)
    wanted = ((np.arange(n) + 0.5) * total / n).astype(np.int64)  # evenly spaced, distinct
    rows: list[np.ndarray] = []
    seen = 0
    for shard in manifest["splits"]["val"]["shards"]:
        for record in _records(data_dir / shard["file"], manifest["sample_tokens"], vocab_size,
                               shard["samples"]):
            lo, hi = np.searchsorted(wanted, [seen, seen + len(record)])
            rows.append(record[wanted[lo:hi] - seen])
            seen += len(record)
            if seen > wanted[-1]:
                break
        if seen > wanted[-1]:
            break
    val = np.concatenate(rows)
    if len(val) >= world:
        val = val[rank::world]
    return torch.from_numpy(val.astype(np.int64))
