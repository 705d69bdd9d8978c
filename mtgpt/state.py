"""What a run must remember to continue exactly, and when it must stop.

`TrainState` plus DeepSpeed's own engine checkpoint (weights, optimizer, LR schedule) is all the
state there is. It goes into the checkpoint as one client-state dict: step, tokens seen, the
early-stopping state, the training seconds so far, and per rank the RNG states, the data
loader's position and the running train-loss mean since the last log step (gathered to every
rank, so a checkpoint written by rank 0 carries them all).
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mtgpt import world
from mtgpt.config import TrainConfig, parse_duration

# DeepSpeed's universal-checkpoint converter wants this in the client state (Megatron-DeepSpeed
# lists tensor-parallel layouts here; a data-parallel GPT has none, only the format version).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, all ranks together
    best_val: float = float("inf")  # the lowest val loss so far (best/ holds its weights)
    evals_since_best: int = 0  # early stopping: evaluations since the val loss last beat patience_best - min_delta
    elapsed: float = 0.0  # training seconds before this process started
    ranks: list[dict[str, Any]] = field(default_factory=list)  # per rank: RNG states, data position, loss
    patience_best: float = float("inf")  # early stopping: the val loss of the last gain of more than min_delta

    def client_state(self, mine: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's client state. `mine` is this rank's own state (data position, running
        loss); it and the rank's RNG states are gathered from every rank (a collective)."""
        ranks = world.all_gather_object({"rng": rng_state(), **mine})
        return {"mtgpt": {"step": self.step, "tokens": self.tokens, "best_val": self.best_val,
                          "evals_since_best": self.evals_since_best, "elapsed": self.elapsed,
                          "ranks": ranks, "patience_best": self.patience_best}, **UNIVERSAL_INFO}

    @classmethod
    def from_client_state(cls, client: dict[str, Any]) -> "TrainState":
        s = client["mtgpt"]
        return cls(s["step"], s["tokens"], s["best_val"], s["evals_since_best"], s["elapsed"], s["ranks"],
                   s.get("patience_best", s["best_val"]))  # (older checkpoints: one number for both)

    def of_rank(self, world_size: int, rank: int) -> dict[str, Any] | None:
        """What this rank saved, or None when the run was saved by another number of ranks."""
        return self.ranks[rank] if len(self.ranks) == world_size else None


class RunningLoss:
    """The mean train loss since the last log step, summed on the device (no host sync per
    step). It is saved with every checkpoint, so a run resumed between two log steps logs the
    same mean as one that was never stopped."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.sum = torch.zeros((), dtype=torch.float32, device=device)
        self.n = 0

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.n += 1

    def take(self) -> torch.Tensor:
        """The mean so far; starts a new one."""
        mean = self.sum / self.n
        self.sum = torch.zeros_like(self.sum)
        self.n = 0
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {"sum": float(self.sum), "n": self.n}  # a host sync: at saves only; float32 -> float is exact

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:  # absent in checkpoints written before it was saved
            self.sum.fill_(state["sum"])
            self.n = state["n"]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopFlag:
    """SIGTERM (what Slurm sends before a kill) and SIGINT ask for a clean stop: the loop finishes
    its step, saves a checkpoint and exits 0. `early`: signals that came before the flag existed
    (while the rank was importing and planning; mtgpt.cli.run_worker keeps them)."""

    def __init__(self, early: list[int] | tuple[int, ...] = ()):
        self.signal: str | None = signal.Signals(early[0]).name if early else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name


def planned_stop(cfg: TrainConfig, s: TrainState, train_tokens: int) -> str | None:
    """Stops every rank computes alike from the step count and the (all-reduced) val loss: no
    communication needed, checked every step."""
    if cfg.max_steps is not None and s.step >= cfg.max_steps:
        return "max_steps"
    if cfg.max_tokens is not None and s.tokens >= cfg.max_tokens:
        return "max_tokens"
    if cfg.epoch_limit is not None and s.tokens >= cfg.epoch_limit * train_tokens:
        return "max_epochs"
    if cfg.patience is not None and s.evals_since_best >= cfg.patience:
        return "early_stopping"
    return None


def agreed_stop(cfg: TrainConfig, elapsed: float, flag: StopFlag, device: torch.device) -> str | None:
    """Stops one rank may see before another (a signal, its own clock): all-reduced so every rank
    stops at the same step. A collective and a host sync: called at log steps only."""
    hits = torch.tensor([float(cfg.max_time is not None and elapsed >= parse_duration(cfg.max_time)),
                         float(flag.signal is not None)], device=device)
    world.all_reduce_sum(hits)
    time_up, signalled = hits.tolist()
    return "signal" if signalled else "max_time" if time_up else None
