"""Everything mtgpt writes to disk about a model: DeepSpeed checkpoints and inference weights.

RUN_DIR/
  checkpoints/step_00001000/   a DeepSpeed checkpoint (engine, optimizer, scheduler, client state)
  checkpoints/step_00001000/COMPLETE   written after every rank finished saving; without it the
                               folder is a torn save and is never resumed from
  checkpoints/latest           the run's newest complete save (the file DeepSpeed's loader reads
                               too); `--resume auto` continues from the tag it names
  checkpoints/abandoned-<time>/  saves newer than a checkpoint the run was resumed from: that
                               resume made the older point the run's history, and the saves of
                               the branch it left are set aside here (never deleted)
  checkpoints/universal/<tag>  a checkpoint converted to DeepSpeed's universal format, made when
                               a run resumes on another number of ranks
  model.safetensors, config.json       the consolidated weights of the latest checkpoint
  tokenizer.json, tokenizer_info.json  the run's tokenizer, when it is not GPT-2's (config.json
                               records which tokenizer the model reads, GPT-2's or this one)
  best/model.safetensors, best/config.json (best/tokenizer.json)   the weights at the lowest val
                               loss so far, written at each evaluation that improves it

Weights load only from safetensors (no pickle, so no code runs on load). The tied wte/lm_head
matrix is stored once, as transformer.wte.weight, and re-tied on load.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mtgpt import folders, hf, tokenizer
from mtgpt.config import ConfigError, ModelConfig
from mtgpt.folders import (CKPT_DIR, COMPLETE, MODEL_CONFIG, RUN_INFO, TAG_RE, WEIGHTS, ModelFileError,  # noqa: F401
                           complete_tags, has_val, latest_complete, model_folder)  # (checkpoint.X for callers)
from mtgpt.model import GPT, WTE, unpadded


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def point_latest(run_dir: str | Path, tag: str) -> None:
    _write_atomic(Path(run_dir) / CKPT_DIR / "latest", tag)


def saves_after(run_dir: str | Path, step: int) -> list[str]:
    """Checkpoint folders (complete or torn) of steps after `step`, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if TAG_RE.match(p.name) and int(p.name[5:]) > step)


def weights_metadata(folder: str | Path) -> dict[str, str]:
    """What a folder's model.safetensors records (step, tokens, a best/'s val_loss); {} if none."""
    try:
        with hf.open_safetensors(Path(folder) / WEIGHTS) as f:  # (damaged: an HFError, a ValueError)
            return dict(f.metadata() or {})
    except (OSError, ValueError):
        return {}


def weights_step(folder: str | Path) -> int | None:
    """The training step recorded in a folder's model.safetensors, or None."""
    try:
        return int(weights_metadata(folder).get("step", ""))
    except ValueError:
        return None


def set_aside_after(run_dir: str | Path, step: int) -> tuple[list[str], Path | None]:
    """Rank 0, when a run continues from `step` although it holds later saves: they belong to the
    branch the resume left. Complete ones (and best/ if it is from after `step`) move to
    checkpoints/abandoned-<time>/; torn ones and their universal conversions are deleted.
    Returns (the complete tags moved, the folder they went to)."""
    root = Path(run_dir) / CKPT_DIR
    later = saves_after(run_dir, step)
    moved = [t for t in later if (root / t / COMPLETE).is_file()]
    best = Path(run_dir) / "best"
    best_later = (weights_step(best) or 0) > step
    aside = None
    if moved or best_later:
        aside = root / time.strftime("abandoned-%Y%m%dT%H%M%SZ", time.gmtime())
        aside.mkdir(parents=True, exist_ok=True)
        for tag in moved:
            (root / tag).rename(aside / tag)
        if best_later:
            best.rename(aside / "best")
    for tag in later:
        shutil.rmtree(root / tag, ignore_errors=True)  # torn saves (the complete ones moved)
        shutil.rmtree(root / "universal" / tag, ignore_errors=True)
    return moved, aside


def set_aside(tag_dir: Path) -> bool:
    """Whether a checkpoint folder is one `set_aside_after` moved out of its run's history."""
    return tag_dir.parent.name.startswith("abandoned-")


def saved_info(tag_dir: Path) -> dict[str, Any]:
    """What mark_complete recorded about a checkpoint (world size, ZeRO stage, ...)."""
    return json.loads((tag_dir / COMPLETE).read_text())


def needs_universal(tag_dir: Path, world_size: int) -> bool:
    """True when the checkpoint's optimizer state is sharded over another number of ranks: it
    must go through DeepSpeed's universal checkpoint. (ZeRO-0 in fp32 keeps the whole optimizer
    state in one file and loads on any world size.)"""
    saved = saved_info(tag_dir).get("world_size")
    sharded = any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    return saved is not None and saved != world_size and sharded


DEEPSPEED_DEBUG_PRINTS = ("_load_legacy_checkpoint current_rank_sd",)  # runtime/bf16_optimizer.py:679 (0.19.8)


def load_engine(engine, tag_dir: Path) -> dict[str, Any]:
    """Load a DeepSpeed checkpoint folder (or its universal form) into the engine; returns the
    client state. Two repairs for DeepSpeed 0.19's ZeRO-3 universal load, which (1) gives every
    optimizer group the first group's hyperparameters, so the no-decay group (biases, LayerNorms,
    embeddings) would be decayed, and (2) gives all groups one shared `step` tensor, which each
    group's update then increments, so Adam's bias correction runs ahead. Both would change every
    step after a resume on another number of ranks (tests/test_resume.py)."""
    decay = [group["weight_decay"] for group in engine.optimizer.param_groups]
    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # DeepSpeed's bf16 optimizer prints a debug line with print()
        _, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    sys.stdout.write("".join(line for line in said.getvalue().splitlines(keepends=True)
                             if not line.startswith(DEEPSPEED_DEBUG_PRINTS)))  # anything else it says, as it was
    for group, value in zip(engine.optimizer.param_groups, decay):
        group["weight_decay"] = value
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return client


def universal(tag_dir: Path, is_writer: bool, timeout: float = 3600) -> Path:
    """The universal form of a checkpoint, checkpoints/universal/<tag>, converted once with
    DeepSpeed's ds_to_universal by the writer (rank 0); the other ranks wait for its marker."""
    out = tag_dir.parent / "universal" / tag_dir.name
    if is_writer and not (out / COMPLETE).is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(tag_dir), "--output_folder", str(out), "--num_extract_workers", "1",
                        "--num_merge_workers", "1"], check=True, capture_output=True)
        _write_atomic(out / COMPLETE, (tag_dir / COMPLETE).read_text())
    deadline = time.time() + timeout
    while not (out / COMPLETE).is_file():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for rank 0 to write {out}")
        time.sleep(1)
    return out


def mark_complete(run_dir: str | Path, tag: str, info: dict[str, Any], keep_last: int) -> None:
    """Rank 0, after all ranks saved `tag`: mark it complete, move `latest`, prune old tags."""
    root = Path(run_dir) / CKPT_DIR
    _write_atomic(root / tag / COMPLETE, json.dumps(info) + "\n")
    point_latest(run_dir, tag)
    # Every tag here is of the run's history (a resume from an older point set the later ones
    # aside), so the newest by name are the newest saves.
    keep = set(complete_tags(run_dir)[-keep_last:])
    for folder in (root, root / "universal"):
        for p in folder.iterdir() if folder.is_dir() else []:
            if TAG_RE.match(p.name) and p.name not in keep and p.name < tag:
                shutil.rmtree(p, ignore_errors=True)  # older than the newest save: superseded or torn


def gather_weights(module: torch.nn.Module, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (None elsewhere): the optimizer's fp32 master copy where there
    is one (bf16/fp16 under ZeRO 1-3: DeepSpeed's `safe_get_full_fp32_param`, what its own
    zero-to-fp32 reader gets), else the parameters. Every rank must call this: the master copy
    and ZeRO-3's partitioned parameters are gathered with collectives."""
    from mtgpt.world import import_deepspeed

    deepspeed = import_deepspeed()
    params = dict(module.named_parameters())  # the tied matrix appears once
    masters = {k: deepspeed.utils.safe_get_full_fp32_param(p) for k, p in params.items()}
    if all(m is not None for m in masters.values()):
        return {k: m.detach().float().cpu().clone() for k, m in masters.items()} if rank == 0 else None

    def copy() -> dict[str, torch.Tensor] | None:
        return {k: v.detach().float().cpu().clone() for k, v in params.items()} if rank == 0 else None

    if zero_stage != 3:
        return copy()
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return copy()


def save_weights(weights: dict[str, torch.Tensor], config: ModelConfig, folder: str | Path,
                 metadata: dict[str, str] | None = None, tok: tokenizer.Tokenizer | None = None) -> None:
    """model.safetensors + config.json (+ the tokenizer, `tok`, GPT-2's when None) in `folder`,
    each written to a temp name and renamed; config.json, last, records the tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tok or tokenizer.gpt2()
    if tok.vocab_size != config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model {config.vocab_size}")
    tok.save(folder)
    weights = {k: v.contiguous() for k, v in unpadded(weights, config).items() if k != "lm_head.weight"}
    tmp = folder / (WEIGHTS + ".tmp")
    try:
        save_file(weights, str(tmp), metadata={"format": "pt", **(metadata or {})})
    except Exception as e:  # safetensors reports a failed write as its own error: raise the OSError it is
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise
        code = re.search(r"os error (\d+)", str(e))
        raise OSError(int(code.group(1)) if code else 5, f"could not write {folder / WEIGHTS}: {e}") from e
    os.chmod(tmp, folders.FILE_MODE)  # (safetensors writes it 0600; the others follow the umask)
    tmp.replace(folder / WEIGHTS)
    _write_atomic(folder / MODEL_CONFIG, json.dumps({"model_type": "mtgpt", **config.__dict__,
                                                     "tokenizer": tok.identity()}, indent=2) + "\n")


def load_model_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / MODEL_CONFIG
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ModelFileError(f"{path}: expected a JSON object of the model's settings, got {type(d).__name__}; "
                             "restore the folder's own file")
    d.pop("model_type", None)
    d.pop("tokenizer", None)
    try:
        return ModelConfig.from_dict(d)
    except ConfigError as e:
        raise ModelFileError(f"{path}: {e}") from None


def recorded_tokenizer(folder: str | Path) -> dict[str, Any]:
    """The tokenizer identity a model folder's config.json records (GPT-2's for folders saved
    before mtgpt had others, and for a run with no saved model yet)."""
    return tokenizer.recorded(folder) or dict(tokenizer.GPT2_IDENTITY)


def load_tokenizer(folder: str | Path) -> tokenizer.Tokenizer:
    """The tokenizer of a model folder (a run, best/, or one written by save_weights): the one its
    config.json records (GPT-2's for folders saved before mtgpt had others). A data, tokenizer or
    Hugging Face folder: its own (`tokenizer.load`); a folder of another kind is refused as
    model_folder refuses it."""
    folder = Path(folder)
    kind = folders.kind(folder)
    if kind in ("data", "tokenizer", "hf"):  # (their tokenizer was called damaged: "records gpt2 but holds ...")
        return tokenizer.load(folder)
    if kind not in ("run", "model"):
        model_folder(folder)  # (raises what it is and what to give)
    try:
        tok = tokenizer.for_folder(folder, recorded_tokenizer(folder))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{folder}: its tokenizer cannot be used: {e}") from None
    vocab_size = load_model_config(folder).vocab_size
    if tok.vocab_size != vocab_size:
        raise ModelFileError(f"{folder}: the model has {vocab_size} tokens but its tokenizer {tok.vocab_size}; "
                             "restore the folder's own files")
    return tok


def load_weights(model: GPT, weights: dict[str, torch.Tensor], source: str | Path) -> GPT:
    """Copy `weights` (names as GPT.named_parameters(): the tied matrix once, as
    transformer.wte.weight) into `model`; raises if they do not fit it. An embedding of exactly
    vocab_size rows (as saved) fills a padded model's first rows; its padding rows stay."""
    own = model.state_dict()
    wte = weights.get(WTE)
    if wte is not None and wte.size(0) == model.config.vocab_size < own[WTE].size(0):
        weights = {**weights, WTE: torch.cat([wte.to(own[WTE].dtype), own[WTE][wte.size(0):].to(wte.device)])}
    wrong = [f"{k} is {tuple(v.shape)} there but {tuple(own[k].shape)} in the model"
             for k, v in weights.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ModelFileError(f"the weights of {source} do not fit the model its config describes: "
                             f"{'; '.join(wrong[:3])}. Was config.json edited or copied from another "
                             "model? Restore the one written with these weights")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to transformer.wte.weight
    if missing or unexpected:
        raise ModelFileError(f"the weights of {source} do not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    model.lm_head.weight = model.transformer.wte.weight  # re-tie (load_state_dict copied into wte)
    return model


def damaged(folder: Path, reason: str) -> ModelFileError:
    """The error for a model.safetensors that cannot be read (torn by a full disk, a cut copy),
    with the way to get a whole one for what `folder` is."""
    run = folder.parent if folder.name == "best" else folder
    if folder.name == "best" and (run / WEIGHTS).is_file():
        fix = "leave out --best to use the latest weights, or restore it from a copy"
    elif complete_tags(run):
        fix = ("restore it from a copy, or go on from the run's latest checkpoint, which rewrites it: "
               f"`mtgpt train --out {run} --resume auto --max-steps N` (N past its last step)")
    else:
        fix = "restore it from a copy, or train the model again"
    return ModelFileError(f"{folder / WEIGHTS} is damaged ({reason}); {fix}")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """A model folder's model.safetensors (no code runs on load); ModelFileError when it is
    damaged."""
    return hf.read_safetensors(folder / WEIGHTS, lambda reason: damaged(folder, reason))


def read_weights(run_dir: str | Path, best: bool = False) -> dict[str, torch.Tensor]:
    """The consolidated weights of a run folder (safetensors: no code runs on load)."""
    return read_safetensors(model_folder(run_dir, best))


def source_config(init_from: str | None, init_from_hf: str | None) -> ModelConfig | None:
    """The shape of the model a fine-tune starts from: an mtgpt run (--init-from) or a Hugging
    Face GPT-2 folder (--init-from-hf); None for neither. What mtgpt's GPT cannot compute is
    refused here, before anything starts (ModelFileError, HFError)."""
    if init_from:
        folder = model_folder(init_from)
        with hf.open_safetensors(folder / WEIGHTS, lambda reason: damaged(folder, reason)):
            pass  # a damaged model.safetensors is refused now, not once the processes have started
        return load_model_config(folder)
    if init_from_hf:
        return hf.check(init_from_hf)
    return None


def source_tokenizer(init_from: str | None, init_from_hf: str | None) -> tokenizer.Tokenizer | None:
    """The tokenizer the model of source_config reads (a Hugging Face folder without
    tokenizer.json is taken to read GPT-2's)."""
    if init_from:
        return load_tokenizer(model_folder(init_from))
    if init_from_hf:
        size = hf.read_config(init_from_hf).vocab_size
        if not (Path(init_from_hf) / tokenizer.TOKENIZER_JSON).is_file() and size != tokenizer.GPT2_VOCAB_SIZE:
            raise hf.HFError(f"{init_from_hf} has no {tokenizer.TOKENIZER_JSON}, and its vocabulary of {size:,} tokens "
                             f"is not GPT-2's ({tokenizer.GPT2_VOCAB_SIZE:,}): copy in the {tokenizer.TOKENIZER_JSON} "
                             "of the model it was exported from (`mtgpt export` writes one)")
        try:
            return tokenizer.for_folder(init_from_hf)
        except ValueError as e:
            raise hf.HFError(f"{init_from_hf}: its tokenizer cannot be used: {e}") from None
    return None


def source_weights(init_from: str | None, init_from_hf: str | None) -> dict[str, torch.Tensor]:
    """The weights of the model source_config describes."""
    return read_weights(init_from) if init_from else hf.load(init_from_hf)[1]


def load_model(run_dir: str | Path, best: bool = False, device: str | torch.device = "cpu") -> GPT:
    """A GPT from a run folder's consolidated safetensors (no DeepSpeed), in eval mode."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():  # (torch's own: an AssertionError)
        raise ValueError(f"device {str(device)!r}: no CUDA GPU is visible (this torch: {torch.__version__}); use "
                         "device='cpu'")
    folder = model_folder(run_dir, best)
    model = GPT(load_model_config(folder))
    return load_weights(model, read_safetensors(folder), folder).to(device).eval()
