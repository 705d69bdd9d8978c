"""Chat loss masks, in process: `prepare --format chat` stores which tokens to train on (the bot's
replies), the loader turns the rest into ignored targets, those targets give exactly zero
gradient, and a step's loss is the mean over its trained tokens across micro-batches and ranks
(two real gloo ranks through DeepSpeed). Plain text is unchanged: every target is trained."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mtgpt import chat, tokenizer
from mtgpt.config import ModelConfig
from mtgpt.data import load_manifest
from mtgpt.data.loader import Split, TrainBatches, load_val
from mtgpt.data.prepare import prepare
from mtgpt.model import GPT
from tests.conftest import SONNETS, TINY

GPT2 = tokenizer.gpt2()
DIALOGUE = """- - Hello
  - Hi there
- - What is your name?
  - I am a bot, and I like to talk about the weather, music and books.
  - Nice.
  - Thanks.
- - Do you like music?
  - Yes. Mostly old songs.
- - Tell me a joke
  - Why did the chicken cross the road? To get to the other side.
  - That is old.
  - Old but good.
  - Fine.
  - Very fine, thank you for asking, and for listening to the rest of my long answer today.
"""
SYSTEM = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hey"},
                       {"role": "assistant", "content": "Hello, friend."}]}


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat")
    (folder / "talk.yml").write_text("categories: [test]\nconversations:\n" + DIALOGUE * 6)
    import json

    (folder / "sys.jsonl").write_text(json.dumps(SYSTEM) + "\n")
    out = folder / "data"
    prepare([str(folder / "talk.yml"), str(folder / "sys.jsonl")], out, block_size=32, val_fraction=0.2, seed=3,
            fmt="chat", quiet=True)
    return out


def examples(data: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    m = load_manifest(data)
    s = Split(data, m, split)
    return s.examples(np.arange(len(s)))


def test_only_the_bots_replies_are_trained(tmp_path):
    """Every trained target, sample by sample, is exactly a bot reply and its line end."""
    (tmp_path / "a.jsonl").write_text(__import__("json").dumps(SYSTEM) + "\n")
    (tmp_path / "b.yml").write_text("conversations:\n- - What is your name?\n  - I am a bot.\n  - Nice.\n  - Thanks.\n")
    m = prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.yml")], tmp_path / "d", block_size=40,
                val_fraction=0.0, fmt="chat", quiet=True)
    x, y = examples(tmp_path / "d")
    assert [GPT2.decode(row[row >= 0].tolist()) for row in y] == [" Hello, friend.\n", " I am a bot.\n Thanks.\n"]
    assert [GPT2.decode(row[:row.tolist().index(GPT2.eot)].tolist()) for row in x] == [
        "System: Be kind.\nUser: Hey\nBot: Hello, friend.\n",
        "User: What is your name?\nBot: I am a bot.\nUser: Nice.\nBot: Thanks.\n"]
    assert m["trained_targets"] == int((y >= 0).sum())
    # --train-on all: the same samples, every token of the conversation trained, padding never
    m_all = prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.yml")], tmp_path / "all", block_size=40,
                    val_fraction=0.0, fmt="chat", train_on="all", quiet=True)
    x_all, y_all = examples(tmp_path / "all")
    assert np.array_equal(x_all, x)
    for xr, yr in zip(x_all, y_all):  # the targets: the conversation after its first token
        assert np.array_equal(yr[yr >= 0], xr[1:xr.tolist().index(GPT2.eot) + 1][:-1])
    assert m_all["trained_targets"] > m["trained_targets"]


def test_chat_data_with_nothing_to_train_is_refused(tmp_path):
    from mtgpt.data import DataError

    (tmp_path / "users.jsonl").write_text(__import__("json").dumps(
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hey"}]}) + "\n")
    with pytest.raises(DataError, match="no bot replies to train on"):
        prepare([str(tmp_path / "users.jsonl")], tmp_path / "d", block_size=16, val_fraction=0.0, fmt="chat", quiet=True)
    with pytest.raises(DataError, match="--train-on must be bot or all"):
        prepare([str(tmp_path / "users.jsonl")], tmp_path / "d", fmt="chat", train_on="user", quiet=True)
    assert not (tmp_path / "d").exists()  # nothing half-written


def test_the_mask_follows_token_boundaries_for_any_tokenizer():
    """A token is trained when any of its bytes is the bot's: the reply's first token carries the
    space after "Bot:"; multi-byte characters split over tokens stay whole."""
    turns = [(chat.USER, "Grüße aus Köln"), (chat.BOT, "日本語 and emoji 👩‍💻 ok"), (chat.USER, "x")]
    for tok in (GPT2, tokenizer.train([chat.render(turns) * 20], 300)):
        ids, mask = chat.training_tokens(tok, turns)
        assert tok.decode(ids.tolist()) == chat.render(turns)
        assert b"".join(tok.token_bytes(int(t)) for t in ids[mask]) == " 日本語 and emoji 👩‍💻 ok\n".encode()


def test_every_token_chat_must_write_after_its_prompt_is_trained_with_an_own_tokenizer():
    """With a small own vocabulary the space after "Bot:" is often a token of its own (" ", "H",
    "i", ...): it is the first token the model writes after the prompt chat and serve give it, so it
    must be a trained target (it used to be context, so a fine-tune never learned what follows
    "Bot:"). At every turn of a conversation, the training ids before the reply are exactly that
    prompt (fit_history's ids, and prompt_for's text encoded), and every id from there through the
    line end is trained."""
    tok = tokenizer.train([SONNETS.read_text()], 400)
    replies = ["Hi, how are you?", "I am a bot.", "42 is the answer.", "Yes", "...", "Über alles", "hello", ""]
    turns, history, first = [(chat.SYSTEM, "Be brief.")], [], []
    for i, reply in enumerate(replies):
        message = f"Question {i}?"
        turns += [(chat.USER, message), (chat.BOT, reply)]
        ids, mask = chat.training_tokens(tok, turns)
        prompt = chat.fit_history(tok, history, message, block_size=4096, reply_tokens=16, system="Be brief.")[1].ids
        assert prompt == tok.encode(chat.prompt_for(history, message, system="Be brief."))
        n = len(prompt)
        assert ids[:n].tolist() == prompt and not mask[n - 1]  # "Bot:" is context
        assert mask[n:].all() and tok.decode(ids[n:].tolist()) == f" {reply}\n"
        assert b"".join(tok.token_bytes(int(t)) for t in ids[mask]) == "".join(f" {r}\n" for r in replies[:i + 1]).encode()
        first.append(tok.token_bytes(int(ids[n])))
        history.append((message, reply))
    assert b" " in first and any(len(t) > 1 for t in first)  # both kinds of first token are covered


def test_long_conversations_go_on_in_the_next_samples(chat_data):
    """A conversation longer than a sample continues in the next one; samples with nothing to train
    (only the user's words) are left out; a conversation's samples are all in one split."""
    m = load_manifest(chat_data)
    x, y = examples(chat_data)
    assert m["left_out_samples"] >= 0 and len(x) == m["splits"]["train"]["samples"]
    assert bool(((y >= 0).sum(1) > 0).all())  # every sample trains on something
    starts = [i for i, row in enumerate(x) if GPT2.decode(row[:1].tolist()) in ("User", "System")]
    assert 0 < len(starts) < len(x)  # some samples go on mid-conversation
    goes_on = [GPT2.decode(y[i][y[i] >= 0].tolist()) for i in range(len(x)) if i not in starts]
    assert any("my long answer today" in text for text in goes_on)
    vx, vy = examples(chat_data, "val")
    assert len(vx) > 0 and m["trained_targets"] == int((y >= 0).sum() + (vy >= 0).sum())


def test_every_reply_token_is_trained_whatever_the_block_size(tmp_path):
    """A sample's first token is context only: a conversation going on in the next sample lost the
    reply token it started with (3.2% of them with an own vocabulary at block 32). Continuation
    samples overlap by one token, so the same conversations train the same targets at any block
    size, and each sample's first token is the last of the sample before it."""
    (tmp_path / "talk.yml").write_text("conversations:\n" + DIALOGUE * 3)
    trained = {}
    for block in (8, 13, 32, 512):
        m = prepare([str(tmp_path / "talk.yml")], tmp_path / f"b{block}", block_size=block, val_fraction=0.0,
                    fmt="chat", quiet=True)
        trained[block] = m["trained_targets"]
    turns = list(chat.conversations([tmp_path / "talk.yml"]))
    assert trained[512] == sum(int(chat.training_tokens(GPT2, c)[1].sum()) for c in turns)
    assert trained[8] == trained[13] == trained[32] == trained[512], trained
    (tmp_path / "long.yml").write_text("conversations:\n- - Hi\n  - " + "Very fine, thank you for asking. " * 4 + "\n")
    prepare([str(tmp_path / "long.yml")], tmp_path / "long", block_size=8, val_fraction=0.0, fmt="chat", quiet=True)
    x, y = examples(tmp_path / "long")
    assert len(x) > 3 and all(x[i + 1][0] == y[i][-1] >= 0 for i in range(len(x) - 1))  # the reply's, trained once


def test_loader_and_val_carry_the_mask(chat_data):
    m = load_manifest(chat_data)
    batches = TrainBatches(Split(chat_data, m, "train"), 8, 0, 1, seed=0)
    x, y = next(batches)
    assert batches.masked and (y == -1).any() and (y >= 0).any()
    assert torch.equal(x[:, 1:][y[:, :-1] >= 0], y[:, :-1][y[:, :-1] >= 0])  # targets are the inputs shifted
    vx, vy = load_val(chat_data, m, 100, 0, 1)
    assert (vy == -1).any() and vx.shape == vy.shape


def test_a_mixture_of_text_and_chat_keeps_each_samples_own_mask(chat_data, tiny_data):
    """Plain text and chat data mix: the text's rows train every target, the chat's only the bot's."""
    splits = [Split(d, load_manifest(d), "train") for d in (tiny_data, chat_data)]
    text_rows = {row.tobytes() for row in splits[0].examples(np.arange(len(splits[0])))[0]}
    chat_x, chat_y = splits[1].examples(np.arange(len(splits[1])))
    chat_rows = {x.tobytes(): y for x, y in zip(chat_x, chat_y)}
    batches = TrainBatches(splits, 8, 0, 1, seed=2, weights=[0.5, 0.5])
    seen = {"text": 0, "chat": 0}
    for _ in range(10):
        x, y = next(batches)
        for xr, yr in zip(x.numpy(), y.numpy()):
            if xr.tobytes() in text_rows:
                assert (yr >= 0).all() and np.array_equal(yr[:-1], xr[1:])
                seen["text"] += 1
            else:
                assert np.array_equal(yr, chat_rows[xr.tobytes()]) and (yr == -1).any()
                seen["chat"] += 1
    assert batches.masked and seen["text"] > 20 and seen["chat"] > 20


def test_untrained_targets_get_exactly_zero_gradient(chat_data):
    """The logits at a user or system target get no gradient at all, and what those targets are
    does not change the parameters' gradient by a single bit."""
    x, y = (torch.from_numpy(a[:8]) for a in examples(chat_data))
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))

    def grads(targets):
        model.zero_grad()
        logits, loss = model(x, targets, reduction="sum")
        logits.retain_grad()
        loss.backward()
        return logits.grad, [p.grad.clone() for p in model.parameters()]

    g_logits, g = grads(y)
    masked = y == -1
    assert masked.any() and bool((g_logits[masked] == 0).all())
    assert bool((g_logits[~masked].abs().sum(-1) > 0).all())
    scrambled = torch.where(masked, torch.randint_like(y, 0, 50257), y)  # the same inputs, other untrained targets
    g_logits2, _ = grads(torch.where(masked, -1, scrambled))
    assert torch.equal(g_logits2, g_logits)
    _, g_all = grads(scrambled)  # ... and trained on, they would change the gradient
    assert not all(torch.equal(a, b) for a, b in zip(g, g_all))


def test_plain_text_trains_every_target(tiny_data):
    batches = TrainBatches(Split(tiny_data, load_manifest(tiny_data), "train"), 4, 0, 1, seed=0)
    x, y = next(batches)
    assert not batches.masked and bool((y >= 0).all())


# ------------------------------------------------------------- the mean over a whole step


def _step_on_rank(rank: int, world: int, port: int, data: str, accum: int, out) -> None:
    """One rank: a real DeepSpeed engine (ZeRO-0, fp32) with SGD at lr 1, one mtgpt train_step on
    this rank's real batches; rank 0 reports the parameters after the step."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from mtgpt import world as mworld
    from mtgpt.train import train_step

    mworld.init()
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": accum,
              "train_batch_size": 4 * accum * world, "zero_optimization": {"stage": 0},
              "gradient_clipping": 0.0}  # (DeepSpeed clips at 1.0 by default)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=config)
    batches = TrainBatches(Split(data, load_manifest(data), "train"), 4, rank, world, seed=5)
    loss = train_step(engine, batches, accum)
    mworld.all_reduce_sum(loss)
    if rank == 0:
        # numpy, not tensors: a tensor in a queue is shared memory that goes away with this process
        out.put(({n: p.detach().numpy().copy() for n, p in engine.module.named_parameters()}, float(loss) / world))
    mworld.barrier()  # neither rank leaves the group while the other still talks to it
    mworld.destroy()


def test_the_step_loss_is_the_mean_over_trained_tokens_of_all_ranks_and_micro_batches(chat_data):
    """2 ranks x 2 micro-batches with different numbers of trained targets: the update is exactly
    the gradient of (sum of the 4 micro-batches' trained-token losses) / (their trained tokens),
    not a mean of per-micro-batch means."""
    import torch.multiprocessing as mp

    from mtgpt.world import free_port

    world, accum = 2, 2
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_step_on_rank, args=(r, world, port, str(chat_data), accum, out)) for r in range(world)]
    for p in procs:
        p.start()
    after, logged = out.get(timeout=180)
    after = {n: torch.from_numpy(a) for n, a in after.items()}
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    m = load_manifest(chat_data)
    micro = [b for r in range(world) for b, _ in zip(TrainBatches(Split(chat_data, m, "train"), 4, r, world, seed=5),
                                                     range(accum))]
    counts = [int((y >= 0).sum()) for _, y in micro]
    assert len(set(counts)) > 1, counts  # unequal: a mean of means would differ

    def update(loss_of) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = GPT(ModelConfig(**TINY))
        loss_of(model).backward()
        return {n: p.detach() - p.grad for n, p in model.named_parameters()}

    mean = update(lambda model: sum(model(x, y, reduction="sum")[1] for x, y in micro) / sum(counts))
    of_means = update(lambda model: sum(model(x, y)[1] for x, y in micro) / len(micro))
    err = max(float((after[n] - mean[n]).abs().max()) for n in mean)
    other = max(float((after[n] - of_means[n]).abs().max()) for n in mean)
    assert err < 1e-6 < other / 100, (err, other)
    with torch.no_grad():
        torch.manual_seed(0)
        model = GPT(ModelConfig(**TINY))
        expected = float(sum(model(x, y, reduction="sum")[1] for x, y in micro) / sum(counts))
    assert abs(logged - expected) < 1e-5  # the logged train loss is that same mean


@pytest.mark.slow
def test_a_chat_fine_tune_through_the_cli(chat_data, tiny_data, tmp_path):
    """`mtgpt train --init-from BASE --data CHAT` on 2 ranks with accumulation: the val loss it logs
    is the mean over the held-out bot tokens only (recomputed here from the saved model), and
    `mtgpt chat` talks with the result."""
    import json

    from mtgpt.sample import load_for_inference
    from tests.conftest import TINY_ARGS, run_mtgpt

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    run_mtgpt("train", "--data", tiny_data, "--out", base, "--nproc", "1", *TINY_ARGS, "--max-steps", "5")
    run_mtgpt("train", "--init-from", base, "--data", chat_data, "--out", tuned, "--nproc", "2", "--micro-batch", "2",
              "--grad-accum", "2", "--max-steps", "8", "--eval-samples", "1000", "--lr", "3e-3")
    last = json.loads((tuned / "metrics.jsonl").read_text().splitlines()[-1])
    model, _ = load_for_inference(str(tuned), False, "cpu", "fp32")
    x, y = load_val(chat_data, load_manifest(chat_data), 1000, 0, 1)
    with torch.no_grad():
        expected = float(model(x, y, reduction="sum")[1] / (y >= 0).sum())
        everything = float(model(x, torch.cat([x[:, 1:], y[:, -1:].clamp(min=0)], 1))[1])
    assert last["val/loss"] == pytest.approx(expected, abs=2e-5) and abs(expected - everything) > 0.05
    chat_out = run_mtgpt("chat", tuned, "--seed", "1", "--max-new-tokens", "8", input="Hello\n/quit\n").stdout
    assert "bot> " in chat_out


def test_chat_data_of_an_mtgpt_before_loss_masks_is_named(chat_data, tmp_path):
    """Chat data prepared before loss masks ("content": "chat", no "loss_mask") trained every token,
    the users' lines too, and neither `info` nor `train` said so to a user who had upgraded."""
    import json
    import shutil

    from mtgpt.config import TrainConfig
    from mtgpt.info import describe
    from mtgpt.train import make_plan, plan_warnings

    old = tmp_path / "old"
    shutil.copytree(chat_data, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("loss_mask", "train_on", "trained_targets", "padding_tokens", "left_out_samples"):
        manifest.pop(key, None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    says = "chat data prepared by an older mtgpt, without loss masks"
    for data, named in ((chat_data, False), (old, True)):
        cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model=dict(TINY), micro_batch=2)
        warned = [w for w in plan_warnings(make_plan(cfg, world_size=1, cuda=False)) if says in w]
        noted = [line for line in describe(str(data))[0].splitlines() if says in line]
        assert (len(warned), len(noted)) == ((1, 1) if named else (0, 0))
    assert warned[0].startswith("warning: old (") and "prepare it again" in warned[0]
