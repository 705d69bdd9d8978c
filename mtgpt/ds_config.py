"""The DeepSpeed JSON: find it, fill its "auto" values from the mtgpt config, refuse conflicts.

mtgpt's options are the one source of batch size, learning rate and schedule length. The JSONs in
ds_configs/ say "auto" for those keys and mtgpt fills them in:

    train_micro_batch_size_per_gpu = micro_batch
    gradient_accumulation_steps    = grad_accum
    train_batch_size               = micro_batch * grad_accum * world_size
    optimizer.params.lr            = lr
    scheduler.params.*             = warmup_steps, schedule steps, min_lr_ratio (DeepSpeed's Warmup*
                                     schedulers; another one, e.g. OneCycle, keeps the JSON's numbers)

A JSON may also state those numbers; then they must agree with mtgpt's, or the run is refused
before any process starts, with a message naming the number to change. Everything else
(ZeRO stage, precision, AdamW betas and weight decay, gradient clipping) belongs to the JSON.

Two defaults differ from DeepSpeed's, both because they make the host wait for the GPU: its
throughput timer (on unless a JSON says otherwise) synchronizes the device twice per micro-step,
so it is off unless the JSON has a "timers" block; and in bf16 its overflow check
(`bf16.check_grad_overflow`, on by default since DeepSpeed PR #6976) scans every gradient and reads
the result back at each step of ZeRO 1-2, so it is off unless the JSON's bf16 block asks for it.
bf16 has fp32's range: a bf16 run then treats a non-finite loss as an fp32 run always did (mtgpt
stops at the next log step, and no checkpoint holds a non-finite step).
Precision is the JSON's in one of two ways: DeepSpeed's bf16/fp16 blocks (bf16/fp16 weights, fp32
masters inside its optimizer; its fp16 needs a GPU), or its torch_autocast block (fp32 weights,
matmuls in the block's dtype, which must be given; zero0_bf16 and zero0_fp16). Not both.
Top-level keys that start with "_" (e.g. "_comment") are notes for people and are dropped.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from mtgpt import folders
from mtgpt.config import ConfigError, TrainConfig, load_json
from mtgpt.world import import_deepspeed

# Top-level keys of DeepSpeed's config (https://www.deepspeed.ai/docs/config-json/); merged at
# run time with the names DeepSpeed's own constants module knows.
DS_TOP_LEVEL_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "zero_optimization",
    "gradient_clipping", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "communication_data_type", "seq_parallel_communication_data_type", "data_types",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "timers",
    "tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler", "comms_logger",
    "activation_checkpointing", "aio", "autotuning", "elasticity", "checkpoint", "data_efficiency",
    "curriculum_learning", "compression_training", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "disable_allgather", "compile", "nebula", "pipeline",
    "hybrid_engine", "tensor_parallel", "eigenvalue", "progressive_layer_drop", "quantize_training",
    "sparse_attention", "use_node_local_storage", "load_universal_checkpoint", "graph_harvesting",
    "dataloader_drop_last", "seed", "sequence_parallel_size", "weight_quantization",
    "gradient_allreduce_op", "zenflow", "mics_shard_size",
}

def bundled_dir():
    """ds_configs/: installed inside the package as mtgpt/ds_configs (setup.py maps it there);
    in an editable install it is the checkout's top-level folder."""
    try:
        return resources.files("mtgpt.ds_configs")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "ds_configs"


def bundled_names() -> list[str]:
    return sorted(p.name[:-5] for p in bundled_dir().iterdir() if p.name.endswith(".json"))


def default_name(cuda: bool, bf16_ok: bool) -> str:
    """zero1_fp32 on CPU; on a GPU zero0_bf16 (zero0_fp16 without bf16): PyTorch's autocast recipe,
    whose step never waits for the GPU (DeepSpeed's ZeRO 1-3 optimizers read the gradient norm
    back at every step); a model too large to hold its optimizer state on every GPU takes zero1-3."""
    if not cuda:
        return "zero1_fp32"
    return "zero0_bf16" if bf16_ok else "zero0_fp16"


def find(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """A path to a JSON file, or the name of a bundled config ("zero2_bf16" or "zero2_bf16.json").
    A run's own ds_config.json (the dict it trained with) comes back `unresolved`, so that it can
    be resolved again for another schedule or number of ranks."""
    path = Path(name_or_path)
    if path.is_file():
        raw = load_json(path)
        return str(path), unresolved(raw) if folders.is_run_ds_config(path) else raw
    if path.is_dir():
        raise ConfigError(f"DeepSpeed config {name_or_path} is a folder; give a JSON file in it, or one of the "
                          f"bundled configs ({', '.join(bundled_names())})")
    name = path.name[:-5] if path.name.endswith(".json") else path.name
    if str(path.parent) in (".", "ds_configs"):  # (launch/train.py's examples name ds_configs/NAME.json)
        bundled = bundled_dir() / f"{name}.json"
        if bundled.is_file():  # named by its name: a ds_configs/ folder of the user's is not what was read
            return name, json.loads(bundled.read_text())
    raise ConfigError(f"DeepSpeed config {name_or_path}: no such file, and not one of the bundled "
                      f"configs ({', '.join(bundled_names())})")


def shown(name: str) -> str:
    """A config's name for people: a file by its path, a bundled one by its name and where it is
    from (also as older runs recorded it, "ds_configs/zero1_fp32.json", no path after a pip install)."""
    path = Path(name)
    if str(path.parent) in (".", "ds_configs") and not path.is_file() and \
            (bundled_dir() / f"{path.name.removesuffix('.json')}.json").is_file():
        return f"{path.name.removesuffix('.json')} (bundled with mtgpt)"
    return name


def _known_keys() -> set[str]:
    keys = set(DS_TOP_LEVEL_KEYS)
    import_deepspeed()
    import deepspeed.runtime.constants as ds_constants

    return keys | {v for k, v in vars(ds_constants).items() if k.isupper() and isinstance(v, str)}


def _enabled(block: Any) -> bool:
    return isinstance(block, dict) and bool(block.get("enabled", False))


def zero_stage(ds: dict[str, Any]) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


AUTOCAST_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "bfloat": "bf16", "float16": "fp16", "fp16": "fp16",
                   "half": "fp16"}  # the names DeepSpeed's DtypeEnum takes (with or without "torch.")


def autocast(ds: dict[str, Any]) -> bool:
    """Whether the JSON trains through DeepSpeed's torch_autocast: fp32 weights, matmuls in the
    autocast dtype (zero0_bf16 and zero0_fp16 do)."""
    return _enabled(ds.get("torch_autocast"))


def precision(ds: dict[str, Any]) -> str:
    """The precision the model computes in: "bf16", "fp16" or "fp32" (from DeepSpeed's bf16 or
    fp16 block, or from torch_autocast's dtype)."""
    if _enabled(ds.get("bf16")) or _enabled(ds.get("bfloat16")):
        return "bf16"
    if _enabled(ds.get("fp16")):
        return "fp16"
    if autocast(ds):
        return AUTOCAST_DTYPES.get(str(ds["torch_autocast"].get("dtype")).removeprefix("torch."), "fp32")
    return "fp32"


def weights_dtype(ds: dict[str, Any]) -> str:
    """The dtype of the model's parameters under this JSON: DeepSpeed's bf16/fp16 blocks make
    them bf16/fp16 (with fp32 masters in the optimizer); fp32 and torch_autocast keep them fp32.
    A checkpoint can only be resumed under a JSON with the same."""
    return "fp32" if autocast(ds) else precision(ds)


def _number(block: dict[str, Any], key: str, where: str, name: str) -> None:
    """Refuse a value of block[key] that is neither "auto" nor a number ("1e-3", "16", true)."""
    have = block.get(key, "auto")
    if have != "auto" and (isinstance(have, bool) or not isinstance(have, (int, float))):
        raise ConfigError(f"{name}: {where}{key} is {have!r}; it must be a number (1e-3, not \"1e-3\") or \"auto\" "
                          "(mtgpt fills it in)")


def _fill(block: dict[str, Any], key: str, value: Any, where: str, source: str, fix: str,
          name: str, clashes: list[tuple[str, str]]) -> None:
    """Set block[key] to value when absent or "auto"; a different number is added to `clashes`
    (what it says, the option that would match it), so that one error names them all."""
    _number(block, key, where, name)
    have = block.get(key, "auto")
    if have == "auto":
        block[key] = value
    elif abs(have - value) > 1e-12 * max(1.0, abs(value)):
        clashes.append((f"{where}{key} is {have!r} but mtgpt's {source} is {value} (as given, or its default)", fix))


def _refuse_clashes(clashes: list[tuple[str, str]], name: str) -> None:
    if clashes:
        fixes = " ".join(fix.removeprefix("pass ") for _, fix in clashes)
        raise ConfigError(f"{name}: {'; '.join(what for what, _ in clashes)}. Set "
                          f"{'it' if len(clashes) == 1 else 'them'} to \"auto\" in the JSON (mtgpt fills "
                          f"{'it' if len(clashes) == 1 else 'them'} in), or pass {fixes}.")


def warmup_default(schedule_steps: int) -> int:
    """5% of the schedule (at least one step)."""
    return max(1, schedule_steps // 20)


def first_warmup_ratio(warmup: int) -> float:
    """The fraction of --lr the warmup starts from ("auto" warmup_min_ratio). DeepSpeed's Warmup*
    schedules warm up over W = max(2, warmup) steps, from the start ratio m to 1, and mtgpt's step N
    trains at their point N - 1 (train.build_engine): m + (1 - m)(N - 1)/W. With m = 1/(W + 1) that is
    N/(W + 1), nanoGPT's warmup: the first step trains at --lr/(W + 1), not at 0 (a 1-step run had
    learned nothing, whatever its --lr)."""
    return 1 / (max(2, warmup) + 1)


MIN_LR_RATIO = TrainConfig.__dataclass_fields__["min_lr_ratio"].default  # (another given: the schedule must take it)
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
SCHEDULE_KEYS = {  # what mtgpt fills in each of DeepSpeed's Warmup* schedulers (others keep the JSON's numbers)
    "WarmupLR": ("warmup_num_steps", "warmup_max_lr"),
    "WarmupDecayLR": ("warmup_num_steps", "total_num_steps", "warmup_max_lr"),
    "WarmupCosineLR": ("warmup_num_steps", "total_num_steps", "cos_min_ratio"),
}


def unresolved(ds: dict[str, Any]) -> dict[str, Any]:
    """A resolved dict (a run's ds_config.json) as a JSON to resolve again: mtgpt's numbers (batch,
    learning rate, a Warmup* schedule) back to "auto", and the universal-checkpoint flag that
    mtgpt sets for one resume on another number of ranks dropped. Everything else is the run's."""
    ds = copy.deepcopy(ds)
    for key in BATCH_KEYS:
        ds[key] = "auto"
    if isinstance(ds.get("optimizer"), dict) and isinstance(ds["optimizer"].get("params"), dict):
        ds["optimizer"]["params"]["lr"] = "auto"
    sched = ds.get("scheduler")
    if isinstance(sched, dict) and sched.get("type") in SCHEDULE_KEYS and isinstance(sched.get("params"), dict):
        sched["params"].update(dict.fromkeys(SCHEDULE_KEYS[sched["type"]], "auto"))
    if isinstance(ds.get("checkpoint"), dict):
        ds["checkpoint"].pop("load_universal", None)
        if not ds["checkpoint"]:
            del ds["checkpoint"]
    return ds


def resolve(cfg: TrainConfig, ds: dict[str, Any], world_size: int, schedule_steps: int,
            name: str = "DeepSpeed config", cuda: bool = False) -> dict[str, Any]:
    """The DeepSpeed dict actually used: a copy of `ds` with mtgpt's values filled in and checked."""
    ds = {k: v for k, v in copy.deepcopy(ds).items() if not k.startswith("_")}  # "_comment" etc.: notes
    unknown = sorted(set(ds) - _known_keys())
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, DS_TOP_LEVEL_KEYS, 1))
                 else k for k in unknown]
        raise ConfigError(f"{name}: unknown DeepSpeed key(s): {', '.join(hints)}")
    _refuse_quoted(ds, name)
    if _enabled(ds.get("fp16")) and (_enabled(ds.get("bf16")) or _enabled(ds.get("bfloat16"))):
        raise ConfigError(f"{name}: both fp16 and bf16 are enabled; enable one")
    if autocast(ds) and precision(ds) == "fp32":
        raise ConfigError(f"{name}: torch_autocast needs a \"dtype\": \"bfloat16\" or \"float16\" (without one, "
                          "torch.autocast picks float16 on a GPU and bfloat16 on a CPU)")
    if autocast(ds) and (block := precision({k: v for k, v in ds.items() if k != "torch_autocast"})) != "fp32":
        raise ConfigError(f"{name}: torch_autocast and DeepSpeed's {block} block are both enabled; enable one "
                          "(torch_autocast keeps fp32 weights, the bf16/fp16 blocks make them bf16/fp16)")
    if _enabled(ds.get("fp16")) and not cuda:
        raise ConfigError(f"{name}: DeepSpeed's fp16 needs a GPU ('Type fp16 is not supported' on CPU); on "
                          "CPU use a _bf16 or _fp32 config, e.g. --ds-config zero1_bf16, or zero0_fp16 "
                          "(fp16 through torch.autocast)")
    for key in BATCH_KEYS:
        _number(ds, key, "", name)
    given = [ds.get(k, "auto") for k in BATCH_KEYS]
    if "auto" not in given and given[0] * given[1] * world_size != given[2]:  # the JSON contradicts itself
        raise ConfigError(f"{name}: train_batch_size {given[2]} is not train_micro_batch_size_per_gpu {given[0]} x "
                          f"gradient_accumulation_steps {given[1]} x {world_size} rank(s) = "
                          f"{given[0] * given[1] * world_size}; give at most two of the three (or set them to "
                          "\"auto\": mtgpt fills them in from --micro-batch, --grad-accum or --batch-size)")
    micro, accum = cfg.micro_batch, cfg.grad_accum
    clashes: list[tuple[str, str]] = []
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "", "--micro-batch", f"pass --micro-batch {ds.get('train_micro_batch_size_per_gpu')}", name, clashes)
    _fill(ds, "gradient_accumulation_steps", accum, "", "--grad-accum", f"pass --grad-accum {ds.get('gradient_accumulation_steps')}", name, clashes)
    total = ds.get("train_batch_size", "auto")
    if total != "auto" and total != micro * accum * world_size:
        fits = total / (micro * world_size)
        micros = [m for m in range(micro, 0, -1) if isinstance(total, int) and total % (m * world_size) == 0]
        what = (f"train_batch_size is {total} but micro_batch {micro} x grad_accum {accum} x {world_size} rank(s) = "
                f"{micro * accum * world_size}")
        if not (fits == int(fits) and fits >= 1 or micros):
            raise ConfigError(f"{name}: {what}. Set it to \"auto\", or make it micro_batch x grad_accum x ranks = "
                              f"{micro * accum * world_size}.")
        clashes.append((what, f"pass --grad-accum {int(fits)}" if fits == int(fits) and fits >= 1
                        else f"pass --batch-size {total} --micro-batch {micros[0]}"))
    ds["train_batch_size"] = micro * accum * world_size  # (a clash is refused with the others, below)

    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or "type" not in opt:
        raise ConfigError(f"{name}: needs an \"optimizer\" block (DeepSpeed manages AdamW); copy the "
                          "one in ds_configs/zero1_fp32.json")
    if str(opt["type"]).lower() not in OPTIMIZERS:
        raise ConfigError(f"{name}: optimizer {opt['type']!r}: mtgpt trains with DeepSpeed's {' or '.join(OPTIMIZERS.values())} "
                          "(what its ZeRO stages are tested with here; others fail inside DeepSpeed at the first "
                          "step); copy the optimizer block of ds_configs/zero1_fp32.json")
    params = opt.setdefault("params", {})
    takes = optimizer_params(params)
    if unknown := sorted(set(params) - takes):
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, takes, 1)) else k for k in unknown]
        raise ConfigError(f"{name}: unknown optimizer.params key(s): {', '.join(hints)}"
                          + ("; DeepSpeed clips with the top-level \"gradient_clipping\"" if "max_grad_norm" in unknown
                             else "") + f"; the optimizer takes {', '.join(sorted(takes))}")
    if "betas" in params and not (isinstance(params["betas"], list) and len(params["betas"]) == 2 and
                                  all(isinstance(b, (int, float)) and 0 <= b < 1 for b in params["betas"])):
        raise ConfigError(f"{name}: optimizer.params.betas is {params['betas']!r}; it takes two numbers in [0, 1), "
                          "e.g. [0.9, 0.95]")
    _fill(params, "lr", cfg.lr, "optimizer.params.", "--lr", f"pass --lr {params.get('lr')}", name, clashes)
    sched = ds.get("scheduler")
    if sched is not None and not (isinstance(sched, dict) and sched.get("type") in scheduler_types()):
        raise ConfigError(f"{name}: scheduler {sched.get('type') if isinstance(sched, dict) else sched!r} is not one "
                          f"of DeepSpeed's ({', '.join(sorted(scheduler_types()))}); mtgpt's warmup and cosine is "
                          "WarmupCosineLR (ds_configs/zero1_fp32.json)")
    takes = SCHEDULE_KEYS.get(sched["type"], ()) if sched else ()
    ignored = [opt for opt, key, given in (("--warmup-steps", "warmup_num_steps", cfg.warmup_steps is not None),
                                           ("--min-lr-ratio", "cos_min_ratio", cfg.min_lr_ratio != MIN_LR_RATIO))
               if given and key not in takes]
    if ignored:
        raise ConfigError(f"{name}: {' and '.join(ignored)} set{'s' if len(ignored) == 1 else ''} what its "
                          f"{'scheduler ' + sched['type'] if sched else 'lack of a scheduler (a constant --lr)'} does "
                          f"not have; leave {'it' if len(ignored) == 1 else 'them'} out, or use a WarmupCosineLR "
                          "scheduler block (ds_configs/zero1_fp32.json has one)")
    if isinstance(sched, dict) and sched.get("type") in SCHEDULE_KEYS:
        sp = sched.setdefault("params", {})  # (other schedulers, e.g. OneCycle, are the JSON's own)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else warmup_default(schedule_steps)
        values = {"warmup_num_steps": (warmup, "--warmup-steps"), "warmup_max_lr": (cfg.lr, "--lr"),
                  "total_num_steps": (schedule_steps, "--max-steps (or the length --max-tokens/--max-epochs give)"),
                  "cos_min_ratio": (cfg.min_lr_ratio, "--min-lr-ratio")}
        start = first_warmup_ratio(warmup)  # where the warmup starts: its first step never trains at lr 0
        if sched["type"] == "WarmupCosineLR":
            _number(sp, "warmup_min_ratio", "scheduler.params.", name)
            if sp.get("warmup_min_ratio", "auto") == "auto":
                sp["warmup_min_ratio"] = start
        elif sp.get("warmup_min_lr", "auto") == "auto":
            sp["warmup_min_lr"] = start * cfg.lr
        for key in SCHEDULE_KEYS[sched["type"]]:
            value, source = values[key]
            _fill(sp, key, value, "scheduler.params.", source, f"pass {source.split(' ')[0]} {sp.get(key)}", name,
                  clashes)
    _refuse_clashes(clashes, name)
    for block, package in (("wandb", "wandb"), ("comet", "comet_ml")):  # DeepSpeed imports these in every rank
        if _enabled(ds.get(block)) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{name}: its {block} block needs the {package} package, which is not installed: "
                              f"pip install {package}, or remove the block (mtgpt logs to TensorBoard either way)")
    if _enabled(ds.get("activation_checkpointing")) or (isinstance(ds.get("activation_checkpointing"), dict)
                                                        and ds["activation_checkpointing"]):
        raise ConfigError(f"{name}: mtgpt's model does not use DeepSpeed's activation checkpointing, so its "
                          "activation_checkpointing block would do nothing; remove it (a smaller --micro-batch "
                          "with a larger --grad-accum saves the same memory)")
    ds.setdefault("timers", {"throughput": {"enabled": False}})  # no host sync per micro-step
    for key in ("bf16", "bfloat16"):
        if isinstance(ds.get(key), dict) and _enabled(ds[key]):
            ds[key].setdefault("check_grad_overflow", False)  # no host sync per step (module docstring)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{name}: mtgpt cannot fill \"auto\" for {', '.join(leftover)}; give numbers")
    _validate_with_deepspeed(ds, name)
    return ds


def scheduler_types() -> set[str]:
    """The scheduler "type"s DeepSpeed builds (deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES)."""
    import_deepspeed()
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    return set(VALID_LR_SCHEDULES)


def optimizer_params(params: dict[str, Any]) -> set[str]:
    """The optimizer.params keys DeepSpeed takes for AdamW/Adam: the ones it reads itself, and the
    arguments of the optimizer it builds (torch's AdamW with "torch_adam": true, as the bundled
    JSONs have it; else its own FusedAdam)."""
    import inspect

    import torch

    if params.get("torch_adam"):
        built = torch.optim.AdamW
    else:
        import_deepspeed()
        from deepspeed.ops.adam import FusedAdam as built
    return (set(inspect.signature(built).parameters) - {"self", "params"}) | {"torch_adam", "adam_w_mode",
                                                                             "fp32_optimizer_states"}


OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam"}  # DeepSpeed's optimizer "type", case-insensitive as DeepSpeed reads it


QUOTED = re.compile(r"\s*([+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|true|false)\s*", re.IGNORECASE)
NAMES = re.compile(r"name|path|dir|tag|project|team|group|id$")  # keys whose text may look like a number


def _refuse_quoted(ds: dict[str, Any], name: str) -> None:
    """Refuse a number or a true/false written in quotes anywhere in the JSON: DeepSpeed keeps
    most values as given, so "0" for a scheduler's ratio silently made a constant lr, "1.0" for
    gradient_clipping was a TypeError in every rank at the first step, and "false" enables."""
    for key, value in _walk(ds):
        if isinstance(value, str) and QUOTED.fullmatch(value) and not NAMES.search(key.rpartition(".")[2]):
            bare = value.strip().lower() if value.strip().lower() in ("true", "false") else value.strip()
            raise ConfigError(f"{name}: {key} is {value!r}; write it without quotes ({bare}, not \"{value}\")")


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d


def _validate_with_deepspeed(ds: dict[str, Any], name: str) -> None:
    """Run DeepSpeed's own config parser on the result (without train_batch_size, which it would
    check against a world of one outside a process group; mtgpt checked it above)."""
    import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {k: v for k, v in ds.items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(probe)
    except Exception as e:  # DeepSpeed raises assorted types (pydantic ValidationError, AssertionError)
        raise ConfigError(f"{name}: DeepSpeed rejects this config: {_one_line(e)}") from None


BLOCKS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16", "DeepSpeedFP16Config": "fp16"}


def _one_line(error: Exception) -> str:
    """A pydantic ValidationError in one line ("zero_optimization.overlap_com: Extra inputs are
    not permitted", not four lines and a URL); other errors as they are."""
    try:
        where = BLOCKS.get(error.title, error.title)  # type: ignore[attr-defined]
        return "; ".join(f"{'.'.join(map(str, (where, *e['loc'])))}: {e['msg']}"
                         + (" (did you mean " + m[0] + "?)" if e.get("type") == "extra_forbidden" and
                            (m := difflib.get_close_matches(str(e["loc"][-1]), _model_fields(error), 1)) else "")
                         for e in error.errors())  # type: ignore[attr-defined]
    except AttributeError:
        return str(error)


def _model_fields(error: Exception) -> list[str]:
    """The keys the pydantic model that raised `error` takes (DeepSpeed's config classes)."""
    import deepspeed.runtime.zero.config as zero_config

    model = getattr(zero_config, error.title, None)  # type: ignore[attr-defined]
    return list(getattr(model, "model_fields", {})) if model is not None else []
