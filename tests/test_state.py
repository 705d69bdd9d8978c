"""state.py in process: the stop rules, the client state, the running loss mean, SIGTERM."""

from __future__ import annotations

import os
import signal

import torch

from mtgpt.config import TrainConfig
from mtgpt.state import RunningLoss, StopFlag, TrainState, agreed_stop, planned_stop, rng_state, set_rng_state


def test_planned_stops():
    cfg = TrainConfig(max_steps=10)
    assert planned_stop(cfg, TrainState(step=9), 1000) is None
    assert planned_stop(cfg, TrainState(step=10), 1000) == "max_steps"
    assert planned_stop(TrainConfig(max_tokens=500), TrainState(tokens=499), 1000) is None
    assert planned_stop(TrainConfig(max_tokens=500), TrainState(tokens=500), 1000) == "max_tokens"
    assert planned_stop(TrainConfig(max_epochs=1.5), TrainState(tokens=1499), 1000) is None
    assert planned_stop(TrainConfig(max_epochs=1.5), TrainState(tokens=1500), 1000) == "max_epochs"
    assert planned_stop(TrainConfig(), TrainState(tokens=1000), 1000) == "max_epochs"  # 1 epoch by default
    assert planned_stop(TrainConfig(max_steps=10), TrainState(step=5, tokens=10**9), 1000) is None  # no epoch limit
    early = TrainConfig(max_steps=100, patience=2)
    assert planned_stop(early, TrainState(evals_since_best=1), 1000) is None
    assert planned_stop(early, TrainState(evals_since_best=2), 1000) == "early_stopping"


def test_agreed_stops_in_a_world_of_one():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        flag = StopFlag()
        cfg = TrainConfig(max_steps=100, max_time="2s")
        assert agreed_stop(cfg, 1.0, flag, torch.device("cpu")) is None
        assert agreed_stop(cfg, 2.0, flag, torch.device("cpu")) == "max_time"
        os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends before the time limit
        assert flag.signal == "SIGTERM"
        assert agreed_stop(cfg, 2.0, flag, torch.device("cpu")) == "signal"  # a signal wins
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_client_state_round_trip():
    state = TrainState(step=7, tokens=700, best_val=3.5, evals_since_best=1, elapsed=12.5)
    client = state.client_state({"data": {"batches": 7}, "loss": {"sum": 1.5, "n": 2}})
    assert client["universal_checkpoint_info"]  # DeepSpeed's universal converter wants it
    back = TrainState.from_client_state(client)
    assert (back.step, back.tokens, back.best_val, back.evals_since_best, back.elapsed) == (7, 700, 3.5, 1, 12.5)
    mine = back.of_rank(world_size=1, rank=0)
    assert mine["data"] == {"batches": 7} and mine["loss"] == {"sum": 1.5, "n": 2} and "rng" in mine
    assert back.of_rank(world_size=2, rank=0) is None  # saved by another number of ranks


def test_rng_state_round_trip():
    saved = rng_state()
    a = torch.rand(3)
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), a)


def test_running_loss_resumes_exactly():
    """The mean logged at a log step is the same whether or not the run was saved and restored
    between two log steps (float32 sums survive the trip through a Python float)."""
    losses = [torch.tensor(v, dtype=torch.float32) for v in (10.123456, 9.87654321, 9.5555555, 9.1234)]
    straight = RunningLoss()
    for loss in losses:
        straight.add(loss)
    first = RunningLoss()
    for loss in losses[:2]:
        first.add(loss)
    restored = RunningLoss()
    restored.load_state_dict(first.state_dict())
    for loss in losses[2:]:
        restored.add(loss)
    assert restored.n == 4 and torch.equal(restored.take(), straight.take())
    assert straight.n == 0 and float(straight.sum) == 0.0  # take() starts a new mean
    empty = RunningLoss()
    empty.load_state_dict(None)  # a checkpoint from before the mean was saved
    assert empty.n == 0
