"""Mixtures in process: sources as a pure function of (seed, position), shares within binomial
error, draw indices that continue exactly from saved counts; the loader on two real sources with
disjoint tokens (shares, epochs, exact resume on any number of ranks and workers)."""

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mtgpt import tokenizer
from mtgpt.data import load_manifest
from mtgpt.data.loader import Split, TrainBatches, resume_position
from mtgpt.data.mixture import Mixture, uniforms
from mtgpt.data.prepare import prepare

GPT2 = tokenizer.gpt2()


def test_uniforms_are_a_function_of_seed_and_position():
    pos = np.arange(100_000)
    u = uniforms(7, pos)
    assert np.array_equal(u, uniforms(7, pos)) and not np.array_equal(u, uniforms(8, pos))
    assert np.array_equal(uniforms(7, pos[5000:6000]), u[5000:6000])  # any slice, anywhere
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01  # neighbours are not related


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 2], [0.05, 0.95]])
def test_shares_match_the_weights_within_binomial_error(weights):
    n = 200_000
    mix = Mixture(weights, seed=3)
    counts = np.bincount(mix.sources(np.arange(n)), minlength=len(weights))
    p = np.asarray(weights) / sum(weights)
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 4 * sd), (counts, n * p)


def test_draws_continue_exactly_from_saved_counts():
    mix = Mixture([0.7, 0.3], seed=1)
    whole_src, whole_idx, end = mix.draws(0, 10_000, np.zeros(2, dtype=np.int64))
    counts = mix.counts_at(6_000)
    src, idx, after = mix.draws(6_000, 4_000, counts)
    assert np.array_equal(src, whole_src[6_000:]) and np.array_equal(idx, whole_idx[6_000:])
    assert np.array_equal(after, end) and end.sum() == 10_000
    for s in range(2):  # each source's draws are 0, 1, 2, ... in order
        assert np.array_equal(whole_idx[whole_src == s], np.arange((whole_src == s).sum()))


@pytest.mark.parametrize("weights", [[], [0.5, 0], [1, -1], [float("nan")]])
def test_bad_weights(weights):
    with pytest.raises(ValueError, match="positive numbers"):
        Mixture(weights, seed=0)


# ---------------------------------------------------------------- the loader with a mixture


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> dict[str, Path]:
    """Two data folders with disjoint tokens: numbers, and words (no newline in either)."""
    root = tmp_path_factory.mktemp("mix")
    r = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "green", "house", "light", "music", "night", "ocean"]
    texts = {"numbers": " ".join(str(r.randint(0, 999)) for _ in range(20_000)),
             "words": " ".join(r.choice(words) for _ in range(2_000))}
    out = {}
    for name, text in texts.items():
        (root / f"{name}.txt").write_text(text)
        out[name] = root / name
        prepare([str(root / f"{name}.txt")], out[name], block_size=8, val_fraction=0.05, shard_size_mb=0.01,
                quiet=True)
    return out


def is_number(x: torch.Tensor) -> np.ndarray:
    """Which samples of a batch come from the numbers (their first token has a digit)."""
    return np.array([any(c.isdigit() for c in GPT2.decode(row[:1].tolist())) for row in x])


def mixed(sources: dict[str, Path], weights, micro, rank, world, workers=0, start=0, counts=None, seed=4):
    splits = [Split(d, load_manifest(d), "train") for d in sources.values()]
    return TrainBatches(splits, micro, rank, world, seed, workers, start, weights=weights, counts=counts,
                        names=list(sources))


def test_two_ranks_draw_the_weights_from_disjoint_sources(two_sources):
    """Realised shares within binomial error of the weights on 2 ranks, each source's samples all
    different until it has been read once, and the counts the loader reports are what it read."""
    weights = [0.7, 0.3]
    streams = [mixed(two_sources, weights, 8, r, 2) for r in range(2)]
    steps = 150
    drawn = {True: [], False: []}
    for _ in range(steps):
        for stream in streams:
            x, y = next(stream)
            for row, number in zip(torch.cat([x, y[:, -1:]], 1), is_number(x)):
                drawn[bool(number)].append(row.numpy().tobytes())
    n = steps * 8 * 2
    share = len(drawn[True]) / n
    assert abs(share - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n), share
    assert streams[0].counts == streams[1].counts == [len(drawn[True]), len(drawn[False])]
    sizes = [len(Split(d, load_manifest(d), "train")) for d in two_sources.values()]
    assert len(drawn[False]) > sizes[1]  # the words were read more than once ...
    assert len(set(drawn[False][:sizes[1]])) == sizes[1]  # ... each sample once per epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mixture_resumes_exactly_at_a_position(two_sources, workers):
    """From a saved position and counts (or counts rebuilt from the position alone), on another
    number of ranks and workers, the same global batches follow."""
    take = lambda stream, k: [torch.cat(next(stream), 1) for _ in range(k)]  # noqa: E731
    first = take(mixed(two_sources, [1, 3], 4, 0, 1, workers=workers), 30)
    at = mixed(two_sources, [1, 3], 4, 0, 1)
    take(at, 12)
    state = at.state_dict()
    assert state["samples"] == 48 and sum(state["counts"]) == 48 and state["weights"] == [1, 3]
    position, counts, fresh = resume_position(state, 4, at.train_samples, [1, 3])
    assert fresh == []
    for saved in (counts, None):
        resumed = take(mixed(two_sources, [1, 3], 4, 0, 1, workers=workers, start=position, counts=saved), 18)
        assert all(torch.equal(a, b) for a, b in zip(resumed, first[12:]))
    two = [mixed(two_sources, [1, 3], 2, r, 2, start=position, counts=counts) for r in range(2)]
    halves = [take(s, 18) for s in two]  # 2 ranks x micro 2 = the same global batches
    assert all(torch.equal(torch.cat([a, b]), c) for a, b, c in zip(*halves, first[12:]))
    assert resume_position(state, 5, state["train_samples"], [1, 3]) is None  # another seed: a new order
    # other weights: each source goes on where it was, drawn at the new weights
    assert resume_position(state, 4, state["train_samples"], [1, 1]) == (48, state["counts"], [])
    assert resume_position({**state, "counts": None}, 4, state["train_samples"], [1, 1]) is None
    before = torch.cat(take(mixed(two_sources, [1, 3], 4, 0, 1), 12))
    reweighted = mixed(two_sources, [1, 1], 4, 0, 1, start=position, counts=counts)
    after = torch.cat(take(reweighted, 40))
    for number in (True, False):  # each source's samples all distinct: its shuffle went on, not over
        drawn = [tuple(row.tolist()) for row in torch.cat([before, after]) if is_number(row[None])[0] == number]
        assert len(set(drawn)) == len(drawn)
    assert reweighted.counts == [counts[0] + int(is_number(after).sum()), counts[1] + int((~is_number(after)).sum())]
    assert is_number(after).mean() > is_number(before).mean()  # drawn at the new weights (1:1, was 1:3)


def test_a_source_added_or_replaced_starts_its_own_shuffle_and_the_others_go_on(two_sources):
    """Sources are matched to the saved ones by name and train split size, each in its place: one
    added, replaced or prepared again starts its own shuffle and the others go on where they were.
    (A third source added had restarted every source's shuffle, with a warning naming the seed; a
    source replaced by another of the same size had taken over its draws.)"""
    take = lambda stream, k: torch.cat([torch.cat(next(stream), 1) for _ in range(k)])  # noqa: E731
    at = mixed(two_sources, [1, 3], 4, 0, 1)
    before = take(at, 12)
    state = at.state_dict()
    assert state["names"] == ["numbers", "words"]
    sizes = state["train_samples"]
    position, counts, fresh = resume_position(state, 4, [*sizes, sizes[1]], [1, 3, 1], ["numbers", "words", "more"])
    assert (position, counts, fresh) == (48, [*state["counts"], 0], [2])
    after = take(mixed({**two_sources, "more": two_sources["words"]}, [1, 3, 1], 4, 0, 1, start=position,
                       counts=counts), 30)
    numbers = [tuple(r.tolist()) for r in torch.cat([before, after]) if is_number(r[None])[0]]
    assert len(set(numbers)) == len(numbers) > state["counts"][0]  # the numbers' shuffle went on, not over
    assert resume_position(state, 4, sizes, [1, 3], ["numbers", "other"]) == (48, [state["counts"][0], 0], [1])
    older = {k: v for k, v in state.items() if k != "names"}  # saved by an mtgpt without names: by place and size
    assert resume_position(older, 4, sizes, [1, 3], ["numbers", "other"]) == (48, state["counts"], [])
    assert resume_position(state, 4, sizes[0], None, ["numbers"]) == (0, None, [0])  # one source after a mixture
    # a run of one source that becomes a mixture: the source goes on (its order is the mixture's source 0's)
    one = TrainBatches([Split(two_sources["numbers"], load_manifest(two_sources["numbers"]), "train")], 4, 0, 1, 4,
                       names=["numbers"])
    first = take(one, 10)
    position, counts, fresh = resume_position(one.state_dict(), 4, sizes, [1, 3], ["numbers", "words"])
    assert (position, counts, fresh) == (40, [40, 0], [1])
    after = take(mixed(two_sources, [1, 3], 4, 0, 1, start=position, counts=counts), 30)
    numbers = [tuple(r.tolist()) for r in torch.cat([first, after]) if is_number(r[None])[0]]
    assert len(set(numbers)) == len(numbers) > 40


# ---------------------------------------------------------------- --data, the plan, refusals


def test_the_data_option_syntax():
    from mtgpt.config import ConfigError, DataSource, data_sources

    assert data_sources(["data/books"]) == [DataSource("books", "data/books")]
    assert data_sources(["books=data/b:0.7", "data/chat/:3"]) == [DataSource("books", "data/b", 0.7),
                                                                 DataSource("chat", "data/chat/", 3.0)]
    assert data_sources(["http://host:8000"]) == [DataSource("host_8000", "http://host:8000")]  # a port, no weight
    assert data_sources(["https://h.org:8443/data/books:2"]) == [DataSource("books", "https://h.org:8443/data/books", 2)]
    assert data_sources(["pipe:aws s3 cp s3://b/x/{shard} -"])[0].name == "data0"
    # letters of any script are letters (a folder "dätä out" was named d_t_out, and dätä= was refused)
    assert data_sources(["/x/dätä out"]) == [DataSource("dätä_out", "/x/dätä out")]
    assert data_sources(["bücher=data/b:0.7", "чат=data/c:0.3"]) == [DataSource("bücher", "data/b", 0.7),
                                                                    DataSource("чат", "data/c", 0.3)]
    for bad, match in ((["a:0", "b:1"], "positive"), (["x/a:1", "y/a:1"], "named 'a'"), (["a:1", "b"], "to none"),
                       (["n=:1"], "no data folder"), (["ftp://h.org/data"], r"not ftp://.*pipe:aws s3 cp"),
                       (["s3://bucket/data:2"], "not s3://")):
        with pytest.raises(ConfigError, match=match):
            data_sources(bad)


def test_the_data_option_with_real_folders(tmp_path, monkeypatch):
    """A folder whose name holds ':' is that folder (not the folder before it with a weight); a
    weight that is nan or inf is refused as such (it was read as part of a path); '.' and '..' are
    named after the folder they are (a source named '.' logged data/./tokens)."""
    from mtgpt.config import ConfigError, DataSource, data_sources

    versioned = tmp_path / "d" / "ver:2"
    versioned.mkdir(parents=True)
    assert data_sources([str(versioned)]) == [DataSource("ver_2", str(versioned))]
    assert data_sources([f"v={versioned}:0.5"]) == [DataSource("v", str(versioned), 0.5)]
    assert data_sources([str(tmp_path / "d" / "ver:3")]) == [DataSource("ver", str(tmp_path / "d" / "ver"), 3.0)]
    for bad in ("nan", "inf", "-inf", "Infinity"):
        for specs in ([f"d/t1k:{bad}"], ["a:1", f"d/t1k:{bad}"]):
            with pytest.raises(ConfigError, match=rf"--data d/t1k:{bad}: the weight must be a positive finite number"):
                data_sources(specs)
    # a name with other characters, or a weight that is no number, read as part of a missing path
    # ("no such folder; create it with mtgpt prepare ... --out a/b=...")
    for spec in (f"a/b={versioned}:1", f"my books={versioned}", f"a+b={versioned}:2"):  # (ü= is a name: letters of any script)
        with pytest.raises(ConfigError, match=r"the source's name '.*' may have only letters, digits, _, \. and -"):
            data_sources([spec, f"c={tmp_path}:1"])
    for spec in (f"a={versioned}:abc", f"{versioned}:0,5"):
        with pytest.raises(ConfigError, match=r"the weight '(abc|0,5)' is not a number"):
            data_sources([spec, f"c={tmp_path}:1"])
    monkeypatch.chdir(versioned)
    assert [data_sources([spec])[0].name for spec in (".", "./", "../ver:2/.", "..:1")] == ["ver_2", "ver_2", "ver_2", "d"]


def test_the_same_data_folder_twice_is_refused(tmp_path, monkeypatch):
    """Twice in a mixture, a folder would be counted twice (the banner's tokens, its epochs): the
    same folder however it is written (relative, absolute, through a symlink) or the same URL."""
    from mtgpt.config import ConfigError, data_sources

    (tmp_path / "d" / "t1k").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "d", target_is_directory=True)
    (tmp_path / "d" / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    for specs in (["x=d/t1k:1", "y=d/t1k:1"], ["d/t1k", f"y={tmp_path}/d/./t1k/"], ["x=d/t1k:1", "y=link/t1k:3"],
                  ["x=http://h.org/data/t1k", "y=http://h.org/data/t1k"]):
        with pytest.raises(ConfigError, match=rf"--data {specs[0]} and --data {specs[1]} are the same data folder "
                                              r"\(.*\); give it once, with the weight you want"):
            data_sources(specs)
    assert len(data_sources(["x=d/t1k:1", "y=d/other:1"])) == 2
    assert len(data_sources(["x=http://h.org/data/t1k", "y=https://h.org/data/t1k"])) == 2  # URLs: as strings


def test_a_plan_refuses_sources_that_do_not_share_tokenizer_or_block_size(two_sources, tmp_path):
    from mtgpt.config import TrainConfig
    from mtgpt.data import DataError
    from mtgpt.train import make_plan

    text = tmp_path / "t.txt"
    text.write_text("apple river stone " * 400)
    prepare([str(text)], tmp_path / "b16", block_size=16, val_fraction=0.1, quiet=True)
    prepare([str(text)], tmp_path / "own", block_size=8, vocab_size=265, val_fraction=0.1, quiet=True)
    base = dict(model={"n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8}, out=str(tmp_path / "run"))
    with pytest.raises(DataError, match=r"different block sizes: .*numbers 8, .*b16 16; prepare .*--block-size 8"):
        make_plan(TrainConfig(data=[str(two_sources["numbers"]), str(tmp_path / "b16")], **base), 1, cuda=False)
    with pytest.raises(DataError, match=r"different tokenizers: .*gpt2.*own.*--tokenizer .*numbers"):
        make_plan(TrainConfig(data=[str(two_sources["numbers"]), str(tmp_path / "own")], **base), 1, cuda=False)
    plan = make_plan(TrainConfig(data=[str(d) for d in two_sources.values()], **base, max_steps=100), 1, cuda=False)
    sizes = [m["splits"]["train"]["samples"] for m in plan.manifests]
    assert plan.weights == pytest.approx([n / sum(sizes) for n in sizes])  # no weights: as one corpus
    plan = make_plan(TrainConfig(data=[f"{d}:{w}" for d, w in zip(two_sources.values(), (1, 1))], **base,
                                 max_steps=400), 1, cuda=False)
    assert plan.weights == [0.5, 0.5]
    from mtgpt.train import plan_warnings

    assert plan.epochs()[1] == pytest.approx(0.5 * 400 * 8 / sizes[1]) and plan.epochs()[1] > 4  # 400 steps x 8
    warned = plan_warnings(plan)
    assert len(warned) == 1 and "words" in warned[0] and "lower its weight" in warned[0]
    # resumed at step 300 of 400 after drawing [2200, 200] samples: those, and the rest at the weights of now
    assert plan.epochs(300, [2200, 200]) == pytest.approx([(2200 + 400) / sizes[0], (200 + 400) / sizes[1]])
    assert plan_warnings(plan, 300, [2200, 200]) == []  # the words were read little before: no warning
    # a source with no val split: val/loss is the others' alone, and said so (it was not)
    prepare([str(text)], tmp_path / "noval", block_size=8, val_fraction=0, quiet=True)
    plan = make_plan(TrainConfig(data=[str(two_sources["numbers"]), f"nv={tmp_path / 'noval'}"], **base, max_steps=10),
                     1, cuda=False)
    assert plan_warnings(plan) == ["note: nv has no val split (prepared with --val-fraction 0): val/loss, early "
                                   "stopping and best/ are the other sources' alone"]


def test_a_resumed_mixture_in_another_order_is_refused_with_the_order(two_sources, tmp_path):
    """The same sources in another order: each would continue at the other's place in its shuffle
    (the saved counts swapped, said as changed weights). Refused, with the --data in the run's order."""
    from mtgpt.config import ConfigError, TrainConfig
    from mtgpt.train import check_source_order

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    saved = [f"numbers={two_sources['numbers']}:0.9", f"words={two_sources['words']}:0.1"]
    (run / "train_config.json").write_text(json.dumps({"data": saved, "out": str(run)}))
    found = run / "checkpoints" / "step_00000010"
    check_source_order(TrainConfig(data=saved, out=str(run)), found)
    check_source_order(TrainConfig(data=[*saved, f"more={tmp_path}:1"], out=str(run)), found)  # one added: notes
    with pytest.raises(ConfigError, match=re.escape(
            "the sources are given in another order (words, numbers) than the run saved (numbers, words); each "
            "source's shuffle is that of its place, so give them in the run's order to have each go on where it "
            f"was: --data numbers={two_sources['numbers']}:0.1 --data words={two_sources['words']}:0.9")):
        check_source_order(TrainConfig(data=[f"words={two_sources['words']}:0.9",
                                             f"numbers={two_sources['numbers']}:0.1"], out=str(run)), found)


@pytest.mark.slow
def test_a_mixture_on_two_ranks_logs_what_it_reads_and_resumes_bit_exactly(two_sources, tmp_path):
    """`mtgpt train --data numbers=...:0.7 --data words=...:0.3` on 2 gloo ranks: data/NAME/tokens
    are the samples the loader really reads (told apart by their tokens), within binomial error of
    the weights; val/loss is the weighted mean of val/NAME/loss; SIGKILL after a save and
    `--resume auto` give every logged number and the final weights bit for bit."""

    from safetensors.torch import load_file

    from mtgpt import checkpoint
    from tests.conftest import run_mtgpt
    from tests.test_resume import kill_group, start, wait_for

    data = ["--data", f"numbers={two_sources['numbers']}:0.7", "--data", f"words={two_sources['words']}:0.3"]
    args = [*data, "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--micro-batch", "4", "--nproc", "2",
            "--ds-config", "zero1_fp32", "--log-every", "1", "--eval-every", "10", "--eval-samples", "8",
            "--max-steps", "30", "--seed", "3", "--lr", "3e-3"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    out = run_mtgpt("train", "--out", straight, *args, "--save-every", "100")
    assert "words = " in out.stdout and "weight 0.300" in out.stdout
    proc = start("train", "--out", run, *args, "--save-every", "10")
    wait_for(lambda: (run / "checkpoints" / "step_00000010" / checkpoint.COMPLETE).is_file(), proc)
    kill_group(proc)
    run_mtgpt("train", "--out", run, *args, "--save-every", "10", "--resume", "auto")

    def logged(folder: Path) -> dict[int, dict]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows}

    want, got = logged(straight), logged(run)
    assert list(got) == list(range(1, 31)) and got == want
    a, b = load_file(straight / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    last = want[30]
    streams = [mixed(two_sources, [0.7, 0.3], 4, r, 2, seed=3) for r in range(2)]
    numbers = sum(int(is_number(next(s)[0]).sum()) for _ in range(30) for s in streams)
    assert last["data/numbers/tokens"] == numbers * 8 and last["data/words/tokens"] == (240 - numbers) * 8
    assert abs(numbers / 240 - 0.7) < 4 * math.sqrt(0.7 * 0.3 / 240)
    assert last["val/loss"] == pytest.approx(0.7 * last["val/numbers/loss"] + 0.3 * last["val/words/loss"], rel=1e-12)
    assert last["val/numbers/loss"] != last["val/words/loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(straight / "tb"))
    board.Reload()  # TensorBoard's own reader sees the per-source curves
    for tag in ("data/numbers/tokens", "data/words/tokens", "val/numbers/loss", "val/words/bpb"):
        assert board.Scalars(tag)[-1].step == 30 and board.Scalars(tag)[-1].value == pytest.approx(last[tag], rel=1e-6)
    info = run_mtgpt("info", straight).stdout
    assert f"val loss per source at step 30: numbers {last['val/numbers/loss']:.4f}, words" in info
    # resumed with other weights: the counts go on (each source where it was), at the new shares
    swapped = ["--data", f"numbers={two_sources['numbers']}:0.3", "--data", f"words={two_sources['words']}:0.7"]
    out = run_mtgpt("train", "--out", run, *swapped, "--resume", "auto", "--max-steps", "50")
    assert "the mixture's weights were 0.7, 0.3 and are 0.3, 0.7 now" in out.stdout
    # ... and the val loss is another mean: best/ and early stopping start again (the old best had stayed)
    assert f"note: the val loss now weighs other sources or weights than the best so far ({min(r['val/loss'] for r in want.values() if 'val/loss' in r):.4f})" in out.stdout
    # the banner's reads of the whole run: the samples drawn before (0.7 words) and after (0.3) the change
    said = float(re.search(r"words = .*read ([0-9.]+) times in 50 steps", out.stdout).group(1))
    words = Split(two_sources["words"], load_manifest(two_sources["words"]), "train")
    later = logged(run)
    drawn = [later[s]["data/numbers/tokens"] + later[s]["data/words/tokens"] for s in range(30, 51)]
    assert drawn == [(30 + i) * 64 for i in range(21)]  # 8 sequences of 8 tokens a step, never back to 0
    numbers_after = (later[50]["data/numbers/tokens"] - last["data/numbers/tokens"]) / (20 * 64)
    assert abs(numbers_after - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 160)
    assert abs(said - later[50]["data/words/tokens"] / 8 / len(words)) < 4 * math.sqrt(0.21 * 160) / len(words)
