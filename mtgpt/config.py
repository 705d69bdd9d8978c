"""Configuration: dataclasses that validate themselves, and JSON load/dump.

`ModelConfig` is the shape of the network (it is also written next to every saved model).
`TrainConfig` is one training run: data, model, batch, schedule, stop conditions, checkpoints.
Batch size lives here and only here: `batch_size` (sequences per optimizer step, all ranks
together), `micro_batch` (sequences per rank per forward pass) and `grad_accum` (forward passes
per optimizer step), tied by `TrainConfig.for_world`. The DeepSpeed JSON is filled from them
(see `mtgpt.ds_config`). Every training option is declared here once, with `option(...)`: the
field, its help and its default are what `mtgpt train --help` shows and what
train_config.json holds (the CLI is built from these fields).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot work. The message says what is wrong and how to fix it."""


def option(default: Any = None, help: str = "", default_help: str | None = None, flag: str | None = None,
           **click: Any) -> Any:
    """A config field that is also a command-line option of `mtgpt train` (and of
    launch/train.py): the option, its help and the default it shows are declared here, once;
    the CLI is built from them (mtgpt.cli). `default_help` says the default in words where the
    value alone would not; `flag` names a --x/--no-x pair; other keys go to click.option."""
    meta = {"help": help, "default_help": default_help, "flag": flag, "click": click}
    if isinstance(default, type):  # e.g. list: a fresh empty one for each config
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


MAX_SEED = 2**32 - 1  # PyTorch's CPU generator keeps the low 32 bits of a seed: 2**32 + s draws what s draws


def seed_problem(seed: int | None) -> str | None:
    """What is wrong with a seed (None: nothing). Every --seed (prepare, train, sample, chat) and
    `mtgpt serve`'s requests take 0..MAX_SEED, so that two seeds never give one result."""
    if seed is None or 0 <= seed <= MAX_SEED:
        return None
    return f"must be between 0 and {MAX_SEED} (2**32 - 1: the seeds PyTorch's generator tells apart), got {seed}"


@dataclass
class ModelConfig:
    vocab_size: int = 50257  # the tokenizer's: GPT-2's by default, a run's is its data's (last id: <|endoftext|>)
    block_size: int = option(512, "Context length in tokens.", default_help="the data's block size")
    n_layer: int = option(6, "Transformer blocks.")
    n_head: int = option(6, "Attention heads per block; must divide --n-embd.")
    n_embd: int = option(384, "Model width (the residual stream).")
    dropout: float = option(0.0, "Dropout on embeddings, attention and residual branches (0 for pretraining).")
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 (needed for a 1:1 HF export)
    vocab_multiple: int | None = option(
        None, "Round the embedding and output rows up to a multiple of this (as nanoGPT's 50304): the output "
        "layer, most of a small model's FLOPs, then fits GPU tensor cores. The extra rows are never scored "
        "or sampled, and saved models and Hugging Face exports have exactly the vocabulary's rows.",
        default_help="64 on a GPU, 1 on a CPU (no gain there); a resumed run keeps its own")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"n_head={self.n_head} does not divide n_embd={self.n_embd}: pick n_embd a multiple "
                f"of n_head (e.g. --n-embd {self.n_head * max(1, round(self.n_embd / self.n_head))})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.vocab_multiple is not None and (not isinstance(self.vocab_multiple, int) or self.vocab_multiple < 1):
            raise ConfigError(f"vocab_multiple must be a positive integer, got {self.vocab_multiple!r}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding / output layer: vocab_size rounded up to vocab_multiple (None: 1)."""
        m = self.vocab_multiple or 1
        return -(-self.vocab_size // m) * m

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d, "model config")

    def shape(self) -> dict[str, int]:
        """The fields that fix the saved weights (dropout may change between runs, these not; the
        vocabulary padding is not saved in model.safetensors, see `padded_vocab_size`)."""
        return {k: getattr(self, k) for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}


RESUME_HELP = ("auto (the checkpoint `latest` names in --out, or start fresh), never, or a run or "
               "checkpoint folder")


LAUNCHER_RANKS = "the launcher's --nproc_per_node {n} (torchrun) or --num_gpus {n} (deepspeed)"  # not mtgpt train's


@dataclass
class TrainConfig:
    data: list[str] = option(
        list, "Data folder written by `mtgpt prepare`, or its URL: http(s)://HOST/PATH, or pipe:COMMAND that "
        "writes the file named {shard} to stdout (e.g. 'pipe:aws s3 cp s3://b/data/{shard} -'). Repeat it for a "
        "mixture, each as [NAME=]DATA[:WEIGHT] (e.g. --data books=data/books:0.7 --data chat=data/chat:0.3; NAME "
        "of letters, digits, _ . -); "
        "without weights the sources are mixed in proportion to their train tokens.",
        default_help="", multiple=True)
    data_cache: str | None = option(None, "Where the shards of a --data URL are copied (fetched once, then read "
                                    "locally).", default_help="$XDG_CACHE_HOME/mtgpt/data, else ~/.cache/mtgpt/data")
    out: str = option("", "Run folder: checkpoints, model.safetensors, tb/, metrics.jsonl.", default_help="")
    model: ModelConfig = field(default_factory=ModelConfig)  # its options are listed here, in its place
    ds_config: str | None = option(None, "DeepSpeed JSON: a path or a bundled name (zero0..3 x fp32/bf16/fp16, "
                                   "e.g. zero2_bf16).", default_help="zero0_bf16 on a GPU (autocast), zero1_fp32 on CPU; a resumed run keeps its own",
                                   aliases=["--ds_config", "--deepspeed_config"])
    batch_size: int | None = option(None, "Sequences per optimizer step, all ranks together. --grad-accum is "
                                    "derived from it, so 1 or 8 GPUs, or a resume on another number of ranks, train "
                                    "with the same batch, schedule and learning rate.",
                                    default_help="micro-batch x grad-accum x ranks; a resumed run keeps its own")
    micro_batch: int | None = option(None, "Sequences per rank per forward pass.",
                                     default_help="8 on CPU; on a GPU as many as fit half its memory, up to "
                                     "32,768 tokens per pass")
    grad_accum: int = option(1, "Forward passes per optimizer step; batch = micro x accum x ranks.",
                             default_help="1, or --batch-size / (micro-batch x ranks)")
    lr: float = option(6e-4, "Peak learning rate after warmup (benchmarks/lr_sweep.py; MyTalkGPT's original 5e-5 is too low "
                          "to train from scratch).")
    min_lr_ratio: float = option(0.1, "The cosine ends at --lr x this.")
    warmup_steps: int | None = option(None, "Linear warmup steps W up to --lr: step N trains at N/(W+1) of it "
                                      "(DeepSpeed's schedule takes at least 2).", default_help="5% of the schedule")
    max_steps: int | None = option(None, "Stop after N optimizer steps (also the cosine schedule's length).")
    max_tokens: int | None = option(None, "Stop after N training tokens (all ranks together).")
    max_epochs: float | None = option(None, "Stop after N passes over the train split.",
                                      default_help="1 if no --max-steps or --max-tokens")
    max_time: str | None = option(None, "Stop cleanly (with a checkpoint) after this long: 90s, 30m, 2h, 1d, 1:30:00; "
                                  "checked at each --log-every step. It plans no schedule: the other limits do (alone, "
                                  "one epoch).")
    patience: int | None = option(None, "Early stopping: evaluations without a better val loss.", default_help="off")
    min_delta: float = option(0.0, "Early stopping: an improvement is a val loss below best - this.")
    eval_every: int | None = option(None, "Evaluate the val loss every N steps (and at the end).",
                                    default_help="200 on CPU, 1000 on a GPU")
    eval_samples: int = option(256, "Val sequences per evaluation (the same ones every time; with a mixture, "
                               "per source).")
    save_every: int = option(1000, "Checkpoint every N steps (and at the end).")
    keep_last: int = option(2, "Checkpoints kept (besides best/).")
    log_every: int = option(10, "Log the train loss and lr every N steps.")
    resume: str = option("never", RESUME_HELP + "; the run keeps its own settings, options given here replace "
                         "them.")
    seed: int = option(1337, "Seed for init, data order, dropout.")
    num_workers: int = option(0, "DataLoader worker processes per rank (0: load in the training process).")
    compile: bool | None = option(None, "torch.compile the model.", default_help="on GPUs", flag="--compile/--no-compile")
    tf32: bool = option(True, "On CUDA GPUs, fp32 matmuls use TF32 tensor cores (Ampere and newer; about "
                        "8x faster, 10-bit mantissa inputs, fp32 accumulation).", default_help="on",
                        flag="--tf32/--no-tf32")
    init_from: str | None = option(None, "Start from the weights of an mtgpt run (fine-tune it).")
    init_from_hf: str | None = option(None, "Start from a GPT-2-shaped Hugging Face folder.")

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if isinstance(self.data, str):  # one source (train_config.json of an older mtgpt)
            self.data = [self.data] if self.data else []
        self.data = list(self.data)
        if self.data:
            data_sources(self.data)  # the syntax is checked here, once
        for name in ("micro_batch", "grad_accum", "eval_every", "eval_samples", "save_every",
                     "log_every", "keep_last"):
            value = getattr(self, name)
            if value is None and name in ("micro_batch", "eval_every"):
                continue  # chosen for the device by train.make_plan
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "min_lr_ratio", "max_epochs", "min_delta"):  # (inf and nan pass a comparison's check)
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be a positive integer, got {self.max_steps}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 1:
            raise ConfigError(f"warmup_steps must be >= 1, got {self.warmup_steps} (DeepSpeed's WarmupCosineLR warms "
                              "up over at least 2 steps: the first trains at a third of --lr, the second at two thirds)")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if not self.resume:
            raise ConfigError(f"resume must be {RESUME_HELP}")
        # folders as paths without `..` after a name: runs/nope/../x is runs/x, which the checks of
        # an existing run see (they had looked at the missing runs/nope and let it be trained over)
        self.out = os.path.normpath(self.out) if self.out else self.out
        self.resume = self.resume if self.resume in ("auto", "never") else os.path.normpath(self.resume)
        for name in ("max_tokens", "patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise ConfigError(f"max_epochs must be positive, got {self.max_epochs}")
        if self.max_time is not None:
            parse_duration(self.max_time)
        if self.init_from and self.init_from_hf:
            raise ConfigError("give --init-from or --init-from-hf, not both")
        if self.min_delta < 0:
            raise ConfigError(f"min_delta must be >= 0, got {self.min_delta}")
        if self.min_delta > 0 and self.patience is None:  # (it would do nothing, silently)
            raise ConfigError("--min-delta is early stopping's and needs --patience N (evaluations without a "
                              "better val loss); give --patience too, or leave --min-delta out")
        if (problem := seed_problem(self.seed)) is not None:
            raise ConfigError(f"seed {problem}")

    def for_world(self, world_size: int, resumed: bool = False, ranks: str = "--nproc {n}") -> "TrainConfig":
        """This run on `world_size` ranks, its batch settled: with --batch-size, --grad-accum is
        derived from it (refused, with the nearest sizes that work, when it does not divide);
        without, the batch is micro-batch x grad-accum x ranks and is recorded as --batch-size.
        `resumed`: the batch is the one a resumed run keeps (the messages say so). `ranks`: how
        the user asks for n ranks (`mtgpt train`'s --nproc; LAUNCHER_RANKS under another launcher)."""
        per_pass = self.micro_batch * world_size
        if self.batch_size is None:
            return self.replace(batch_size=per_pass * self.grad_accum)
        accum, left = divmod(self.batch_size, per_pass)
        batch = (f"the resumed run's batch of {self.batch_size} sequences per step (kept so that its schedule and "
                 "learning rate stay the same)" if resumed else f"--batch-size {self.batch_size}")
        if left or not accum:
            near = " or ".join(map(str, sorted({max(1, accum) * per_pass, (accum + 1) * per_pass})))
            counts = sorted((r for r in range(1, 2 * world_size + 1) if r != world_size and
                             self.batch_size % (self.micro_batch * r) == 0), key=lambda r: abs(r - world_size))
            on = f" (or run on {counts[0]} rank(s): {ranks.format(n=counts[0])})" if counts else ""
            micro = max((m for m in range(1, self.micro_batch) if self.batch_size % (m * world_size) == 0), default=None)
            if not counts and micro is None:  # only fewer ranks can: one always can, with a micro-batch that divides it
                one = max(m for m in range(1, self.micro_batch + 1) if self.batch_size % m == 0)
                on = f" (or run on 1 rank with --micro-batch {one}: {ranks.format(n=1)})"
            fix = (f"resume with a --micro-batch and number of ranks whose product divides {self.batch_size}{on}, or "
                   f"give --batch-size {near} to change the run's batch" if resumed else
                   f"use --batch-size {near}" + (f", or --micro-batch {micro}" if micro else "") + on)
            raise ConfigError(f"{batch} is not a multiple of micro-batch {self.micro_batch} x {world_size} rank(s) = "
                              f"{per_pass}: {fix}")
        if self.grad_accum not in (1, accum):
            raise ConfigError(f"--grad-accum {self.grad_accum} disagrees with {batch} = micro-batch {self.micro_batch} "
                              f"x {world_size} rank(s) x {accum}: leave out --grad-accum, it is derived from "
                              f"{'the batch' if resumed else '--batch-size'}")
        return self.replace(grad_accum=accum)

    @property
    def sources(self) -> list["DataSource"]:
        """--data, parsed: one DataSource per source of the mixture."""
        return data_sources(self.data)

    def tokens_per_step(self, world_size: int) -> int:
        """Training tokens per optimizer step, all ranks together (the one batch-size formula)."""
        return self.micro_batch * self.grad_accum * world_size * self.model.block_size

    @property
    def epoch_limit(self) -> float | None:
        """Passes over the train split to stop after: --max-epochs, or 1 when neither --max-steps
        nor --max-tokens is given (--max-time plans no schedule: a cosine needs a length)."""
        return self.max_epochs or (None if (self.max_steps or self.max_tokens) else 1.0)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d, "train config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (validated again). `model` may be a dict of changes."""
        model = changes.pop("model", None)
        if isinstance(model, dict):
            model = dataclasses.replace(self.model, **model)
        if model is not None:
            changes["model"] = model
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DataSource:
    """One source of the training data: a name (for logs and metrics), a data folder or URL, and
    its weight in the mixture (None: in proportion to its train tokens)."""

    name: str
    path: str
    weight: float | None = None


_NAME = re.compile(r"^([\w.-]+)=(.+)$")  # (\w: letters of any script, digits, _)
_WEIGHT = re.compile(r"^(.*):([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|[-+]?(?:nan|inf|infinity))$", re.IGNORECASE)
# (signed, nan, inf: :-1 or :nan is a bad weight, not part of a path)
_HOST = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/:]*$")  # http://host:8000 ends in a port, not a weight


def data_sources(specs: list[str]) -> list[DataSource]:
    """--data values -> DataSources. Each is [NAME=]DATA[:WEIGHT]: DATA that is an existing path
    as a whole is that path (a folder may be named ver:2); NAME defaults to the folder's name
    (`.` is the current folder's) or the URL's last part, WEIGHT to none. Names must differ;
    weights are given for all sources or for none, and are positive and finite (any scale: 7 and
    3 are 0.7 and 0.3). A folder is given once (compared resolved; a URL as written)."""
    out, where = [], []
    for i, spec in enumerate(specs):
        name, rest = (m.group(1), m.group(2)) if (m := _NAME.match(spec)) else (None, spec)
        weight = None
        if not os.path.exists(rest) and (m := _WEIGHT.match(rest)) and not _HOST.match(m.group(1)):
            rest, weight = m.group(1), float(m.group(2))
            if not (weight > 0 and math.isfinite(weight)):
                raise ConfigError(f"--data {spec}: the weight must be a positive finite number, got {m.group(2)}")
        if not rest.strip():
            raise ConfigError(f"--data {spec!r}: no data folder given")
        if not os.path.exists(rest):  # a NAME or a WEIGHT mistyped would read as part of a missing path
            bad_name = name is None and "=" in rest and any(os.path.exists(s.split("=", 1)[1]) for s in (spec, rest))
            if bad_name:
                raise ConfigError(f"--data {spec}: the source's name {spec.split('=', 1)[0]!r} may have only letters, "
                                  "digits, _, . and - (e.g. --data books=data/books:0.7)")
            if weight is None and ":" in rest and os.path.exists(rest.rsplit(":", 1)[0]):
                raise ConfigError(f"--data {spec}: the weight {rest.rsplit(':', 1)[1]!r} is not a number "
                                  "(e.g. --data books=data/books:0.7)")
        if (scheme := re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", rest)) and scheme.group(1) not in ("http", "https"):
            raise ConfigError(f"--data {spec}: mtgpt reads data folders at http(s):// URLs, or through a pipe: command "
                              f"that writes file {{shard}} to stdout, not {scheme.group(1)}:// (e.g. --data "
                              "'pipe:aws s3 cp s3://bucket/data/{shard} -')")
        if name is None and rest.startswith("pipe:"):
            name = f"data{i}"
        elif name is None:  # (a local path made absolute first: `.` and `..` are named after the folder)
            last = rest.rstrip("/").rsplit("/", 1)[-1] if scheme else os.path.basename(os.path.abspath(rest))
            name = re.sub(r"[^\w.-]+", "_", last).strip("_") or f"data{i}"
        out.append(DataSource(name, rest, weight))
        where.append(rest if scheme or rest.startswith("pipe:") else os.path.realpath(rest))
        if where[-1] in where[:-1]:
            raise ConfigError(f"--data {specs[where.index(where[-1])]} and --data {spec} are the same data folder "
                              f"({where[-1]}); give it once, with the weight you want")
    names = [s.name for s in out]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"two --data sources are named {twice!r}: name them, e.g. --data {twice}_a=DATA_A:0.5 "
                          f"--data {twice}_b=DATA_B:0.5")
    if len(out) > 1 and len({s.weight is None for s in out}) > 1:
        raise ConfigError("give a weight to every --data source (e.g. --data books=data/books:0.7 --data "
                          "chat=data/chat:0.3), or to none (then each weighs its train tokens)")
    return out


def parse_duration(text: str | int | float) -> float:
    """Seconds from "90", "90s", "30m", "2h", "1d", "MM:SS" or "HH:MM:SS" (Slurm's style)."""
    s = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if ":" in s:
            parts = [float(p) for p in s.split(":")]
            if len(parts) > 3 or any(not 0 <= p < 60 for p in parts[1:]):  # (1:99 is no time of day)
                raise ValueError
            seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        elif s and s[-1] in units:
            seconds = float(s[:-1]) * units[s[-1]]
        else:
            seconds = float(s)
    except ValueError:
        raise ConfigError(f"max_time {text!r} is not a duration; write e.g. 90s, 30m, 2h, 1d or 1:30:00") from None
    if not (seconds > 0 and math.isfinite(seconds)):  # (nan and inf parse as floats)
        raise ConfigError(f"max_time must be a positive, finite duration, got {text!r}")
    return seconds


_JSON_TYPES = {  # a field's annotation (a string) -> (the JSON values it takes, said in words)
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[str]": (lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v),
                  "a list of strings"),
    "ModelConfig": (lambda v: isinstance(v, (dict, ModelConfig)), "an object"),
}


def _from_dict(cls, d: dict[str, Any], what: str):
    """`cls` from a JSON object: unknown keys and values of the wrong JSON type are refused (a
    number or true/false in quotes, e.g. "compile": "false", would otherwise be taken as true,
    or fail deep inside with a TypeError)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {what}: {', '.join(unknown)}; "
                          f"known keys are: {', '.join(sorted(known))}")
    for f in fields(cls):
        kinds = f.type.split(" | ")
        if f.name not in d or d[f.name] is None and "None" in kinds:
            continue
        takes, words = _JSON_TYPES[kinds[0]]
        if not takes(d[f.name]):
            value = d[f.name]
            quoted = isinstance(value, str) and value.strip().lower() in ("true", "false", "null") or \
                isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?\s*", value, re.I)
            raise ConfigError(f"{what}: {f.name} must be {words}{', or null' if 'None' in kinds else ''}, got "
                              f"{json.dumps(value)}" + ("; write it without the quotes" if quoted else ""))
    return cls(**d)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if twice := sorted({k for k in keys if keys.count(k) > 1}):
        raise ConfigError(f"the key {', '.join(map(repr, twice))} is given twice in one object; keep one")
    return dict(pairs)


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object; a missing file, bad JSON or a key given twice in one object (which
    json.loads would settle silently by taking the last; DeepSpeed refuses it) is a ConfigError
    naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # (a byte-order mark, as some editors write, is dropped)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a JSON file") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}): mtgpt reads strict JSON (no comments, no trailing "
                          "commas)") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def dump_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
