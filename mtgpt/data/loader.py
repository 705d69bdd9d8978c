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

Mixtures. With several sources (`--data a:0.7 --data b:0.3`), global position g is a draw from
source mixture.Mixture.sources(g), a pure function of (seed, g); the k-th draw of source s is its
sample Order(n_s, seed, s)[k], so each source goes epoch after epoch through its own shuffles. Every
rank computes the sources of the whole global micro-step (cheap), so the k of each draw is exact
on every rank and worker; resume is the position plus the per-source draw counts (`state_dict`).
One source is exactly the order above.

Loss masks. Chat data (`prepare --format chat`) stores beside each record's tokens a mask of the
tokens to train on (the bot's); a target that is not trained on is -1 in y (cross-entropy ignores
it). Plain text has no mask: every target is trained.

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

from mtgpt.data.mixture import Mixture
from mtgpt.data.sources import DataError

VERIFY_HINT = "check the folder with `mtgpt info DATA_DIR --verify` and prepare it again"


class Split:
    """Random access to the samples of one split of a local data folder, by index in the order
    `prepare` wrote them. Shards are checked against the manifest (size, sample count) when
    indexed; token ids are checked when read. `masked`: the samples carry loss masks."""

    def __init__(self, data_dir: str | Path, manifest: dict[str, Any], split: str, vocab_size: int = 50257):
        self.paths = [Path(data_dir) / s["file"] for s in manifest["splits"][split]["shards"]]
        self.sample_bytes = 2 * manifest["sample_tokens"]
        self.vocab_size = vocab_size
        self.masked = bool(manifest.get("loss_mask"))
        shard_of, offsets, mask_offsets, counts = [], [], [], []
        for k, (path, shard) in enumerate(zip(self.paths, manifest["splits"][split]["shards"])):
            records = _index_shard(path, shard, self.sample_bytes, self.masked)
            shard_of += [k] * len(records)
            offsets += [offset for offset, _, _ in records]
            mask_offsets += [offset for _, offset, _ in records]
            counts += [n for _, _, n in records]
        self.record_shard = np.array(shard_of, dtype=np.int64)
        self.record_offset = np.array(offsets, dtype=np.int64)
        self.record_mask = np.array(mask_offsets, dtype=np.int64)
        self.record_first = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # first sample of each
        self._maps: list[mmap.mmap | None] = [None] * len(self.paths)  # opened on first use, per process

    def __len__(self) -> int:
        return int(self.record_first[-1])

    def __getstate__(self) -> dict[str, Any]:  # to DataLoader workers: indexes, not open maps
        return {**self.__dict__, "_maps": [None] * len(self.paths)}

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Samples `indices` as a (len(indices), sample_tokens) uint16 array."""
        out, shards = self._gather(indices, self.record_offset, np.dtype("<u2"))
        if len(out) and out.max() >= self.vocab_size:
            bad = self.paths[shards[np.argmax(out.max(1) >= self.vocab_size)]]
            raise DataError(f"shard {bad} holds token ids >= the vocab size {self.vocab_size}; {VERIFY_HINT}")
        return out

    def read_mask(self, indices: np.ndarray) -> np.ndarray:
        """The loss masks of samples `indices`, (len(indices), sample_tokens) bool (all True
        when the split has none: plain text trains on every token)."""
        if not self.masked:
            return np.ones((len(indices), self.sample_bytes // 2), dtype=bool)
        return self._gather(indices, self.record_mask, np.dtype(np.uint8))[0].astype(bool)

    def _gather(self, indices: np.ndarray, record_offsets: np.ndarray, dtype: np.dtype
                ) -> tuple[np.ndarray, np.ndarray]:
        """(the sample_tokens items of `dtype` of each sample, read from its record's member at
        `record_offsets`, and the shard each row came from)."""
        n = self.sample_bytes // 2
        record = np.searchsorted(self.record_first, indices, side="right") - 1
        start = record_offsets[record] + (indices - self.record_first[record]) * n * dtype.itemsize
        shards = self.record_shard[record]
        out = np.empty((len(indices), n), dtype=dtype)
        for row, (k, at) in enumerate(zip(shards.tolist(), start.tolist())):
            out[row] = np.frombuffer(self._map(k), dtype=dtype, count=n, offset=at)
        return out, shards

    def examples(self, indices: np.ndarray) -> np.ndarray:
        """(2, len(indices), sample_tokens - 1) int64: the inputs x of samples `indices`, and their
        targets y (shifted by one) with -1 where the loss mask says not to train."""
        tokens = self.read(indices)
        out = np.empty((2, len(indices), tokens.shape[1] - 1), dtype=np.int64)
        out[0], out[1] = tokens[:, :-1], tokens[:, 1:]
        if self.masked:
            out[1][~self.read_mask(indices)[:, 1:]] = -1
        return out

    def _map(self, k: int) -> mmap.mmap:
        if self._maps[k] is None:
            try:
                with self.paths[k].open("rb") as f:
                    self._maps[k] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except FileNotFoundError:
                raise DataError(f"shard {self.paths[k]} is gone: the data folder was moved or removed while "
                                "training; put it back and resume with --resume auto (--data NEW_PATH if it "
                                "moved)") from None
        return self._maps[k]


def _index_shard(path: Path, shard: dict[str, Any], sample_bytes: int, masked: bool) -> list[tuple[int, int, int]]:
    """(byte offset of the tokens, byte offset of the mask or -1, samples) of each record of one
    shard, from its tar headers."""
    size = path.stat().st_size if path.is_file() else None
    if size != shard["bytes"]:
        raise DataError(f"shard {path} is truncated or replaced: {size} bytes, the manifest says "
                        f"{shard['bytes']}; {VERIFY_HINT}")
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"shard {path} is corrupt ({e}); {VERIFY_HINT}") from e
    tokens, masks = {}, {}
    for m in members:
        key, _, kind = m.name.partition(".")
        ok = {"tokens.u16": m.size % sample_bytes == 0, "mask.u8": masked and m.size % (sample_bytes // 2) == 0}
        if not ok.get(kind) or m.offset_data + m.size > size:
            raise DataError(f"shard {path}: member {m.name} is not a record of {sample_bytes // 2}-token "
                            f"samples{' or their loss masks' if masked else ''}; {VERIFY_HINT}")
        (tokens if kind == "tokens.u16" else masks)[key] = m
    records = []
    for key, m in tokens.items():
        n = m.size // sample_bytes
        mask = masks.get(key)
        if masked and (mask is None or mask.size != n * sample_bytes // 2):
            raise DataError(f"shard {path}: record {key} has no loss mask of its {n} samples; {VERIFY_HINT}")
        records.append((m.offset_data, mask.offset_data if masked else -1, n))
    if sum(n for _, _, n in records) != shard["samples"]:
        raise DataError(f"shard {path} holds {sum(n for _, _, n in records)} samples, the manifest says "
                        f"{shard['samples']}; {VERIFY_HINT}")
    return records


class Order:
    """Draw k -> train sample index: epoch after epoch, each a fresh permutation. Source s of a
    mixture has its own (`stream` s; source 0's is the one-source order)."""

    def __init__(self, n: int, seed: int, stream: int = 0):
        self.n, self.key = n, [seed] if stream == 0 else [seed, stream]
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng(self.key[:1] + [epoch] + self.key[1:])
            self._epoch, self._perm = epoch, rng.permutation(self.n)
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


class Draws:
    """Global positions, asked for in increasing order from `start`, -> (source, sample index in
    that source's train split). `counts`: each source's draws before `start` (rebuilt from the
    mixture when not given). With one source, position g is simply Order(n, seed)[g]."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, start: int = 0,
                 counts: list[int] | None = None):
        self.orders = [Order(n, seed, s) for s, n in enumerate(sizes)]
        self.mixture = Mixture(weights, seed) if len(sizes) > 1 else None
        self.position = start
        if counts is None:
            counts = self.mixture.counts_at(start) if self.mixture else [start]
        self.counts = np.asarray(counts, dtype=np.int64)

    def advance(self, position: int) -> None:
        """Count the draws before `position` (>= the current one) without reading them."""
        if position > self.position:
            self.counts = (self.mixture.draws(self.position, position - self.position, self.counts)[2]
                           if self.mixture else np.array([position]))
            self.position = position

    def take(self, first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Sources and sample indices of positions first..first+n-1 (first >= the last one asked)."""
        if first < self.position:
            raise ValueError(f"position {first} is before {self.position}: draws are taken in order")
        if self.mixture is None:  # one source: draw k is position k
            src, k, self.counts = np.zeros(n, dtype=np.int64), np.arange(first, first + n), np.array([first + n])
        else:  # from the last position asked: other ranks' (and workers') draws are counted, not read
            src, k, self.counts = self.mixture.draws(self.position, first + n - self.position, self.counts)
            src, k = src[-n:], k[-n:]
        self.position = first + n
        index = np.empty(n, dtype=np.int64)
        for s in np.unique(src).tolist():
            index[src == s] = self.orders[s][k[src == s]]
        return src, index


def read_examples(splits: list[Split], src: np.ndarray, index: np.ndarray) -> torch.Tensor:
    """The samples index[i] of splits[src[i]], in that order, as one int64 tensor (2, B, T): x
    and y stacked (one tensor: a DataLoader worker hands each tensor over separately, ~0.2 ms)."""
    if len(splits) == 1:
        return torch.from_numpy(splits[0].examples(index))
    out = np.empty((2, len(index), splits[0].sample_bytes // 2 - 1), dtype=np.int64)
    for s in np.unique(src).tolist():
        out[:, src == s] = splits[s].examples(index[src == s])
    return torch.from_numpy(out)


class _RankDataset(IterableDataset):
    """What each DataLoader worker (or the main process, with 0 workers) iterates: (x, y) batches."""

    def __init__(self, splits: list[Split], weights: list[float], micro_batch: int, rank: int, world: int,
                 seed: int, workers: int, start: int, counts: list[int] | None):
        self.splits, self.weights, self.micro_batch, self.rank, self.world = splits, weights, micro_batch, rank, world
        self.seed, self.workers, self.start, self.counts = seed, max(1, workers), start, counts

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        draws = Draws([len(s) for s in self.splits], self.weights, self.seed, self.start, self.counts)
        j = 0 if info is None else info.id
        while True:
            first = int(rank_positions(self.start, j, self.micro_batch, self.rank, self.world)[0])
            yield read_examples(self.splits, *draws.take(first, self.micro_batch))  # (2, B, T): x, y
            j += self.workers


class TrainBatches:
    """(x, y) batches for one rank from the train `Split`s of the sources, each (micro_batch,
    block_size) int64, endless; y is -1 where a loss mask says not to train. `start` is the
    global position to begin at (samples the run has trained on, all ranks together), `counts`
    the draws of each source before it (saved by `state_dict`; rebuilt when None).

    `state_dict()` is what a checkpoint needs to continue the order, on any number of ranks.
    `masked`: some source has loss masks (else every target is trained)."""

    def __init__(self, splits: Split | list[Split], micro_batch: int, rank: int, world: int, seed: int,
                 num_workers: int = 0, start: int = 0, device: torch.device | str = "cpu",
                 weights: list[float] | None = None, counts: list[int] | None = None,
                 names: list[str] | None = None, ids: list[str] | None = None):
        splits = [splits] if isinstance(splits, Split) else list(splits)
        weights = list(weights) if weights is not None else [1.0] * len(splits)
        # the sources' names and what they hold (manifest.identity), saved to match them on resume
        self.names, self.ids = (list(names) if names is not None else None), (list(ids) if ids is not None else None)
        if len(weights) != len(splits):
            raise ValueError(f"{len(splits)} sources but {len(weights)} weights")
        self.micro_batch, self.world, self.seed, self.start = micro_batch, world, seed, start
        self.weights = weights
        self.consumed = 0  # micro-batches this rank has taken
        self.device = torch.device(device)
        self.train_samples = [len(s) for s in splits]
        self.masked = any(s.masked for s in splits)
        self.draws = Draws(self.train_samples, weights, seed, start, counts)  # every rank's, to count draws
        dataset = _RankDataset(splits, weights, micro_batch, rank, world, seed, num_workers, start,
                               self.draws.counts.tolist())
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
        self.draws.advance(self.position)  # each source's draws so far, all ranks together
        return batch[0], batch[1]

    @property
    def position(self) -> int:
        """The global position after the micro-batches every rank has taken so far (ranks take
        them in step, so this is the same on every rank)."""
        return self.start + self.consumed * self.micro_batch * self.world

    @property
    def counts(self) -> list[int]:
        """Samples drawn from each source before `position`, all ranks together."""
        return self.draws.counts.tolist()

    def state_dict(self) -> dict[str, Any]:
        names = {**({"names": self.names} if self.names is not None else {}),
                 **({"ids": self.ids} if self.ids is not None else {})}
        if len(self.train_samples) == 1:
            return {"samples": self.position, "seed": self.seed, "train_samples": self.train_samples[0], **names}
        return {"samples": self.position, "seed": self.seed, "train_samples": self.train_samples,
                "weights": self.weights, "counts": self.counts, **names}


def resume_position(state: dict[str, Any], seed: int, train_samples: list[int] | int,
                    weights: list[float] | None = None, names: list[str] | None = None,
                    ids: list[str] | None = None) -> tuple[int, list[int] | None, list[int]] | None:
    """(global position, per-source draw counts, the sources that start their shuffle over) to
    continue a saved order (`TrainBatches.state_dict()`), or None when it cannot continue: another
    seed, or a checkpoint from before the global order (then the data order starts over, a new
    shuffle). A mixture resumed with other weights goes on from its saved counts: each source
    continues its own shuffle where it was, drawn at the new weights from then on (a checkpoint
    without counts cannot, and starts over). A source is the saved one in its place when its
    train split's size and what it holds (`ids`, manifest.identity; a checkpoint from before them:
    its name) are the same, whatever its folder or name now; one that is not (added, replaced,
    prepared again) starts its own shuffle, and the others go on. A source's
    shuffle is that of its place (Order's stream), so sources given in another order cannot go on:
    mtgpt.train refuses that before it gets here. One source after a mixture starts over (its
    draws are the global positions)."""
    sizes = [train_samples] if isinstance(train_samples, int) else list(train_samples)
    if "samples" not in state or state["seed"] != seed:
        return None
    saved = state["train_samples"] if isinstance(state["train_samples"], list) else [state["train_samples"]]
    saved_ids, now_ids = (state.get("ids"), ids) if state.get("ids") and ids else (state.get("names"), names)
    same = [j < len(saved) and saved[j] == n and (saved_ids is None or now_ids is None or saved_ids[j] == now_ids[j])
            for j, n in enumerate(sizes)]
    if all(same) and len(saved) == len(sizes):
        if len(sizes) == 1:
            return state["samples"], None, []
        if weights is not None and list(state.get("weights", [])) != list(weights) and state.get("counts") is None:
            return None
        return state["samples"], state.get("counts"), []
    counts = state.get("counts") if len(saved) > 1 else [state["samples"]]
    if len(sizes) == 1 or counts is None:
        return 0, None, list(range(len(sizes)))
    return state["samples"], [int(counts[j]) if ok else 0 for j, ok in enumerate(same)], \
        [j for j, ok in enumerate(same) if not ok]


def load_val(data_dir: str | Path, manifest: dict[str, Any], n_samples: int, rank: int, world: int,
             vocab_size: int = 50257) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed val set: n_samples val samples spread evenly over the whole val split (so every
    part of the corpus, every file, is evaluated, not just the first), this rank's share (every
    world-th of them), as (x, y) int64 (n_local, block_size) (y -1 where not trained on, as in
    training); the same tokens at every evaluation, on any number of ranks (a run resumed on
    another number compares its val loss with the same set's). Every rank gets the same number
    of rows (ZeRO-3 needs the same number of forward passes on every rank): a rank whose share is
    one short gets a filler row whose targets are all -1, which is run but not scored."""
    total = manifest["splits"]["val"]["samples"]
    n = min(n_samples, total)
    if n == 0:
        empty = torch.zeros(0, manifest["block_size"], dtype=torch.int64)
        return empty, empty.clone()
    wanted = ((np.arange(n) + 0.5) * total / n).astype(np.int64)  # evenly spaced, distinct
    mine = wanted[rank::world]
    filler = -(-n // world) - len(mine)  # 0 or 1
    x, y = torch.from_numpy(Split(data_dir, manifest, "val", vocab_size).examples(
        np.concatenate([mine, wanted[:filler]])))
    y[len(mine):] = -1
    return x, y
