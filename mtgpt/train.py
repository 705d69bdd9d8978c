"""Training: make_plan (every check, before any process starts), then fit (build, resume, loop).

`make_plan()` is pure: it reads the data manifest, the DeepSpeed JSON and the run folder and
raises ConfigError/DataError on anything that cannot work. `mtgpt train` calls it in the
launching process so a bad option is reported once; each rank calls it again (cheap) so that
`deepspeed launch/train.py ...` gets the same checks.

`fit()` reads as a story: build the engine, resume, loop over steps (step, log, evaluate,
save), stop on the first stop condition, save, export the consolidated model. DeepSpeed owns
accumulation, clipping, precision, ZeRO, AdamW and the LR schedule through its JSON.
"""

from __future__ import annotations

import io
import math
import shlex
import sys
import threading
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from mtgpt import __version__, checkpoint, ds_config, monitor, rundir, tokenizer, world
from mtgpt.config import ConfigError, DataSource, ModelConfig, TrainConfig, data_sources, parse_duration
from mtgpt.data import DataError, check_compatible, load_manifest, remote
from mtgpt.data.loader import Split, TrainBatches, load_val, resume_position
from mtgpt.data.manifest import identity, older_chat
from mtgpt.model import GPT, flops_per_token, param_count, training_bytes_per_token
from mtgpt.sample import SampleConfig, generate
from mtgpt.state import (RunningLoss, StopFlag, TrainState, agreed_stop, planned_stop, seed_all,
                         set_rng_state)

EVAL_PROMPT = "\n"  # the text sample logged at each evaluation continues this
REPEAT_WARN = 4.0  # warn before a run that reads a source more often (data-constrained scaling: ~4 epochs
#                    of repeated data train about as well as new data, more gain less and less)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


class SaveError(RuntimeError):
    """A checkpoint could not be written for lack of space (the message says where and what to do)."""


def save_problem(root: Path, tag: str, params: int, error: BaseException) -> SaveError | None:
    """The SaveError for a failed write of checkpoint `tag` when its filesystem is full (ENOSPC,
    a quota, or what torch's writer says instead, "unexpected pos", when it finds no space
    left); None for other failures (raised as they are)."""
    import errno
    import shutil

    free = shutil.disk_usage(root if root.exists() else root.parent).free
    if not (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < 64 * 2**20):
        return None
    return SaveError(f"could not save {root / tag}: no space left on its filesystem ({free / 2**20:.0f} MB free; "
                     f"a checkpoint of this model takes about {params * 16 / 2**20:,.0f} MB, 16 bytes per parameter, "
                     f"and the model file {params * 4 / 2**20:,.0f} MB). Free some space (fewer checkpoints: "
                     "--keep-last), then go on with --resume auto from the last complete checkpoint")


def diverged(what: str, value: float, state: TrainState, out: str) -> TrainingDiverged:
    """The error for a non-finite loss: what is kept (no checkpoint holds weights after a
    non-finite loss: the train loss is checked at every log step and save, the val loss at
    every evaluation, before anything is written) and what to change."""
    kept = checkpoint.latest_complete(out)
    return TrainingDiverged(f"the {what} is {value} at step {state.step}; stopping. "
                            + (f"The last good checkpoint is {kept}; resume from it" if kept
                               else "Nothing was saved; start again") + " with a lower --lr or a longer --warmup-steps.")


@dataclass
class Plan:
    cfg: TrainConfig
    ds: dict[str, Any]  # the DeepSpeed dict actually used
    ds_name: str
    manifests: list[dict[str, Any]]  # one per source of --data
    weights: list[float]  # each source's share of the samples drawn (sums to 1)
    world_size: int
    schedule_steps: int  # length of the LR schedule in optimizer steps
    resume_from: Path | None  # a complete checkpoint folder, or None to start fresh
    universal: bool = False  # resume through DeepSpeed's universal checkpoint (world size changed)
    tok: tokenizer.Tokenizer | None = None  # the data's tokenizer, read by fit() (the data may be a URL)
    ds_own: bool = False  # a resumed run goes on with the DeepSpeed dict it saved (ds_config.json), not ds_name's file

    @property
    def sources(self) -> list[DataSource]:
        return self.cfg.sources

    @property
    def manifest(self) -> dict[str, Any]:
        """The first source's manifest (all sources share the tokenizer and the block size)."""
        return self.manifests[0]

    @property
    def data_ids(self) -> list[str]:
        """What each source holds (manifest.identity): a resume matches the saved sources by it."""
        return [identity(m) for m in self.manifests]

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.tokens_per_step(self.world_size)

    @property
    def train_tokens(self) -> int:
        return train_tokens(self.manifests, self.cfg.model.block_size)

    @property
    def val_samples(self) -> int:
        return sum(m["splits"]["val"]["samples"] for m in self.manifests)

    def epochs(self, step: int = 0, drawn: list[float] | None = None) -> list[float]:
        """How many times the planned run reads each source's train split: the samples a resumed
        run drew from each before `step` (`drawn`, all ranks together) and the rest of the
        schedule's at the weights of now (a mixture resumed with new weights reads its sources
        neither at the old weights nor at the new ones throughout)."""
        left = max(self.schedule_steps - step, 0) * self.tokens_per_step // self.cfg.model.block_size
        drawn = drawn or [0.0] * len(self.weights)
        return [(d + w * left) / m["splits"]["train"]["samples"]
                for d, w, m in zip(drawn, self.weights, self.manifests)]


def train_tokens(manifests: list[dict[str, Any]], block_size: int) -> int:
    """Tokens in one epoch of the train splits (of all sources together)."""
    return sum(m["splits"]["train"]["samples"] for m in manifests) * block_size


def schedule_steps(cfg: TrainConfig, manifests: list[dict[str, Any]], world_size: int) -> int:
    """Optimizer steps the run is planned for: the smallest of --max-steps, --max-tokens and
    --max-epochs (1 epoch when none is given; with a mixture, an epoch is the train tokens of all
    sources together). The cosine schedule spans exactly this."""
    per_step = cfg.tokens_per_step(world_size)
    limits = []
    if cfg.max_steps:
        limits.append(cfg.max_steps)
    if cfg.max_tokens:
        limits.append(math.ceil(cfg.max_tokens / per_step))
    if cfg.epoch_limit:
        limits.append(math.ceil(cfg.epoch_limit * train_tokens(manifests, cfg.model.block_size) / per_step))
    return max(1, min(limits))


CPU_MICRO_BATCH, GPU_TOKENS_PER_PASS = 8, 32_768
CPU_EVAL_EVERY, GPU_EVAL_EVERY = 200, 1000


def default_micro_batch(model: ModelConfig, precision: str, gpu_memory: int | None) -> int:
    """--micro-batch when none is given: 8 on a CPU (gpu_memory None). On a GPU, the largest power
    of two of sequences, up to GPU_TOKENS_PER_PASS tokens per pass (the seed model's 64 x 512 is
    where its throughput levels off on an H100, README), whose activations
    (`training_bytes_per_token`) take at most half of the GPU's memory."""
    if gpu_memory is None:
        return CPU_MICRO_BATCH
    per_sequence = model.block_size * training_bytes_per_token(model, precision)
    micro = 1
    while 2 * micro * model.block_size <= GPU_TOKENS_PER_PASS and 2 * micro * per_sequence <= gpu_memory // 2:
        micro *= 2
    return micro


def device_defaults(cfg: TrainConfig, raw_ds: dict[str, Any], cuda: bool, gpu_memory: int | None) -> TrainConfig:
    """--micro-batch (the DeepSpeed JSON's own number if it has one, else `default_micro_batch`)
    and --eval-every (a GPU trains 200 steps in seconds: evaluating, exporting best/ and sampling
    that often would take a tenth of its time) where the command line leaves them out."""
    micro = cfg.micro_batch
    if micro is None:
        given = raw_ds.get("train_micro_batch_size_per_gpu")
        micro = given if isinstance(given, int) and not isinstance(given, bool) else \
            default_micro_batch(cfg.model, ds_config.precision(raw_ds), gpu_memory if cuda else None)
    return cfg.replace(micro_batch=micro, eval_every=cfg.eval_every or (GPU_EVAL_EVERY if cuda else CPU_EVAL_EVERY))


def make_plan(cfg: TrainConfig, world_size: int, cuda: bool | None = None, gpu_memory: int | None = None,
              ds_config_given: bool = False, ranks: str = "--nproc {n}") -> Plan:
    """Check everything that can be checked before training; raise with a fix on failure.
    gpu_memory (bytes; default: this machine's first GPU's) sizes the default micro-batch.
    ds_config_given: --ds-config was on the command line (a resumed run then reads that file as
    it is now, not its own copy). ranks: how the user asks for n ranks (TrainConfig.for_world)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and gpu_memory is None and torch.cuda.is_available():
        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    monitor.env_peak_flops()  # a bad MTGPT_PEAK_FLOPS is refused now, not at the first log step
    world.collective_timeout()  # and a bad MTGPT_COLLECTIVE_TIMEOUT, not in every rank
    try:
        manifests = load_sources(cfg.sources, cfg.data_cache)
    except DataError as e:
        if cfg.resume != "never" and "no such folder" in str(e):  # (a resumed run's data that moved)
            relative = [s.path for s in cfg.sources if not remote.is_url(s.path) and not Path(s.path).is_absolute()]
            where = (f" ({', '.join(relative)}: a relative path, as an older mtgpt recorded it, is looked for from "
                     "this folder: give its path from here)" if relative else "")
            raise DataError(f"{e}; if it moved, give --data NEW_PATH: a resumed run takes it{where}") from None
        raise
    manifest = manifests[0]
    resume_from = rundir.resume_point(cfg)
    if resume_from is None:  # a resumed fine-tune needs its checkpoint, not the model it started from
        check_source(cfg, manifest)
    check_tokenizer(cfg, manifest, resume_from)
    for source, m in zip(cfg.sources, manifests):
        check_compatible(m, source.path, cfg.model.vocab_size, cfg.model.block_size, resume_from is not None)
    if resume_from is not None:
        check_source_order(cfg, resume_from)
        cfg = rundir.keep_run_settings(cfg, resume_from)
    own = rundir.own_ds_config(cfg, resume_from, ds_config_given) if resume_from is not None else None  # the JSON it trained with
    ds_name, raw = own or ds_config.find(cfg.ds_config or ds_config.default_name(cuda, cuda and torch.cuda.is_bf16_supported()))
    cfg = device_defaults(cfg, raw, cuda, gpu_memory).replace(ds_config=cfg.ds_config or ds_name)
    if cfg.model.vocab_multiple is None:  # what fits the device: tensor cores want a multiple of 64
        cfg = cfg.replace(model=replace(cfg.model, vocab_multiple=64 if cuda else 1))
    kept = resume_from is not None and cfg.batch_size == (rundir.saved_settings(resume_from) or {}).get("batch_size")
    cfg = cfg.for_world(world_size, resumed=kept, ranks=ranks)
    steps = schedule_steps(cfg, manifests, world_size)
    if cfg.patience is not None and not any(m["splits"]["val"]["samples"] for m in manifests):
        raise ConfigError(f"--patience needs a val split, and {data_names(cfg)} has none (it was prepared with "
                          "--val-fraction 0); prepare it again with e.g. --val-fraction 0.01, or leave out "
                          "--patience")
    universal = resume_from is not None and checkpoint.needs_universal(resume_from, world_size)
    if universal:  # optimizer state saved in shards of another world size
        raw = {**raw, "checkpoint": {**raw.get("checkpoint", {}), "load_universal": True}}
    ds = ds_config.resolve(cfg, raw, world_size, steps, name=ds_config.shown(ds_name), cuda=cuda)
    if resume_from is not None:
        rundir.check_resumable_ds(resume_from, ds, ds_name)
    return Plan(cfg, ds, ds_name, manifests, mixture_weights(cfg.sources, manifests), world_size, steps,
                resume_from, universal, ds_own=own is not None)


def data_names(cfg: TrainConfig) -> str:
    """--data in words, for messages."""
    return " + ".join(s.path for s in cfg.sources) or "--data"


def load_sources(sources: list[DataSource], cache: str | None = None) -> list[dict[str, Any]]:
    """The manifest of each source of --data (a URL's from `cache` if it cannot be reached);
    refused unless they share one tokenizer and block size (a model reads one vocabulary, and a
    sample is its context)."""
    if not sources:
        raise ConfigError("--data is required: a folder written by `mtgpt prepare`")
    manifests = [load_manifest(s.path, cache) for s in sources]
    first, m0 = sources[0], manifests[0]
    for source, m in zip(sources[1:], manifests[1:]):
        if not tokenizer.same(m["tokenizer"], m0["tokenizer"]):
            raise DataError(f"the --data sources read different tokenizers: {first.path} "
                            f"{tokenizer.describe(m0['tokenizer'])}, {source.path} {tokenizer.describe(m['tokenizer'])}; "
                            f"prepare {source.path} again with --tokenizer {first.path}")
        if m["block_size"] != m0["block_size"]:
            raise DataError(f"the --data sources have different block sizes: {first.path} {m0['block_size']}, "
                            f"{source.path} {m['block_size']}; prepare {source.path} again with --block-size "
                            f"{m0['block_size']}")
    return manifests


def check_source_order(cfg: TrainConfig, found: Path) -> None:
    """A resumed mixture's sources in another order than the run's: refused, with the order to give.
    Each source's shuffle is that of its place, so reordered sources could not go on where they were
    (each would start over). Other changes (a source added, dropped, replaced) are resume's notes."""
    try:
        saved = [s.name for s in data_sources((rundir.saved_settings(found) or {}).get("data") or [])]
    except ConfigError:  # (a saved source that no longer parses: nothing to compare)
        return
    names = [s.name for s in cfg.sources]
    if len(names) > 1 and sorted(names) == sorted(saved) and names != saved:
        by_name = {s.name: s for s in cfg.sources}
        order = " ".join(f"--data {s.name}={s.path}" + (f":{s.weight:g}" if s.weight is not None else "")
                         for s in (by_name[n] for n in saved))
        raise ConfigError(f"the sources are given in another order ({', '.join(names)}) than the run saved "
                          f"({', '.join(saved)}); each source's shuffle is that of its place, so give them in the "
                          f"run's order to have each go on where it was: {order}")


def mixture_weights(sources: list[DataSource], manifests: list[dict[str, Any]]) -> list[float]:
    """Each source's share of the samples drawn: its --data weight, or (none given) its share of
    the train samples, as if the sources were one corpus."""
    raw = [s.weight if s.weight is not None else m["splits"]["train"]["samples"] for s, m in zip(sources, manifests)]
    return [w / sum(raw) for w in raw]


def plan_warnings(plan: Plan, step: int = 0, drawn: list[float] | None = None) -> list[str]:
    """What to tell the user before the start: a URL read from its cached copy, a warmup as long as
    the schedule, chat data of an mtgpt before loss masks, a source of a mixture with no val split, and a source read more than
    REPEAT_WARN times (unless --max-epochs asked for it, with one source)."""
    out = [f"warning: {remote.from_cache[s.path]}" for s in plan.sources if s.path in remote.from_cache]
    if plan.cfg.warmup_steps is not None and plan.cfg.warmup_steps >= plan.schedule_steps:
        out.append(f"warning: --warmup-steps {plan.cfg.warmup_steps} is not shorter than the {plan.schedule_steps}-step "
                   "schedule: the learning rate never reaches --lr; lower --warmup-steps or train longer")
    params = (plan.ds.get("optimizer") or {}).get("params") or {}
    if not params.get("torch_adam"):
        out.append('note: the DeepSpeed JSON\'s optimizer has no "torch_adam": true, so DeepSpeed builds its own '
                   "FusedAdam op: a compile of a minute or more at the first start on this machine, which prints "
                   "nothing (the bundled JSONs use PyTorch's fused AdamW)")
    without = [s.name for s, m in zip(plan.sources, plan.manifests) if not m["splits"]["val"]["samples"]]
    if len(plan.sources) > 1 and without and len(without) < len(plan.sources):
        out.append(f"note: {', '.join(without)} {'has' if len(without) == 1 else 'have'} no val split (prepared with "
                   "--val-fraction 0): val/loss, early stopping and best/ are the other sources' alone")
    out += [f"warning: {s.name} ({s.path}): {older}" for s, m in zip(plan.sources, plan.manifests)
            if (older := older_chat(m))]
    if ds_config.precision(plan.ds) == "bf16" and not torch.cuda.is_available() and not world.cpu_bf16_fast():
        out.append(f"warning: {plan.ds_name} trains in bf16, which this CPU has no instructions for (no AVX-512): "
                   "PyTorch emulates it, tens of times slower than fp32; --ds-config zero1_fp32 (the CPU default) "
                   "is the fast one here")
    if plan.cfg.max_epochs is not None and len(plan.sources) == 1:
        return out
    for source, w, epochs, m in zip(plan.sources, plan.weights, plan.epochs(step, drawn), plan.manifests):
        if epochs > REPEAT_WARN:
            share = f" at weight {w:.3g}" if len(plan.sources) > 1 else ""
            out.append(f"warning: the planned {plan.schedule_steps} steps read {source.name} ({source.path}, "
                       f"{m['splits']['train']['samples'] * plan.cfg.model.block_size:,} train tokens){share} "
                       f"{epochs:.1f} times; past ~{REPEAT_WARN:.0f} epochs repeated data teaches less and less: "
                       f"give more text{', lower its weight' if share else ''} or train fewer steps")
    return out


def check_source(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """--init-from / --init-from-hf: the run's model must have the source's shape, and the data
    the source's context (which a fine-tune cannot change)."""
    source = source_config(cfg)
    if source is None:
        return
    for key, value in source.shape().items():
        if getattr(cfg.model, key) != value:
            why = (f" (its context, which --init-from cannot change: prepare the data with --block-size "
                   f"{value} if it differs)" if key == "block_size" else "")
            raise ConfigError(f"--{key.replace('_', '-')} {getattr(cfg.model, key)} differs from the model you "
                              f"start from ({key} {value}); leave it out{why}")
    if manifest["block_size"] != source.block_size:
        raise ConfigError(f"{data_names(cfg)} holds samples of block size {manifest['block_size']}, but the model you "
                          f"start from has a context of {source.block_size}, which --init-from cannot change: "
                          f"prepare the data again with --block-size {source.block_size}")


def check_tokenizer(cfg: TrainConfig, manifest: dict[str, Any], resume_from: Path | None) -> None:
    """The model must read the data's tokenizer: a run resumed, or a model started from, that
    reads another is refused (a fresh model's vocabulary follows the data)."""
    data = manifest["tokenizer"]
    if resume_from is not None:
        saved = checkpoint.recorded_tokenizer(rundir.run_of(resume_from))
        if not tokenizer.same(saved, data):
            raise ConfigError(f"cannot resume {cfg.out} on {data_names(cfg)}: the run reads tokenizer "
                              f"{tokenizer.describe(saved)}, the data was prepared with {tokenizer.describe(data)}; "
                              "prepare the data with "
                              f"--tokenizer {shlex.quote(cfg.out)}, or start a new run with another --out")
    source = cfg.init_from or cfg.init_from_hf
    if source and resume_from is None:
        try:
            theirs = checkpoint.source_tokenizer(cfg.init_from, cfg.init_from_hf).identity()
        except ValueError as e:
            raise ConfigError(f"cannot start from {source_option(cfg)}: {e}") from None
        if not tokenizer.same(theirs, data):
            raise ConfigError(f"the model you start from ({source}) reads tokenizer {tokenizer.describe(theirs)}, but "
                              f"{data_names(cfg)} was prepared with {tokenizer.describe(data)}: prepare the data again with "
                              f"--tokenizer {shlex.quote(source)}")


def source_config(cfg: TrainConfig):
    """The ModelConfig of --init-from / --init-from-hf (None when training from scratch), as a
    ConfigError when the source cannot be used."""
    try:
        return checkpoint.source_config(cfg.init_from, cfg.init_from_hf)
    except ValueError as e:  # ModelFileError, HFError
        raise ConfigError(f"cannot start from {source_option(cfg)}: {e}") from None


def source_option(cfg: TrainConfig) -> str:
    """--init-from RUN or --init-from-hf DIR, as given, for messages."""
    return f"--init-from {cfg.init_from}" if cfg.init_from else f"--init-from-hf {cfg.init_from_hf}"


# ----------------------------------------------------------------------------- the step


def train_step(engine, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], grad_accum: int) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches, minimising the mean loss over the step's
    trained tokens, all micro-batches and ranks together (with loss masks their number varies:
    no mean of means). DeepSpeed averages gradients over micro-batches and ranks, so each summed
    loss is scaled by world x accum / trained. Returns this rank's part of that mean x world (the
    mean over ranks is the step's loss) as a tensor, with no host sync. engine.step() applies the
    update only at the accumulation boundary. `batches`: TrainBatches (or any iterator of (x, y);
    its `masked` says whether targets may be -1)."""
    world_size = engine.dp_world_size
    micro = [next(batches) for _ in range(grad_accum)]
    trained = trained_targets(micro, getattr(batches, "masked", False), world_size)
    total = torch.zeros((), device=engine.device)
    for x, y in micro:
        _, loss = engine(x, y, reduction="sum")
        engine.backward(loss * (world_size * grad_accum / trained))
        engine.step()
        total += loss.detach().float()
    return total * world_size / trained


def trained_targets(micro: list[tuple[torch.Tensor, torch.Tensor]], masked: bool, world_size: int):
    """Targets trained on in one step, all ranks together: a number for plain text (every one),
    else the all-reduced count of targets that are not -1 (a tensor: no host sync)."""
    if not masked:
        return sum(y.numel() for _, y in micro) * world_size
    local = torch.stack([(y >= 0).sum() for _, y in micro]).sum().double()
    return world.all_reduce_sum(local).clamp(min=1)


@torch.no_grad()
def evaluate(engine, val: tuple[torch.Tensor, torch.Tensor], micro_batch: int,
             byte_lengths: torch.Tensor) -> tuple[float, float]:
    """(mean val loss per scored token, bits per byte) over all ranks' shares of the fixed val set
    `val` = (x, y) (every rank runs the same number of forward passes, which ZeRO-3 needs; targets
    -1 are not scored, as in training). Bits per byte divide the summed loss by the UTF-8 bytes of
    the scored tokens (`byte_lengths`: Tokenizer.byte_lengths), so they compare across tokenizers.
    A NaN or inf loss comes back as inf (diverged); nothing scored (every target masked) as NaN."""
    engine.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=engine.device)  # (summed loss, scored tokens, bytes)
    for x, y in zip(*(t.split(micro_batch) for t in val)):
        x, y = x.to(engine.device), y.to(engine.device)
        _, loss = engine(x, y, reduction="sum")
        scored = y >= 0
        nbytes = (byte_lengths[y.clamp(min=0)] * scored).sum()
        totals += torch.stack([loss.double(), scored.sum().double(), nbytes.double()])
    engine.train()
    world.all_reduce_sum(totals)
    if totals[1] == 0:
        return float("nan"), float("nan")
    if not torch.isfinite(totals[0]):
        return float("inf"), float("inf")
    return float(totals[0] / totals[1]), float(totals[0] / math.log(2) / totals[2])


# ----------------------------------------------------------------------------- fit


@contextmanager
def eager(engine):
    """The model runs uncompiled inside: evaluation and samples are a few forward passes in other
    modes and shapes (no grad, a last partial batch, a growing sample) that torch.compile would
    first compile anew: 24 s at the first evaluation on an H100 (gpu-check 'defaults'). `compile()`
    (build_engine) keeps the uncompiled call beside the compiled one; training's graphs stay."""
    module = engine.module
    compiled = getattr(module, "_compiled_call_impl", None)  # set by nn.Module.compile()
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


def fused_loss(ds: dict) -> bool:
    """Whether training takes the loss straight from the last hidden states, never the whole
    logits (GPT.fused_loss): on CPU, where at the seed shape in fp32 it trained 11% faster with 47%
    less peak memory (benchmarks/train_throughput.py --loss fused); on a GPU not before gpu-check has
    measured it there. Never at ZeRO-3, whose hooks gather lm_head's weight only inside lm_head's own call,
    nor in fp16, whose loss scale the gradients made in forward would not have (softmax values below
    6e-5 would lose bits as fp16 subnormals)."""
    return not torch.cuda.is_available() and ds_config.zero_stage(ds) != 3 and ds_config.precision(ds) != "fp16"


def build_engine(plan: Plan, model: GPT):
    model.fused_loss = fused_loss(plan.ds)
    if plan.cfg.compile if plan.cfg.compile is not None else torch.cuda.is_available():
        if ds_config.zero_stage(plan.ds) == 3:
            # ZeRO-3 gathers each layer's parameters in hooks that torch.compile cannot trace:
            # the graph breaks at every submodule and runs no faster (DeepSpeed #6719)
            world.print0("note: torch.compile is off at ZeRO stage 3 (DeepSpeed's parameter hooks break "
                         "the graph at every layer, so it would not run faster); stages 0-2 compile")
        else:
            model.compile()  # in place: parameter names (and so checkpoints) stay the same
    deepspeed = world.import_deepspeed()
    # DeepSpeed records "torch_autocast is on, in this dtype" in module globals that it never
    # clears: an engine built after an autocast one in the same process (tests, gpu-check's
    # configs) would reduce its gradients in the parameters' dtype, not its JSON's, and at ZeRO 1-3
    # after an fp16 one add a GradScaler. Each engine starts from its own JSON.
    from deepspeed.runtime import torch_autocast

    torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None
    with redirect_stdout(io.StringIO()):  # its bf16 optimizer print()s ~20 lines of memory reports
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.param_groups(), config=plan.ds)
    if engine.dp_world_size == 1 and ds_config.zero_stage(plan.ds) == 0:
        # one rank has nothing to average: skip DeepSpeed's all-reduce, which would still copy every
        # gradient into a flat buffer, scale it and copy it back (at ZeRO 1-3 the optimizer's
        # reduce also moves the gradients into its own buffers, so it stays)
        engine.enable_backward_allreduce = False
    sched = engine.lr_scheduler
    if type(sched).__name__ in ds_config.SCHEDULE_KEYS and sched.last_batch_iteration == -1:
        # DeepSpeed's Warmup* schedules start "before the first step" at lr 0 and take their first
        # point (warmup_min_ratio) only after it: two steps trained at lr 0, and the schedule ran a
        # step late. Taken now, step N trains at the schedule's point N - 1 (a resume loads its own).
        sched.step()
    monitor.count_scaler_skips(engine)  # zero0_fp16: train/skipped_steps, as DeepSpeed counts its own
    clip_as_pytorch(engine)
    return engine


def clip_as_pytorch(engine) -> None:
    """ZeRO-0 clips with PyTorch's clip_grad_norm_, as the plain loop does, and keeps the norm for
    train/grad_norm (DeepSpeed drops it; ZeRO 1-3 log theirs). DeepSpeed's own clip_grad_norm_
    launches a norm and a multiply per parameter and copies two new tensors from the host each
    step, which syncs the device twice (measured on an H200: 4 ms of a 28 ms step idle); PyTorch's
    runs foreach kernels on a GPU with no sync. At ZeRO-0 the gradients are already averaged over
    the ranks when the engine clips, so every rank's norm is the global one."""
    if engine.zero_optimization_stage() != 0 or engine.gradient_clipping() <= 0:
        return

    def clip_and_keep() -> None:
        engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(),
                                                                  engine.gradient_clipping())

    engine.clip_fp32_gradients = clip_and_keep


def resume(engine, plan: Plan, running: RunningLoss, train_samples: list[int]
           ) -> tuple[TrainState, int, list[int] | None]:
    """Everything a run continues from: load the checkpoint into the engine, restore this rank's
    RNG states and running train-loss mean, and find where the data order goes on; returns the
    training state, that global data position and each source's draws before it (None: the
    loader counts them). The data order continues on any number of ranks (see
    mtgpt.data.loader); RNG states are per rank and start afresh when the number of ranks
    changed. The warnings about what could not carry over are printed here. A fresh run:
    (TrainState(), 0, None)."""
    me = world.get()
    if plan.resume_from is None:
        return TrainState(), 0, None
    path = plan.resume_from
    if plan.universal:
        path = checkpoint.universal(path, is_writer=me.rank == 0)
        world.print0(f"world size changed: resuming through DeepSpeed's universal checkpoint {path}")
    state = TrainState.from_client_state(checkpoint.load_engine(engine, path))
    if (sched := engine.lr_scheduler) is not None:  # the optimizer's saved lr is the old plan's: the first step
        sched.step(sched.last_batch_iteration)     # resumed trains at this plan's point (a longer one re-warms)
    mine = state.of_rank(me.world_size, me.rank)
    if mine is None:  # saved by another number of ranks: per-rank state cannot carry over
        seed_all(plan.cfg.seed + me.rank + 7919 * state.step)
        world.print0(f"note: the RNG states were saved by {len(state.ranks)} rank(s) and now {me.world_size} "
                     "run, so dropout draws start afresh; the data order goes on where it was")
    else:
        set_rng_state(mine["rng"])
        running.load_state_dict(mine.get("loss"))
    if (scaler := monitor.grad_scaler(engine)) is not None and "grad_scaler" in state.ranks[0]:  # same on every rank
        scaler.load_state_dict(state.ranks[0]["grad_scaler"])
        scaler.skipped.fill_(state.ranks[0].get("grad_scaler_skipped", 0))
    position, counts = continue_data(state, plan, train_samples)
    make_history(engine, plan, state)
    best = Path(plan.cfg.out) / "best"
    if state.best_val < float("inf") and not (best / checkpoint.WEIGHTS).is_file():  # (after make_history's barrier)
        world.print0(f"note: the best val loss so far ({state.best_val:.4f}) is of weights that {best} does not "
                     "hold (another run's, or of saves set aside): best/ starts again at the next evaluation")
        state.best_val = float("inf")  # (best/ holds the weights of the best val loss, or there is none)
    return state, position, counts


def continue_data(state: TrainState, plan: Plan, train_samples: list[int]) -> tuple[int, list[int] | None]:
    """Where a resumed run's data order goes on (the global position, each source's draws before
    it), said when a source or the weights changed; with other sources or weights the val loss is
    another mean, so best/ and early stopping start again (`state` is changed)."""
    saved = state.ranks[0]["data"]  # the same on every rank
    names = [s.name for s in plan.sources]
    where = resume_position(saved, plan.cfg.seed, train_samples, plan.weights, names, plan.data_ids)
    if where is None:
        world.print0("warning: the data order was saved for another seed (or by an older mtgpt): it starts a new "
                     "shuffle now")
        where = (0, None, [])
    position, counts, fresh = where
    if fresh:
        new = [names[j] for j in fresh]
        world.print0(f"note: {', '.join(new)} {'is' if len(new) == 1 else 'are'} not the source(s) the run saved in "
                     f"{'its place' if len(new) == 1 else 'their places'} (added, replaced, or prepared again): "
                     f"{'it starts its' if len(new) == 1 else 'each starts its'} own shuffle"
                     + (", and the others go on where they were" if len(new) < len(names) else ""))
    elif len(plan.weights) > 1 and saved.get("weights") != plan.weights:
        world.print0(f"note: the mixture's weights were {', '.join(f'{w:.3g}' for w in saved['weights'])} and are "
                     f"{', '.join(f'{w:.3g}' for w in plan.weights)} now: each source goes on where it was in its "
                     "own shuffle, drawn at the new weights")
    # the val loss is the weighted mean over the sources' val sets: another mixture's, or another
    # --eval-samples', is another measure
    before = (rundir.saved_settings(plan.resume_from) or {}).get("eval_samples", plan.cfg.eval_samples)
    val_sizes = [m["splits"]["val"]["samples"] for m in plan.manifests]
    other_val = any(min(before, n) != min(plan.cfg.eval_samples, n) for n in val_sizes)
    other = ("weighs other sources or weights than" if fresh or saved.get("weights", [1.0]) != plan.weights else
             f"is measured on other val samples (--eval-samples {before} -> {plan.cfg.eval_samples}) than"
             if other_val else None)
    if other and state.best_val < float("inf"):
        world.print0(f"note: the val loss now {other} the best so far ({state.best_val:.4f}) did: best/ and early "
                     "stopping start again from this run's next evaluation")
        state.best_val = state.patience_best = float("inf")
        state.evals_since_best = 0
    return position, counts


def make_history(engine, plan: Plan, state: TrainState) -> None:
    """A run resumed from an older point than its newest saves continues from there: the later
    saves (a branch it left) are set aside, `latest` names the resumed checkpoint and the run's
    model.safetensors is the resumed weights again, so nothing of the left branch is taken for
    this one's (not by `--resume auto`, not by pruning, not by `mtgpt sample`)."""
    out = Path(plan.cfg.out)
    later = checkpoint.saves_after(out, state.step)  # every rank reads these before rank 0 moves
    # weights of a later step whose checkpoint was deleted, or cut short, count as later saves too
    ahead = {f: n for f in (out, out / "best") if (n := checkpoint.weights_step(f) or 0) > state.step}
    world.barrier()
    if not later and not ahead:
        return
    if world.is_rank0():
        moved, aside = checkpoint.set_aside_after(out, state.step)
        if aside is not None:  # (best/ too when it is of a later step: a torn last save leaves only that)
            best = [f"best/ of step {checkpoint.weights_step(aside / 'best')}"] if (aside / "best").is_dir() else []
            world.print0(f"resuming at step {state.step}, before this run's later saves "
                         f"({', '.join(moved + best)}): they are set aside in {aside}, and the run goes on from "
                         f"step {state.step}")
        if out in ahead and not moved:
            world.print0(f"note: the run's {checkpoint.WEIGHTS} is of step {ahead[out]}, whose checkpoint is gone "
                         f"or was cut short; it is written again with step {state.step}'s weights")
        tag = checkpoint.tag_for(state.step)
        if (out / checkpoint.CKPT_DIR / tag / checkpoint.COMPLETE).is_file():
            checkpoint.point_latest(out, tag)
    export(engine, plan, state, out)  # a collective under ZeRO-3
    world.barrier()


def matmul_precision(tf32: bool, device: torch.device) -> str | None:
    """torch's float32 matmul precision for a run on this device: on CUDA "high" (TF32) unless
    --no-tf32, "highest" with it; None elsewhere (CPU matmuls are left as they are)."""
    if device.type != "cuda":
        return None
    return "high" if tf32 else "highest"


def fit(plan: Plan, early_signals: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    """Train as planned; returns a summary (rank 0's numbers). `early_signals`: SIGINT/SIGTERM
    that came while the rank was starting (then it stops before the first step)."""
    clock = monitor.StartupClock()
    me = world.init()
    cfg = plan.cfg
    if (precision := matmul_precision(cfg.tf32, me.device)) is not None:
        torch.set_float32_matmul_precision(precision)
    flag = StopFlag(early_signals)
    data_dirs = [remote.local_copy(s.path, cfg.data_cache, me.rank, progress=world.is_rank0())
                 if remote.is_url(s.path) else Path(s.path) for s in plan.sources]
    try:
        plan = replace(plan, tok=tokenizer.for_folder(data_dirs[0], plan.manifest["tokenizer"]))  # the run's
    except tokenizer.TokenizerError as e:
        raise DataError(str(e)) from None
    seed_all(cfg.seed)  # the same initial weights on every rank
    model = GPT(cfg.model)
    if plan.resume_from is None and (cfg.init_from or cfg.init_from_hf):
        checkpoint.load_weights(model, checkpoint.source_weights(cfg.init_from, cfg.init_from_hf),
                                cfg.init_from or cfg.init_from_hf)
    engine = build_engine(plan, model)
    clock.mark("DeepSpeed initialize")
    seed_all(cfg.seed + me.rank)  # different dropout per rank
    running = RunningLoss(me.device)
    train_splits = [Split(d, m, "train", cfg.model.vocab_size) for d, m in zip(data_dirs, plan.manifests)]
    state, start, counts = resume(engine, plan, running, [len(s) for s in train_splits])
    reason = planned_stop(cfg, state, plan.train_tokens)
    if reason is None and cfg.max_time is not None and state.elapsed >= parse_duration(cfg.max_time):
        reason = "max_time"  # (its saved training time is the same on every rank)
    idle = reason is not None  # resumed a run that had already reached its stop
    stopped_early = not idle and agreed_stop(cfg, 0.0, flag, me.device) == "signal"  # Ctrl-C while starting
    if stopped_early:
        reason, idle = "signal", True
    if idle and plan.resume_from is not None and not (Path(cfg.out) / checkpoint.WEIGHTS).is_file():
        # a stopped run whose model.safetensors was deleted: a resume writes it again (every rank has
        # looked before rank 0 writes: the barrier waits for all, and a rank that saw it gets here too)
        world.barrier()
        export(engine, plan, state, Path(cfg.out))  # (a collective under ZeRO-3)
        world.print0(f"note: {Path(cfg.out) / checkpoint.WEIGHTS} was missing; written again from the checkpoint "
                     f"of step {state.step}")
    # the run's record (train_config.json, run_info.json): how it was trained, so a resume that
    # trains nothing leaves it alone; a new run writes it even so (`--resume auto` restarts from it)
    if world.is_rank0() and (not idle or plan.resume_from is None):
        rundir.write_run_files(cfg.out, cfg.to_dict(), plan.ds, plan.ds_name, plan.world_size, plan.val_samples,
                               plan.resume_from)
    batches = TrainBatches(train_splits, cfg.micro_batch, me.rank, me.world_size, cfg.seed, cfg.num_workers,
                           start=start, device=me.device, weights=plan.weights, counts=counts,
                           names=[s.name for s in plan.sources], ids=plan.data_ids)
    vals = {s.name: load_val(d, m, cfg.eval_samples, me.rank, me.world_size, cfg.model.vocab_size)
            for s, d, m in zip(plan.sources, data_dirs, plan.manifests)}
    # logs past the step it goes on from are dropped (a run started again from step 0: all of them)
    log = monitor.Monitor(cfg.out, enabled=world.is_rank0(), resume_step=state.step)
    clock.mark("data and resume")
    perf = monitor.Throughput(flops_per_token(cfg.model), me.device, me.world_size, ds_config.precision(plan.ds))
    drawn = counts if counts is not None else [w * start for w in plan.weights]  # samples read before
    world.print0(banner(plan, state.step, drawn))
    for warning in plan_warnings(plan, state.step, drawn):
        world.print0(warning, file=sys.stderr)
    bar = Progress(plan, state.step, state.elapsed)

    writes = BackgroundWrite()
    began = time.time() - state.elapsed
    if stopped_early:
        world.print0(f"stopped by {flag.signal or 'a signal'} on a rank before the first step: nothing was trained or "
                     "saved" + (f" (the run is as it was at step {state.step})" if plan.resume_from else ""))
    elif idle and reason == "max_steps" and cfg.max_steps < state.step:
        world.print0(f"nothing to train: the run is at step {state.step}, past --max-steps {cfg.max_steps}; to go on, "
                     f"give a --max-steps above {state.step}")
    elif idle:
        world.print0(f"nothing to train: the run had already stopped ({reason}) at step {state.step}; to go on, "
                     f"give {GO_ON[reason]}")
    try:  # however it ends (a diverged loss, a full disk), no writer thread or bar outlives fit
        while reason is None:
            lr = engine.get_lr()[0]  # the rate this step trains at (engine.step() moves the schedule on)
            running.add(train_step(engine, batches, cfg.grad_accum))
            if "first step" not in clock.phases:
                clock.mark("first step")
            state.step += 1
            state.tokens += plan.tokens_per_step
            perf.add(plan.tokens_per_step)
            state.elapsed = time.time() - began
            log_step = state.step % cfg.log_every == 0
            reason = planned_stop(cfg, state, plan.train_tokens)
            if reason is None and log_step:
                reason = agreed_stop(cfg, state.elapsed, flag, me.device)
            metrics: dict[str, float] = {}
            logged = log_step or reason is not None  # the last step is always logged and evaluated
            if logged:
                metrics.update(train_metrics(engine, running.take(), lr, state, cfg.out))
                metrics.update(data_metrics(plan, batches))
                metrics.update(perf.metrics())
                bar.show(state.step, metrics)
            evaluate_now = state.step % cfg.eval_every == 0 or reason
            if evaluate_now:
                speed = None if logged else perf.metrics()  # (the training's, in case this evaluation stops it)
                evaluated = time.time()
                with eager(engine):
                    metrics.update(evaluate_and_track(engine, vals, plan, state, log, writes))
                metrics["perf/eval_seconds"] = time.time() - evaluated  # what an evaluation costs every rank
                reason = reason or planned_stop(cfg, state, plan.train_tokens)  # early stopping
                if reason and not logged:  # it did: its last step is logged in full too
                    metrics.update({**train_metrics(engine, running.take(), lr, state, cfg.out),
                                    **data_metrics(plan, batches), **speed})
                    bar.show(state.step, metrics)
            log.log(metrics, state.step, evaluated=bool(evaluate_now))  # (redraws loss.png after an evaluation)
            if evaluate_now:
                perf.reset()  # tokens/s measures training, not the evaluation or its plot
            bar.update(1)
            if reason is None and state.step % cfg.save_every == 0:
                save(engine, plan, state, batches, running)
                perf.reset()
        bar.close()
        writes.wait()  # best/ is on disk before the final save and before fit returns
        if not idle:
            clock.last = time.time()
            save(engine, plan, state, batches, running)
            clock.mark("final save")
    finally:
        bar.close()
        writes.join()
        log.close()
    val_loss = monitor.last(log.history, "val/loss")
    if world.is_rank0():
        rundir.write_last_stop(cfg.out, reason=reason, step=state.step, tokens=state.tokens,
                               val_loss=_finite(val_loss), best_val=_finite(state.best_val), seconds=clock.phases)
    val_text = (f"val loss {val_loss:.4f}, best {state.best_val:.4f}, {monitor.last(log.history, 'val/bpb'):.4f} "
                "bits/byte" if has_val(vals) and math.isfinite(val_loss) else "not evaluated yet" if has_val(vals)
                else "no val split, so no val loss")
    best = (f"; the best val loss's: {Path(cfg.out) / 'best'} (sample, eval, chat, export take --best)"
            if reason == "early_stopping" and (Path(cfg.out) / "best" / checkpoint.WEIGHTS).is_file() else "")
    weights = Path(cfg.out) / checkpoint.WEIGHTS
    if not stopped_early:  # (that stop has said its one line)
        world.print0(f"stopped ({reason}) at step {state.step}, {state.tokens:,} tokens; {val_text}; "
                     + (f"model: {weights}{best}" if weights.is_file() else "no model saved"))
    world.print0(f"time: {clock.line()}")
    return {"step": state.step, "tokens": state.tokens, "val_loss": val_loss, "best_val": state.best_val,
            "reason": reason}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN or inf


GO_ON = {"max_steps": "a larger --max-steps", "max_tokens": "a larger --max-tokens", "max_time": "a larger --max-time",
         "max_epochs": "a larger --max-epochs (or --max-steps)",
         "early_stopping": "a larger --patience (its val loss had not improved for that many evaluations)"}


def banner(plan: Plan, step: int, drawn: list[float] | None = None) -> str:
    """What rank 0 prints before the first step."""
    cfg, ds = plan.cfg, plan.ds
    lines = [
        f"mtgpt {__version__}: {param_count(cfg.model):,} parameters ({cfg.model.n_layer} layers, "
        f"{cfg.model.n_head} heads, {cfg.model.n_embd} wide, context {cfg.model.block_size})",
        f"  {plan.world_size} rank(s) on {world.get().device.type}, {ds_config.shown(plan.ds_name)}"
        f"{' as the run saved it (its ds_config.json)' if plan.ds_own and ds_config.shown(plan.ds_name) == plan.ds_name else ''}: ZeRO-"
        f"{ds_config.zero_stage(ds)}, {ds_config.precision(ds)}",
        f"  batch {ds['train_batch_size']} sequences = micro {cfg.micro_batch} x accum {cfg.grad_accum} x "
        f"{plan.world_size} rank(s) = {plan.tokens_per_step:,} tokens/step; schedule {plan.schedule_steps} step{'s' if plan.schedule_steps != 1 else ''}",
        *data_lines(plan, step, drawn),
        f"  run {cfg.out}" + (f", resuming from {plan.resume_from} (step {step})" if plan.resume_from else ""),
    ]
    return "\n".join(lines)


def data_lines(plan: Plan, step: int = 0, drawn: list[float] | None = None) -> list[str]:
    """The banner's data: one line, or one per source of a mixture (weight, size, epochs planned:
    `Plan.epochs`)."""
    block = plan.cfg.model.block_size
    if len(plan.sources) == 1:
        return [f"  data {plan.sources[0].path}: {plan.train_tokens:,} train tokens"]
    lines = [f"  data: a mixture of {len(plan.sources)} sources, {plan.train_tokens:,} train tokens"]
    for source, w, m, epochs in zip(plan.sources, plan.weights, plan.manifests, plan.epochs(step, drawn)):
        lines.append(f"    {source.name} = {source.path}: weight {w:.3f}, {m['splits']['train']['samples'] * block:,} "
                     f"train tokens, read {epochs:.2f} times in {plan.schedule_steps} steps")
    return lines


class Progress:
    """Rank 0's progress: a tqdm bar on a terminal; where stderr is a file (nohup, a Slurm log) a
    plain line at a log step at most every LINE_EVERY seconds instead, so that a log shows the
    loss and the time left between evaluations. Other ranks show nothing."""

    LINE_EVERY = 30.0

    def __init__(self, plan: Plan, step: int, elapsed: float = 0.0):
        self.bar = tqdm(total=plan.schedule_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        disable=True if not world.is_rank0() else None)
        self.lines = world.is_rank0() and self.bar.disable
        self.total, self.first, self.began, self.last = plan.schedule_steps, step, time.time(), 0.0
        # --max-time: the training time left when this process started (`elapsed`: the run's before it)
        self.time_left = parse_duration(plan.cfg.max_time) - elapsed if plan.cfg.max_time else math.inf

    def show(self, step: int, metrics: dict[str, float]) -> None:
        """The numbers of a log step."""
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['perf/tokens_per_s']:.0f}")
        now = time.time()
        if self.lines and (now - self.last >= self.LINE_EVERY or step >= self.total):
            self.last = now
            left = min((now - self.began) / max(1, step - self.first) * max(0, self.total - step),
                       max(0.0, self.time_left - (now - self.began)))  # (--max-time stops it sooner)
            print(f"step {step}/{self.total}: loss {metrics['train/loss']:.4f}, lr {metrics['lr']:.2e}, "
                  f"{metrics['perf/tokens_per_s']:,.0f} tokens/s, {_duration(now - self.began)} elapsed, "
                  f"{_duration(left)} left", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def train_metrics(engine, loss: torch.Tensor, lr: float, state: TrainState, out: str) -> dict[str, float]:
    """The train/ scalars of a log step (this is where the host waits for the GPU), with the
    learning rate its step trained at; a NaN or inf loss, or in fp32 and bf16 gradient norm,
    raises TrainingDiverged."""
    train_loss = float(world.all_reduce_sum(loss.detach().clone()) / world.get().world_size)
    if not math.isfinite(train_loss):
        raise diverged("training loss", train_loss, state, out)
    metrics = {"train/loss": train_loss, "lr": lr, "train/tokens": state.tokens}
    norm = engine.get_global_grad_norm()
    if norm is not None:
        metrics["train/grad_norm"] = float(norm)
        fp16 = engine.fp16_enabled() or monitor.grad_scaler(engine) is not None  # (overflow skips are its way)
        if not fp16 and not math.isfinite(metrics["train/grad_norm"]):  # DeepSpeed's ZeRO skips such steps
            raise diverged("gradient norm", metrics["train/grad_norm"], state, out)  # in silence, lr frozen
    metrics.update(monitor.loss_scale_metrics(engine))
    return metrics


def data_metrics(plan: Plan, batches: TrainBatches) -> dict[str, float]:
    """data/NAME/tokens: tokens drawn from each source of a mixture so far, all ranks together."""
    if len(plan.sources) == 1:
        return {}
    return {f"data/{s.name}/tokens": n * plan.cfg.model.block_size for s, n in zip(plan.sources, batches.counts)}


def has_val(vals: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return any(len(x) for x, _ in vals.values())


def evaluate_sources(engine, vals: dict[str, tuple[torch.Tensor, torch.Tensor]], plan: Plan
                     ) -> tuple[float, float, dict[str, float]]:
    """(val loss, bits per byte, per-source metrics): one source's, or with a mixture the mean of
    the sources' weighted as they are drawn (over the sources that have a val split), and
    val/NAME/loss and val/NAME/bpb of each."""
    lengths = torch.as_tensor(plan.tok.byte_lengths, device=engine.device)
    scores = {name: evaluate(engine, val, plan.cfg.micro_batch, lengths) for name, val in vals.items() if len(val[0])}
    if len(vals) == 1:
        return *next(iter(scores.values())), {}
    weight = {s.name: w for s, w in zip(plan.sources, plan.weights) if s.name in scores}
    loss = sum(weight[n] * scores[n][0] for n in scores) / sum(weight.values())
    bpb = sum(weight[n] * scores[n][1] for n in scores) / sum(weight.values())
    per_source = {f"val/{n}/{k}": v for n, pair in scores.items() for k, v in zip(("loss", "bpb"), pair)}
    return loss, bpb, per_source


def evaluate_and_track(engine, vals: dict[str, tuple[torch.Tensor, torch.Tensor]], plan: Plan, state: TrainState,
                       log: monitor.Monitor, writes: BackgroundWrite | None = None) -> dict[str, float]:
    """Evaluate, update early stopping, export the best weights when the val loss improves
    (written by `writes` while training goes on, if given), and log a text sample and the loss
    plot. With no val split only the sample is logged."""
    if not has_val(vals):  # the same on every rank: the val splits are empty everywhere
        log.text("sample", eval_sample(engine, plan.tok, plan.cfg.seed + state.step), state.step)
        return {}
    loss, bpb, per_source = evaluate_sources(engine, vals, plan)
    if math.isinf(loss):  # diverged (evaluate's inf; the same on every rank: all-reduced)
        raise diverged("val loss", loss, state, plan.cfg.out)
    if loss < state.best_val:  # best/ holds the lowest val loss
        state.best_val = loss
        export(engine, plan, state, Path(plan.cfg.out) / "best", {"val_loss": str(loss)}, writes)
    if loss < state.patience_best - plan.cfg.min_delta:  # patience counts evaluations without a real gain
        state.patience_best, state.evals_since_best = loss, 0
    else:
        state.evals_since_best += 1
    text = eval_sample(engine, plan.tok, plan.cfg.seed + state.step)
    log.text("sample", text, state.step)
    each = "; " + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in per_source.items() if k.endswith("/loss"))
    world.print0(f"step {state.step}: val loss {loss:.4f} (best {state.best_val:.4f}), {bpb:.4f} bits/byte"
                 f"{each if per_source else ''}", file=sys.stderr)
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/bpb": bpb, **per_source}


@torch.no_grad()
def eval_sample(engine, tok: tokenizer.Tokenizer, seed: int, tokens: int = 48) -> str:
    """A short sample from the model being trained. Every rank generates the same tokens (same
    seed, a fixed length), so ZeRO-3's per-layer parameter gathers stay in step."""
    engine.eval()
    cfg = SampleConfig(max_new_tokens=tokens, temperature=0.8, top_k=200, seed=seed, stop_at_eot=False)
    text = generate(engine.module, tok, EVAL_PROMPT, cfg, decoder="dynamic")[0]  # no graph under ZeRO hooks
    engine.train()
    return text


class BackgroundWrite:
    """Rank 0's writes of best/ in a background thread, so that no rank waits for the disk: the
    weights are already a CPU copy when it starts. One write at a time (the next waits for the
    last); `wait()` finishes it and raises its error. fit waits before its final save and return."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, fn, *args) -> None:
        self.wait()

        def run() -> None:
            try:
                fn(*args)
            except BaseException as e:  # raised in the training thread by wait()
                self.error = e

        self.thread = threading.Thread(target=run, name="mtgpt-write-best")
        self.thread.start()

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def join(self) -> None:
        """Finish the write in progress, if any, and keep its error for `wait()`."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def export(engine, plan: Plan, state: TrainState, folder: Path, extra: dict[str, str] | None = None,
           writes: BackgroundWrite | None = None) -> None:
    """Consolidated fp32 safetensors + config.json (a collective under ZeRO-3; rank 0 writes,
    in `writes`'s thread if given)."""
    me = world.get()
    weights = checkpoint.gather_weights(engine.module, engine.zero_optimization_stage(), me.rank)
    if me.rank == 0:
        meta = {"step": str(state.step), "tokens": str(state.tokens), **(extra or {})}

        def write() -> None:
            try:
                checkpoint.save_weights(weights, plan.cfg.model, folder, meta, plan.tok)
            except OSError as e:  # a full disk: one line that says what it takes
                raise save_problem(folder, checkpoint.WEIGHTS, param_count(plan.cfg.model), e) or e

        if writes is not None:
            writes.submit(write)
        else:
            write()


def save(engine, plan: Plan, state: TrainState, batches: TrainBatches, running: RunningLoss) -> None:
    """DeepSpeed checkpoint on every rank; then rank 0 writes the consolidated model, marks the
    checkpoint COMPLETE, moves `latest` and prunes old tags. A crash before the marker leaves a
    torn folder that resume ignores. A NaN or inf train loss since the last log step raises
    TrainingDiverged before anything is written."""
    pending = float(world.all_reduce_sum(running.sum.detach().clone()))  # the train loss since the last log step
    if not math.isfinite(pending):  # never save weights that a NaN or inf loss trained
        raise diverged("training loss", pending, state, plan.cfg.out)
    tag = checkpoint.tag_for(state.step)
    root = Path(plan.cfg.out) / checkpoint.CKPT_DIR
    if world.is_rank0():  # a folder for this step from an older attempt is unmarked before rewriting
        (root / tag / checkpoint.COMPLETE).unlink(missing_ok=True)
    world.barrier()
    mine = {"data": batches.state_dict(), "loss": running.state_dict()}
    if (scaler := monitor.grad_scaler(engine)) is not None:
        mine["grad_scaler"] = scaler.state_dict()  # zero0_fp16's loss scale (DeepSpeed does not save it)
        mine["grad_scaler_skipped"] = int(scaler.skipped)
    client = state.client_state(mine)
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
        world.barrier()  # every rank's shard is on disk
        export(engine, plan, state, Path(plan.cfg.out))
    except SaveError:
        raise
    except (OSError, RuntimeError) as e:
        if (problem := save_problem(root, tag, param_count(plan.cfg.model), e)) is not None:
            raise problem from None
        raise
    if world.is_rank0():
        info = {"step": state.step, "tokens": state.tokens, "world_size": plan.world_size,
                "zero_stage": engine.zero_optimization_stage(), "precision": ds_config.precision(plan.ds)}
        checkpoint.mark_complete(plan.cfg.out, tag, info, keep_last=plan.cfg.keep_last)
    world.barrier()
