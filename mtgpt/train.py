"""Training: plan (every check, before any process starts), then fit (build, maybe resume, loop).

`plan()` is pure: it reads the data manifest, the DeepSpeed JSON and the run folder and raises
ConfigError/DataError on anything that cannot work. `mtgpt train` calls it in the launching
process so a bad option is reported once; each rank calls it again (cheap) so that
`deepspeed launch/train.py ...` gets the same checks.

`fit()` reads as a story: build the engine, maybe resume, loop over steps (step, log, evaluate,
save), stop on the first stop condition, save, export the consolidated model. DeepSpeed owns
accumulation, clipping, precision, ZeRO, AdamW and the LR schedule through its JSON.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtgpt import checkpoint, distributed as dist, ds_config, rundir, tokenizer
from mtgpt.config import ConfigError, TrainConfig, parse_duration
from mtgpt.data import check_compatible, load_manifest
from mtgpt.data.loader import TrainBatches, load_val, resume_position
from mtgpt.model import GPT
from mtgpt.monitor import Monitor


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


@dataclass
class Plan:
    cfg: TrainConfig
    ds: dict[str, Any]  # the DeepSpeed dict actually used
    ds_name: str
    manifest: dict[str, Any]
    world_size: int
    schedule_steps: int  # length of the LR schedule in optimizer steps
    resume_from: Path | None  # a complete checkpoint folder, or None to start fresh

    @property
    def tokens_per_step(self) -> int:
        c = self.cfg
        return c.micro_batch * c.grad_accum * self.world_size * c.model.block_size


def schedule_steps(cfg: TrainConfig, manifest: dict[str, Any], world_size: int) -> int:
    """Optimizer steps the run is planned for: --max-steps, else from --max-tokens, else from
    --max-epochs (1 when no limit is given). The cosine schedule spans exactly this."""
    per_step = cfg.micro_batch * cfg.grad_accum * world_size * cfg.model.block_size
    limits = []
    if cfg.max_steps:
        limits.append(cfg.max_steps)
    if cfg.max_tokens:
        limits.append(math.ceil(cfg.max_tokens / per_step))
    if cfg.max_epochs or not limits:
        train_tokens = manifest["splits"]["train"]["samples"] * cfg.model.block_size
        limits.append(math.ceil((cfg.max_epochs or 1.0) * train_tokens / per_step))
    return max(1, min(limits))


def plan(cfg: TrainConfig, world_size: int, cuda: bool | None = None) -> Plan:
    """Check everything that can be checked before training; raise with a fix on failure."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    manifest = load_manifest(cfg.data)
    check_compatible(manifest, cfg.data, tokenizer.vocab_sha256(), cfg.model.vocab_size, cfg.model.block_size)
    ds_name = cfg.ds_config or ds_config.default_name(cuda, cuda and torch.cuda.is_bf16_supported())
    ds_name, raw = ds_config.find(ds_name)
    steps = schedule_steps(cfg, manifest, world_size)
    ds = ds_config.resolve(cfg, raw, world_size, steps, name=ds_name, cuda=cuda)
    resume_from = rundir.resume_point(cfg)
    return Plan(cfg, ds, ds_name, manifest, world_size, steps, resume_from)


# ----------------------------------------------------------------------------- the step


def train_step(engine, batches: TrainBatches, grad_accum: int) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches. Returns the mean loss as a tensor
    (no host sync). engine.step() applies the update only at the accumulation boundary."""
    total = torch.zeros((), device=engine.device)
    for _ in range(grad_accum):
        x, y = next(batches)
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return total / grad_accum


@torch.no_grad()
def evaluate(engine, val: torch.Tensor, micro_batch: int) -> float:
    """Mean val loss over all ranks' shares of the fixed val set (every rank runs the same number
    of forward passes, which ZeRO-3 needs)."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)  # (sum of losses x tokens, tokens)
    for chunk in val.split(micro_batch):
        chunk = chunk.to(engine.device)
        _, loss = engine(chunk[:, :-1], chunk[:, 1:])
        totals += torch.tensor([loss.item() * chunk[:, 1:].numel(), chunk[:, 1:].numel()],
                               dtype=torch.float64, device=engine.device)
    engine.train()
    dist.all_reduce_sum(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


# ----------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Everything needed to continue a run exactly, besides DeepSpeed's own engine state."""

    step: int = 0
    tokens: int = 0
    best_val: float = float("inf")
    evals_since_best: int = 0
    elapsed: float = 0.0  # training seconds before this process started
    ranks: list[dict[str, Any]] = field(default_factory=list)  # per rank: RNG states, data position

    def client_state(self, batches: TrainBatches) -> dict[str, Any]:
        mine = {"rng": _rng_state(), "data": batches.state_dict()}
        ranks = dist.all_gather_object(mine)
        return {"mtgpt": {"step": self.step, "tokens": self.tokens, "best_val": self.best_val,
                          "evals_since_best": self.evals_since_best, "elapsed": self.elapsed,
                          "ranks": ranks}}

    @classmethod
    def from_client_state(cls, client: dict[str, Any]) -> "TrainState":
        s = client["mtgpt"]
        return cls(s["step"], s["tokens"], s["best_val"], s["evals_since_best"], s["elapsed"], s["ranks"])


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- stopping


class StopFlag:
    """SIGTERM (Slurm's warning before a kill) and SIGINT ask for a clean stop: save, exit 0."""

    def __init__(self):
        self.signal: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name


def stop_reason(p: Plan, s: TrainState, elapsed: float, flag: StopFlag) -> str | None:
    """The first stop condition met, agreed by all ranks (a collective: call on every rank)."""
    c = p.cfg
    train_tokens = p.manifest["splits"]["train"]["samples"] * c.model.block_size
    reasons = [
        ("max_steps", c.max_steps is not None and s.step >= c.max_steps),
        ("max_tokens", c.max_tokens is not None and s.tokens >= c.max_tokens),
        ("max_epochs", s.tokens >= (c.max_epochs or 1.0) * train_tokens
         if (c.max_epochs or not (c.max_steps or c.max_tokens)) else False),
        ("max_time", c.max_time is not None and elapsed >= parse_duration(c.max_time)),
        ("early_stopping", c.patience is not None and s.evals_since_best >= c.patience),
        ("signal", flag.signal is not None),
    ]
    hits = torch.tensor([float(hit) for _, hit in reasons])
    dist.all_reduce_sum(hits)  # a condition met on any rank (a signal, a clock) stops them all
    for (name, _), hit in zip(reasons, hits.tolist()):
        if hit:
            return name
    return None


# ----------------------------------------------------------------------------- fit


def build_engine(p: Plan, model: GPT):
    engine, _, _, _ = dist.import_deepspeed().initialize(model=model, model_parameters=model.param_groups(),
                                           config=p.ds)
    return engine


def fit(p: Plan) -> dict[str, Any]:
    """Train as planned; returns a summary (rank 0's numbers)."""
    d = dist.init()
    cfg = p.cfg
    flag = StopFlag()
    _seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(cfg.model)
    engine = build_engine(p, model)
    _seed(cfg.seed + d.rank)  # different dropout per rank

    state = TrainState()
    if p.resume_from is not None:
        _, client = engine.load_checkpoint(str(p.resume_from.parent), tag=p.resume_from.name)
        state = TrainState.from_client_state(client)
        if len(state.ranks) == d.world_size:
            _set_rng_state(state.ranks[d.rank]["rng"])
    saved_data = state.ranks[d.rank]["data"] if len(state.ranks) == d.world_size else None
    start, warning = resume_position(saved_data, d.world_size, cfg.num_workers, cfg.micro_batch, cfg.seed)
    if p.resume_from is not None and warning:
        dist.print0(f"warning: {warning}")
    if dist.is_rank0():
        rundir.write_run_files(p, resumed=p.resume_from is not None)
    batches = TrainBatches(cfg.data, p.manifest, cfg.micro_batch, d.rank, d.world_size, cfg.seed,
                           cfg.num_workers, start=start, device=d.device, vocab_size=cfg.model.vocab_size)
    val = load_val(cfg.data, p.manifest, cfg.eval_samples, d.rank, d.world_size, cfg.model.vocab_size)
    monitor = Monitor(cfg.out, enabled=dist.is_rank0(),
                      resume_step=state.step if p.resume_from is not None else None)
    dist.print0(rundir.banner(p, model, state.step))
    bar = rundir.progress_bar(p, state.step)

    began = time.time() - state.elapsed
    window_start, window_tokens = time.perf_counter(), 0
    loss_sum, loss_n, last_eval = torch.zeros((), device=d.device), 0, -1
    reason = stop_reason(p, state, time.time() - began, flag)
    while reason is None:
        loss_sum += train_step(engine, batches, cfg.grad_accum)
        loss_n += 1
        state.step += 1
        state.tokens += p.tokens_per_step
        window_tokens += p.tokens_per_step
        metrics: dict[str, float] = {}
        if state.step % cfg.log_every == 0:
            metrics.update(_train_metrics(engine, loss_sum / loss_n, state, window_tokens,
                                          time.perf_counter() - window_start))
            loss_sum.zero_()
            loss_n, window_start, window_tokens = 0, time.perf_counter(), 0
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                            tok_s=f"{metrics['perf/tokens_per_s']:.0f}")
        if state.step % cfg.eval_every == 0:
            metrics.update(_evaluate_and_track(engine, val, p, state))
            last_eval = state.step
        monitor.log(metrics, state.step)
        bar.update(1)
        state.elapsed = time.time() - began
        reason = stop_reason(p, state, state.elapsed, flag)
        if state.step % cfg.save_every == 0 and reason is None:
            save(engine, p, state, batches)
    bar.close()

    if last_eval != state.step:
        monitor.log(_evaluate_and_track(engine, val, p, state), state.step)
    save(engine, p, state, batches)
    val_loss = _last(monitor.history, "val/loss") if dist.is_rank0() else float("nan")
    monitor.close()
    if dist.is_rank0():
        rundir.write_last_stop(cfg.out, reason=reason, step=state.step, tokens=state.tokens,
                               val_loss=val_loss, best_val=state.best_val)
    dist.print0(f"stopped ({reason}) at step {state.step}, {state.tokens:,} tokens; val loss {val_loss:.4f}, "
                f"best {state.best_val:.4f}; model: {Path(cfg.out) / checkpoint.WEIGHTS}")
    return {"step": state.step, "tokens": state.tokens, "val_loss": val_loss, "best_val": state.best_val,
            "reason": reason}


def _train_metrics(engine, loss: torch.Tensor, state: TrainState, tokens: int, seconds: float) -> dict[str, float]:
    """The train/ and perf/ scalars of a log step (this is where the host waits for the GPU)."""
    world = dist.get().world_size
    train_loss = float(dist.all_reduce_sum(loss.detach().clone()) / world)
    if not math.isfinite(train_loss):
        raise TrainingDiverged(f"the training loss is {train_loss} at step {state.step}; stopping. The "
                               "last good checkpoint is kept. Lower --lr or raise --warmup-steps.")
    metrics = {"train/loss": train_loss, "lr": engine.get_lr()[0], "train/tokens": state.tokens,
               "perf/tokens_per_s": tokens / seconds}
    norm = engine.get_global_grad_norm()
    if norm is not None:
        metrics["train/grad_norm"] = float(norm)
    return metrics


def _last(history: list[dict[str, Any]], key: str) -> float:
    for row in reversed(history):
        if key in row:
            return row[key]
    return float("nan")


def _evaluate_and_track(engine, val: torch.Tensor, p: Plan, state: TrainState) -> dict[str, float]:
    """Evaluate, update early stopping, and export the best weights when the val loss improves."""
    loss = evaluate(engine, val, p.cfg.micro_batch)
    if loss < state.best_val - p.cfg.min_delta:
        state.best_val, state.evals_since_best = loss, 0
        export(engine, p, state, Path(p.cfg.out) / "best", {"val_loss": str(loss)})
    else:
        state.evals_since_best += 1
    dist.print0(f"step {state.step}: val loss {loss:.4f} (best {state.best_val:.4f})", file=sys.stderr)
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}


def export(engine, p: Plan, state: TrainState, folder: Path, extra: dict[str, str] | None = None) -> None:
    """Consolidated fp32 safetensors + config.json (a collective under ZeRO-3; rank 0 writes)."""
    d = dist.get()
    weights = checkpoint.gather_weights(engine.module, engine.zero_optimization_stage(), d.rank)
    if d.rank == 0:
        meta = {"step": str(state.step), "tokens": str(state.tokens), **(extra or {})}
        checkpoint.save_weights(weights, p.cfg.model, folder, meta)


def save(engine, p: Plan, state: TrainState, batches: TrainBatches) -> None:
    """DeepSpeed checkpoint on every rank; then rank 0 marks it COMPLETE, moves `latest`, prunes
    old tags, and writes the consolidated model. A crash before the marker leaves a torn folder
    that resume ignores."""
    tag = checkpoint.tag_for(state.step)
    root = Path(p.cfg.out) / checkpoint.CKPT_DIR
    engine.save_checkpoint(str(root), tag=tag, client_state=state.client_state(batches), save_latest=False)
    dist.barrier()  # every rank's shard is on disk
    export(engine, p, state, Path(p.cfg.out))
    if dist.is_rank0():
        checkpoint.mark_complete(p.cfg.out, tag, {"step": state.step, "tokens": state.tokens},
                                 keep_last=p.cfg.keep_last)
    dist.barrier()
