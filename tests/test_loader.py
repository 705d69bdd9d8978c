"""The loader: one global shuffled order of train samples, shared by any number of ranks and
workers, resumable at a position; the fixed val set. On real shards written by `mtgpt prepare`."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mtgpt.data import DataError, load_manifest, verify
from mtgpt.data.loader import Split, TrainBatches, load_val, resume_position
from mtgpt.data.prepare import prepare
from tests.conftest import SONNETS
from tests.test_data import all_train_samples


def rows(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    """The samples of a batch (inputs plus the last target), as bytes."""
    return [row.numpy().astype("<u2").tobytes() for row in torch.cat([x, y[:, -1:]], 1)]


def batches(data: Path, micro: int, rank: int, world: int, seed: int = 0, workers: int = 0, start: int = 0):
    return TrainBatches(Split(data, load_manifest(data), "train"), micro, rank, world, seed, workers, start)


@pytest.fixture(scope="module")
def numbers(tmp_path_factory) -> dict[str, Path]:
    """A corpus whose samples are all distinct (counting 0, 1, 2, ...), in one shard and in many."""
    text = tmp_path_factory.mktemp("text") / "numbers.txt"
    text.write_text(" ".join(str(i) for i in range(30_000)) + "\n")
    out = {}
    for name, mb in (("one shard", 100.0), ("many shards", 0.01)):
        out[name] = tmp_path_factory.mktemp("data") / name.replace(" ", "-")
        prepare([str(text)], out[name], block_size=8, val_fraction=0.0, shard_size_mb=mb, quiet=True)
    return out


def test_targets_are_inputs_shifted(tiny_data):
    x, y = next(batches(tiny_data, 4, 0, 1))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("shards", ["one shard", "many shards"])
@pytest.mark.parametrize("ranks", [1, 3])
def test_the_first_batches_are_a_fair_sample_of_the_corpus(numbers, shards, ranks):
    """The samples of the first 5% of an epoch come from all over the corpus: their mean position
    in it is the middle (in reading order it would be 2.5%)."""
    data = numbers[shards]
    position = {s: i for i, s in enumerate(all_train_samples(data))}
    assert len(position) == load_manifest(data)["splits"]["train"]["samples"]  # all distinct
    n = len(position)
    micro = 4
    steps = n // 20 // (micro * ranks)
    seen = []
    for rank in range(ranks):
        stream = batches(data, micro, rank, ranks, seed=3)
        seen += [position[s] for _ in range(steps) for s in rows(*next(stream))]
    assert len(seen) >= n // 25 and len(set(seen)) == len(seen)
    assert abs(np.mean(seen) / n - 0.5) < 0.03
    assert np.min(seen) < 0.02 * n and np.max(seen) > 0.98 * n


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_epoch_visits_every_sample_once(tiny_data, ranks, workers):
    """Over the first epoch's positions the ranks (through the real DataLoader and its workers)
    see every train sample exactly once; the second epoch is another order of the same samples."""
    n = load_manifest(tiny_data)["splits"]["train"]["samples"]
    micro = 2
    epochs: list[list[bytes]] = [[], []]
    for rank in range(ranks):
        stream = batches(tiny_data, micro, rank, ranks, workers=workers)
        for j in range(2 * n // (micro * ranks) + 1):
            for i, s in enumerate(rows(*next(stream))):
                position = j * micro * ranks + rank * micro + i
                if position < 2 * n:
                    epochs[position // n].append(s)
    everything = Counter(all_train_samples(tiny_data))
    assert Counter(epochs[0]) == everything and Counter(epochs[1]) == everything
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_global_batches_are_the_same_on_any_number_of_ranks(tiny_data, workers):
    """Global batch k (micro x ranks samples) holds the same samples, in the same places, for 1, 2
    or 4 ranks, with or without workers: rank r takes its slice of one order."""
    global_batch, steps = 4, 50  # 200 samples: past the first epoch
    one = batches(tiny_data, global_batch, 0, 1)
    expected = [rows(*next(one)) for _ in range(steps)]
    for world in (2, 4):
        micro = global_batch // world
        streams = [batches(tiny_data, micro, r, world, workers=workers) for r in range(world)]
        got = [[s for stream in streams for s in rows(*next(stream))] for _ in range(steps)]
        assert got == expected, world


@pytest.mark.parametrize("workers", [0, 2])
def test_deterministic_and_resumable_at_a_position(tiny_data, workers):
    take = lambda stream, n: [rows(*next(stream)) for _ in range(n)]  # noqa: E731
    first = take(batches(tiny_data, 3, 1, 2, seed=5, workers=workers), 40)  # 240 samples: into epoch 2
    assert first == take(batches(tiny_data, 3, 1, 2, seed=5, workers=workers), 40)
    assert first != take(batches(tiny_data, 3, 1, 2, seed=6, workers=workers), 40)
    for j in (1, 7, 13, 30):
        resumed = batches(tiny_data, 3, 1, 2, seed=5, workers=workers, start=j * 3 * 2)
        assert take(resumed, 40 - j) == first[j:]
        assert resumed.state_dict()["samples"] == 40 * 3 * 2
    # the same position on one rank (micro 6 = the same global batch): the same samples go on
    alone = take(batches(tiny_data, 6, 0, 1, seed=5, workers=workers, start=13 * 6), 27)
    assert [a[3:] for a in alone] == first[13:]


def val_rows(data: Path, m: dict, n: int, rank: int, world: int) -> torch.Tensor:
    """load_val's scored samples whole, (n, block_size + 1) (plain text: y is never -1, except in
    the one filler row a rank may get, whose targets are all -1 and which is left out here)."""
    x, y = load_val(data, m, n, rank, world)
    scored = (y >= 0).all(1)
    assert bool((scored | (y == -1).all(1)).all()) and bool(scored[:-1].all())  # a filler only last
    return torch.cat([x, y[:, -1:]], 1)[scored]


def test_resume_position_rules():
    saved = {"samples": 96, "seed": 1, "train_samples": 400}
    assert resume_position(saved, 1, 400) == (96, None, [])
    assert resume_position(saved, 2, 400) is None  # another seed: another order
    assert resume_position(saved, 1, 401) == (0, None, [0])  # another train split: its shuffle starts over
    named = {**saved, "names": ["books"]}
    assert resume_position(named, 1, 400, names=["books"]) == (96, None, [])
    assert resume_position(named, 1, 400, names=["other"]) == (0, None, [0])  # another source of the same size
    held = {**named, "ids": ["a1"]}  # what it holds (manifest.identity) decides, whatever its name now
    assert resume_position(held, 1, 400, names=["moved"], ids=["a1"]) == (96, None, [])  # a folder moved or renamed
    assert resume_position(held, 1, 400, names=["books"], ids=["b2"]) == (0, None, [0])  # prepared again
    assert resume_position(named, 1, 400, names=["books"], ids=["b2"]) == (96, None, [])  # saved without ids: by name
    assert resume_position({"batches": 12, "world": 2, "num_workers": 0, "micro_batch": 4, "seed": 1},
                           1, 400) is None  # saved by mtgpt before the global order


def test_a_batch_larger_than_the_train_split(tmp_path):
    """Fewer samples than one global batch: batches wrap into the next epochs, no error, no end."""
    m = prepare([str(SONNETS)], tmp_path / "d", block_size=2000, val_fraction=0.0, quiet=True)
    n = m["splits"]["train"]["samples"]
    stream = batches(tmp_path / "d", 2 * n + 1, 0, 1)
    for _ in range(3):
        x, _ = next(stream)
        assert x.shape == (2 * n + 1, 2000)


def test_val_is_fixed_and_split(tiny_data):
    m = load_manifest(tiny_data)
    full = val_rows(tiny_data, m, 6, 0, 1)
    assert full.shape == (6, 33)
    assert torch.equal(full, val_rows(tiny_data, m, 6, 0, 1))
    parts = [val_rows(tiny_data, m, 6, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts).sort(0).values, full.sort(0).values)
    # any number of ranks: the same set (a run resumed on another number compares like with like),
    # and the same number of rows on every rank (ZeRO-3): a share one short gets an unscored filler
    for n, world in ((7, 3), (5, 2), (1, 2), (2, 4)):
        every = val_rows(tiny_data, m, n, 0, 1)
        parts = [val_rows(tiny_data, m, n, r, world) for r in range(world)]
        assert torch.equal(torch.cat(parts).sort(0).values, every.sort(0).values), (n, world)
        assert len({len(load_val(tiny_data, m, n, r, world)[0]) for r in range(world)}) == 1


def test_val_set_is_spread_over_the_whole_split(tmp_path):
    """Two files: the samples evaluated during training come from all of the val split (they used
    to be the first --eval-samples, all from the first file)."""
    lines = SONNETS.read_text().splitlines()
    (tmp_path / "a.txt").write_text("\n".join(lines[: len(lines) // 2]))
    (tmp_path / "b.txt").write_text("\n".join(lines[len(lines) // 2:]))
    m = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tmp_path / "d", block_size=8,
                val_fraction=0.2, quiet=True)
    every = val_rows(tmp_path / "d", m, 10**6, 0, 1)  # the whole val split, in order
    assert len(every) == m["splits"]["val"]["samples"]
    picked = val_rows(tmp_path / "d", m, 16, 0, 1)
    position = [next(i for i, row in enumerate(every) if torch.equal(row, p)) for p in picked]
    assert position == sorted(position) and len(set(position)) == 16
    assert abs(sum(position) / 16 / len(every) - 0.5) < 0.05  # centred on the middle of the split
    assert position[0] < len(every) * 0.1 and position[-1] > len(every) * 0.9


# ---------------------------------------------------------------- damaged shards


def test_truncated_shard_is_named(tiny_data, tmp_path):
    data = tmp_path / "copy"
    shutil.copytree(tiny_data, data)
    m = load_manifest(data)
    shard = data / m["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert verify(data)
    with pytest.raises(DataError, match=f"{shard.name} is truncated.*--verify"):
        batches(data, 1, 0, 1)


def test_token_ids_beyond_the_vocabulary_are_named(tiny_data, tmp_path):
    """A shard whose bytes were damaged in place (same size) is named when read."""
    data = tmp_path / "copy"
    shutil.copytree(tiny_data, data)
    m = load_manifest(data)
    shard = data / m["splits"]["train"]["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[1536:1536 + 64] = b"\xff" * 64  # the first record's data (after its pax and tar headers)
    shard.write_bytes(bytes(raw))
    stream = batches(data, m["splits"]["train"]["samples"], 0, 1)  # one batch reads every sample
    with pytest.raises(DataError, match=f"{shard.name} holds token ids >= the vocab size 50257"):
        next(stream)


def _ranks_in_step(rank: int, world: int, data_dir: str, port: int, steps: int, out) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    stream = batches(Path(data_dir), 2, rank, world)
    for _ in range(steps):
        x, _ = next(stream)
        total = torch.tensor([float(x.sum())])
        tdist.all_reduce(total)  # every step is a collective: a rank that ran dry would hang the rest
    out.put((rank, stream.state_dict()["samples"]))
    tdist.destroy_process_group()


def test_three_ranks_over_four_uneven_shards_never_hang(tmp_path):
    """Real gloo ranks over shards of unequal sizes: many epochs, every rank in step."""
    import torch.multiprocessing as mp

    from mtgpt.world import free_port

    data = tmp_path / "d"
    m = prepare([str(SONNETS)], data, block_size=32, val_fraction=0.0, shard_size_mb=0.004, quiet=True)
    assert len(m["splits"]["train"]["shards"]) == 4
    assert len({s["samples"] for s in m["splits"]["train"]["shards"]}) > 1
    steps = 3 * m["splits"]["train"]["samples"] // (2 * 3) + 1  # three epochs
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ranks_in_step, args=(r, 3, str(data), port, steps, out)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert sorted(out.get(timeout=5) for _ in range(3)) == [(r, steps * 2 * 3) for r in range(3)]


def test_a_data_folder_removed_while_training_is_one_line(tiny_data, tmp_path):
    """`rm -rf` of the data folder mid-run: the next shard a rank opened raised FileNotFoundError
    through the DataLoader's internals (a 150-line traceback); now a DataError naming the fix."""
    data = shutil.copytree(tiny_data, tmp_path / "data")
    split = Split(data, load_manifest(data), "train")
    assert len(split.paths) > 1
    split.read(np.array([0]))  # the first shard is open (mapped): it stays readable
    shutil.rmtree(data)
    with pytest.raises(DataError, match=r"shard .*train-\d+\.tar is gone: the data folder was moved or removed "
                                        r"while training; put it back and resume with --resume auto"):
        split.read(np.array([len(split) - 1]))  # a sample of the last shard
