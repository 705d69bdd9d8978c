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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtgpt import checkpoint, distributed as dist, ds_config, hf, monitor, rundir, tokenizer
from mtgpt.config import ConfigError, ModelConfig, TrainConfig
from mtgpt.data import check_compatible, load_manifest
from mtgpt.data.loader import TrainBatches, load_val, resume_position
from mtgpt.model import GPT
from mtgpt.sample import SampleConfig, generate
from mtgpt.state import StopFlag, TrainState, agreed_stop, planned_stop, seed_all, set_rng_state

EVAL_PROMPT = "\n"  # the text sample logged at each evaluation continues this


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
    universal: bool = False  # resume through DeepSpeed's universal checkpoint (world size changed)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.tokens_per_step(self.world_size)

    @property
    def train_tokens(self) -> int:
        return train_tokens(self.manifest, self.cfg.model.block_size)


def train_tokens(manifest: dict[str, Any], block_size: int) -> int:
    """Tokens in one epoch of the train split."""
    return manifest["splits"]["train"]["samples"] * block_size


def schedule_steps(cfg: TrainConfig, manifest: dict[str, Any], world_size: int) -> int:
    """Optimizer steps the run is planned for: the smallest of --max-steps, --max-tokens and
    --max-epochs (1 epoch when none is given). The cosine schedule spans exactly this."""
    per_step = cfg.tokens_per_step(world_size)
    limits = []
    if cfg.max_steps:
        limits.append(cfg.max_steps)
    if cfg.max_tokens:
        limits.append(math.ceil(cfg.max_tokens / per_step))
    if cfg.epoch_limit:
        limits.append(math.ceil(cfg.epoch_limit * train_tokens(manifest, cfg.model.block_size) / per_step))
    return max(1, min(limits))


def plan(cfg: TrainConfig, world_size: int, cuda: bool | None = None) -> Plan:
    """Check everything that can be checked before training; raise with a fix on failure."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    manifest = load_manifest(cfg.data)
    source = source_config(cfg)
    if source is not None and manifest["block_size"] != source.block_size:
        raise ConfigError(f"{cfg.data} holds samples of block size {manifest['block_size']}, but the model you "
                          f"start from has a context of {source.block_size}, which --init-from cannot change: "
                          f"prepare the data again with --block-size {source.block_size}")
    check_compatible(manifest, cfg.data, tokenizer.vocab_sha256(), cfg.model.vocab_size, cfg.model.block_size)
    ds_name = cfg.ds_config or ds_config.default_name(cuda, cuda and torch.cuda.is_bf16_supported())
    ds_name, raw = ds_config.find(ds_name)
    steps = schedule_steps(cfg, manifest, world_size)
    if cfg.patience is not None and manifest["splits"]["val"]["samples"] == 0:
        raise ConfigError(f"--patience needs a val split, and {cfg.data} has none (it was prepared with "
                          "--val-fraction 0); prepare it again with e.g. --val-fraction 0.01, or leave out "
                          "--patience")
    if source is not None and source.shape() != cfg.model.shape():
        raise ConfigError(f"the model to start from has shape {source.shape()}, this run asks for "
                          f"{cfg.model.shape()}; leave the model options out to take the source's")
    resume_from = rundir.resume_point(cfg)
    universal = resume_from is not None and checkpoint.needs_universal(resume_from, world_size)
    if universal:  # optimizer state saved in shards of another world size
        raw = {**raw, "checkpoint": {**raw.get("checkpoint", {}), "load_universal": True}}
    ds = ds_config.resolve(cfg, raw, world_size, steps, name=ds_name, cuda=cuda)
    return Plan(cfg, ds, ds_name, manifest, world_size, steps, resume_from, universal)


def source_config(cfg: TrainConfig) -> ModelConfig | None:
    """The model shape of --init-from / --init-from-hf, or None when training from scratch."""
    try:
        if cfg.init_from:
            return checkpoint.load_model_config(checkpoint.model_folder(cfg.init_from))
        if cfg.init_from_hf:
            return hf.load(cfg.init_from_hf)[0]  # the weights too: an untied lm_head is refused here
    except (checkpoint.ModelFileError, hf.HFError) as e:
        raise ConfigError(f"cannot start from it: {e}") from None
    return None


def load_initial_weights(model: GPT, cfg: TrainConfig) -> None:
    """Copy the --init-from / --init-from-hf weights into a freshly built model."""
    if cfg.init_from:
        checkpoint.load_weights(model, checkpoint.read_weights(cfg.init_from), cfg.init_from)
    else:
        checkpoint.load_weights(model, hf.load(cfg.init_from_hf)[1], cfg.init_from_hf)


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
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)  # (sum of loss x tokens, tokens)
    for chunk in val.split(micro_batch):
        chunk = chunk.to(engine.device)
        _, loss = engine(chunk[:, :-1], chunk[:, 1:])
        n = chunk[:, 1:].numel()
        totals += torch.stack([loss.double() * n, torch.tensor(n, dtype=torch.float64, device=engine.device)])
    engine.train()
    dist.all_reduce_sum(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


# ----------------------------------------------------------------------------- fit


def build_engine(p: Plan, model: GPT):
    if p.cfg.compile if p.cfg.compile is not None else torch.cuda.is_available():
        model.compile()  # in place: parameter names (and so checkpoints) stay the same
    engine, _, _, _ = dist.import_deepspeed().initialize(model=model, model_parameters=model.param_groups(),
                                                         config=p.ds)
    return engine


def resume(engine, p: Plan) -> TrainState:
    """Load the checkpoint into the engine; returns the training state it carried."""
    d = dist.get()
    path = p.resume_from
    if p.universal:
        path = checkpoint.universal(path, is_writer=d.rank == 0)
        dist.print0(f"world size changed: resuming through DeepSpeed's universal checkpoint {path}")
    _, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    state = TrainState.from_client_state(client)
    rng = state.mine("rng", d.world_size, d.rank)
    if rng is not None:
        set_rng_state(rng)
    else:
        seed_all(p.cfg.seed + d.rank + 7919 * state.step)
    return state


def make_history(engine, p: Plan, state: TrainState) -> None:
    """A run resumed from an older point than its newest saves continues from there: the later
    saves (a branch it left) are set aside, `latest` names the resumed checkpoint and the run's
    model.safetensors is the resumed weights again, so nothing of the left branch is taken for
    this one's (not by `--resume auto`, not by pruning, not by `mtgpt sample`)."""
    later = checkpoint.saves_after(p.cfg.out, state.step)  # every rank reads it before rank 0 moves
    dist.barrier()
    if not later:
        return
    if dist.is_rank0():
        moved, aside = checkpoint.set_aside_after(p.cfg.out, state.step)
        if moved:
            dist.print0(f"resuming at step {state.step}, before this run's later saves "
                        f"({', '.join(moved)}): they are set aside in {aside}, and the run goes on from "
                        f"step {state.step}")
        tag = checkpoint.tag_for(state.step)
        if (Path(p.cfg.out) / checkpoint.CKPT_DIR / tag / checkpoint.COMPLETE).is_file():
            checkpoint.point_latest(p.cfg.out, tag)
    export(engine, p, state, Path(p.cfg.out))  # a collective under ZeRO-3
    dist.barrier()


def fit(p: Plan) -> dict[str, Any]:
    """Train as planned; returns a summary (rank 0's numbers)."""
    d = dist.init()
    cfg = p.cfg
    flag = StopFlag()
    seed_all(cfg.seed)  # the same initial weights on every rank
    model = GPT(cfg.model)
    if p.resume_from is None and (cfg.init_from or cfg.init_from_hf):
        load_initial_weights(model, cfg)
    engine = build_engine(p, model)
    seed_all(cfg.seed + d.rank)  # different dropout per rank
    state = resume(engine, p) if p.resume_from is not None else TrainState()
    if p.resume_from is not None:
        make_history(engine, p, state)
    saved_data = state.mine("data", d.world_size, d.rank)
    start, warning = resume_position(saved_data, d.world_size, cfg.num_workers, cfg.micro_batch, cfg.seed)
    if p.resume_from is not None and saved_data is None:
        warning = (f"the data stream was saved by {len(state.ranks)} rank(s) and now {d.world_size} read; "
                   "it starts a new shuffle")
    if warning:
        dist.print0(f"warning: {warning}")
    if dist.is_rank0():
        rundir.write_run_files(p, resumed=p.resume_from is not None)
    batches = TrainBatches(cfg.data, p.manifest, cfg.micro_batch, d.rank, d.world_size, cfg.seed,
                           cfg.num_workers, start=start, device=d.device, vocab_size=cfg.model.vocab_size)
    val = load_val(cfg.data, p.manifest, cfg.eval_samples, d.rank, d.world_size, cfg.model.vocab_size)
    log = monitor.Monitor(cfg.out, enabled=dist.is_rank0(),
                          resume_step=state.step if p.resume_from is not None else None)
    perf = monitor.Throughput(model, d.device, d.world_size)
    dist.print0(rundir.banner(p, model, state.step))
    bar = rundir.progress_bar(p, state.step)

    began = time.time() - state.elapsed
    loss_sum, loss_n = torch.zeros((), device=d.device), 0
    reason = planned_stop(cfg, state, p.train_tokens)
    resumed_done = reason is not None  # resumed a run that had already reached its stop
    while reason is None:
        loss_sum += train_step(engine, batches, cfg.grad_accum)
        loss_n += 1
        state.step += 1
        state.tokens += p.tokens_per_step
        perf.add(p.tokens_per_step)
        state.elapsed = time.time() - began
        log_step = state.step % cfg.log_every == 0
        reason = planned_stop(cfg, state, p.train_tokens)
        if reason is None and log_step:
            reason = agreed_stop(cfg, state.elapsed, flag, d.device)
        metrics: dict[str, float] = {}
        if log_step or reason:  # the last step is always logged and evaluated
            metrics.update(train_metrics(engine, loss_sum / loss_n, state))
            metrics.update(perf.metrics())
            loss_sum.zero_()
            loss_n = 0
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                            tok_s=f"{metrics['perf/tokens_per_s']:.0f}")
        if state.step % cfg.eval_every == 0 or reason:
            metrics.update(evaluate_and_track(engine, val, p, state, log))
            perf.reset()  # tokens/s measures training, not evaluation
            reason = reason or planned_stop(cfg, state, p.train_tokens)  # early stopping
        log.log(metrics, state.step)
        bar.update(1)
        if reason is None and state.step % cfg.save_every == 0:
            save(engine, p, state, batches)
            perf.reset()
    bar.close()
    if not resumed_done:
        save(engine, p, state, batches)
    val_loss = monitor.last(log.history, "val/loss")
    log.close()
    finite = (lambda x: x if math.isfinite(x) else None)  # JSON has no NaN or inf
    if dist.is_rank0():
        rundir.write_last_stop(cfg.out, reason=reason, step=state.step, tokens=state.tokens,
                               val_loss=finite(val_loss), best_val=finite(state.best_val))
    val_text = (f"val loss {val_loss:.4f}, best {state.best_val:.4f}" if len(val) else
                "no val split, so no val loss")
    dist.print0(f"stopped ({reason}) at step {state.step}, {state.tokens:,} tokens; {val_text}; "
                f"model: {Path(cfg.out) / checkpoint.WEIGHTS}")
    return {"step": state.step, "tokens": state.tokens, "val_loss": val_loss, "best_val": state.best_val,
            "reason": reason}


def train_metrics(engine, loss: torch.Tensor, state: TrainState) -> dict[str, float]:
    """The train/ scalars of a log step (this is where the host waits for the GPU)."""
    train_loss = float(dist.all_reduce_sum(loss.detach().clone()) / dist.get().world_size)
    if not math.isfinite(train_loss):
        raise TrainingDiverged(f"the training loss is {train_loss} at step {state.step}; stopping. The "
                               "last good checkpoint is kept. Lower --lr or raise --warmup-steps.")
    metrics = {"train/loss": train_loss, "lr": engine.get_lr()[0], "train/tokens": state.tokens}
    norm = engine.get_global_grad_norm()
    if norm is not None:
        metrics["train/grad_norm"] = float(norm)
    metrics.update(monitor.loss_scale_metrics(engine))
    return metrics


def evaluate_and_track(engine, val: torch.Tensor, p: Plan, state: TrainState, log: monitor.Monitor) -> dict[str, float]:
    """Evaluate, update early stopping, export the best weights when the val loss improves, and
    log a text sample and the loss plot. With no val split only the sample is logged."""
    if len(val) == 0:  # the same on every rank: the val split is empty everywhere
        log.text("sample", eval_sample(engine, p.cfg.seed + state.step), state.step)
        return {}
    loss = evaluate(engine, val, p.cfg.micro_batch)
    if loss < state.best_val - p.cfg.min_delta:
        state.best_val, state.evals_since_best = loss, 0
        export(engine, p, state, Path(p.cfg.out) / "best", {"val_loss": str(loss)})
    else:
        state.evals_since_best += 1
    text = eval_sample(engine, p.cfg.seed + state.step)
    log.text("sample", text, state.step)
    dist.print0(f"step {state.step}: val loss {loss:.4f} (best {state.best_val:.4f})", file=sys.stderr)
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def eval_sample(engine, seed: int, tokens: int = 48) -> str:
    """A short sample from the model being trained. Every rank generates the same tokens (same
    seed, a fixed length), so ZeRO-3's per-layer parameter gathers stay in step."""
    engine.eval()
    cfg = SampleConfig(max_new_tokens=tokens, temperature=0.8, top_k=200, seed=seed, stop_at_eot=False)
    text = generate(engine.module, EVAL_PROMPT, cfg)[0]
    engine.train()
    return text


def export(engine, p: Plan, state: TrainState, folder: Path, extra: dict[str, str] | None = None) -> None:
    """Consolidated fp32 safetensors + config.json (a collective under ZeRO-3; rank 0 writes)."""
    d = dist.get()
    weights = checkpoint.gather_weights(engine.module, engine.zero_optimization_stage(), d.rank)
    if d.rank == 0:
        meta = {"step": str(state.step), "tokens": str(state.tokens), **(extra or {})}
        checkpoint.save_weights(weights, p.cfg.model, folder, meta)


def save(engine, p: Plan, state: TrainState, batches: TrainBatches) -> None:
    """DeepSpeed checkpoint on every rank; then rank 0 writes the consolidated model, marks the
    checkpoint COMPLETE, moves `latest` and prunes old tags. A crash before the marker leaves a
    torn folder that resume ignores."""
    tag = checkpoint.tag_for(state.step)
    root = Path(p.cfg.out) / checkpoint.CKPT_DIR
    if dist.is_rank0():  # a folder for this step from an older attempt is unmarked before rewriting
        (root / tag / checkpoint.COMPLETE).unlink(missing_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=state.client_state(batches.state_dict()),
                           save_latest=False)
    dist.barrier()  # every rank's shard is on disk
    export(engine, p, state, Path(p.cfg.out))
    if dist.is_rank0():
        info = {"step": state.step, "tokens": state.tokens, "world_size": p.world_size,
                "zero_stage": engine.zero_optimization_stage(), "precision": ds_config.precision(p.ds)}
        checkpoint.mark_complete(p.cfg.out, tag, info, keep_last=p.cfg.keep_last)
    dist.barrier()
