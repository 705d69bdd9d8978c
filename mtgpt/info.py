"""`mtgpt info`: what a data, run or tokenizer folder holds, as text.

A tokenizer folder, a data folder with GPT-2's vocabulary, or a path that is neither, is told without
importing torch (seconds): the modules that need it are imported by the functions that describe models
(and a data folder with its own vocabulary imports the loader, to read samples for gpt2_bytes_per_token).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mtgpt import folders, tokenizer
from mtgpt.config import ModelConfig, TrainConfig, data_sources, load_json
from mtgpt.data import remote
from mtgpt.data.manifest import MANIFEST, bytes_per_token, load_manifest, missing, older_chat, verify as verify_shards


def describe_model(config: ModelConfig) -> list[str]:
    from mtgpt.model import param_count

    return [f"model: {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, context "
            f"{config.block_size}, vocab {config.vocab_size}, dropout {config.dropout}",
            f"parameters: {param_count(config):,} (token embedding tied to the output layer, counted once)"]


SAMPLE_BYTES = 1 << 20  # GPT-2's bytes per token on a data folder are measured on ~1 MB of its text


def gpt2_bytes_per_token(path: Path, m: dict, tok: tokenizer.Tokenizer) -> float:
    """GPT-2's bytes per token on the text of the first train samples of a data folder made with
    another tokenizer (decoded back to text, <|endoftext|> left out)."""
    from mtgpt.data.loader import Split

    split = Split(path, m, "train", tok.vocab_size)
    per_sample = m["sample_tokens"] * m["text_bytes"] / max(1, m["tokens"])
    ids = split.read(np.arange(min(len(split), max(1, int(SAMPLE_BYTES / per_sample))))).reshape(-1)
    text = b"".join(tok.token_bytes(int(i)) for i in ids if i != tok.eot).decode("utf-8", errors="replace")
    return len(text.encode("utf-8")) / max(1, len(tokenizer.gpt2().encode(text)))


def _size(n: int) -> str:
    """Bytes for people: 12.3 KB, 4.5 MB, 1.2 GB (a 12 KB text was "0.0 MB")."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def describe_tokenizer(path: Path) -> list[str]:
    tok = tokenizer.load(path)
    lines = [f"tokenizer folder {path}: {tokenizer.describe(tok.identity())}"]
    trained = tok.info.get("trained_on")
    if trained:
        names = trained["names"][:3] + (["..."] if trained["sources"] > 3 else [])
        lines.append(f"trained on: {trained['sources']} source(s), {_size(trained['bytes'])} ({', '.join(names)})")
    if "bytes_per_token" in tok.info:
        lines.append(f"bytes per token on that text: {tok.info['bytes_per_token']:.2f} (GPT-2's: "
                     f"{tok.info['gpt2_bytes_per_token']:.2f}, {tokenizer.GPT2_VOCAB_SIZE:,} tokens)")
    return lines


def mask_line(m: dict[str, Any]) -> str:
    """What a chat data folder trains on (prepare and info say it alike)."""
    targets = (m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"]) * m["block_size"]
    whose = "the bot's replies" if m["train_on"] == "bot" else "every token"
    return (f"loss mask: {m['trained_targets']:,} of {targets:,} targets trained ({100 * m['trained_targets'] / targets:.1f}%: "
            f"{whose}); one conversation per sample, {100 * m['padding_tokens'] / max(1, targets):.1f}% padding "
            f"(a smaller --block-size wastes less)")


def describe_data(path: Path, verify: bool) -> tuple[list[str], bool]:
    """(lines, ok). verify: check every file's size and sha256 first, and read no sample of a
    folder that fails (GPT-2's bytes per token would stop at the damage instead of reporting it)."""
    m = load_manifest(path, whole=False)  # (files missing are said below, after what the folder is)
    problems = verify_shards(path, m) if verify else missing(path, m)
    lines = [f"data folder {path} (mtgpt {m['mtgpt_version']}, {m['created']})",
             f"tokenizer: {tokenizer.describe(m['tokenizer'])}",
             f"block size: {m['block_size']} ({m['sample_tokens']} tokens per sequence)",
             f"documents: {m['documents']:,}; tokens: {m['tokens']:,} "
             f"({m['dropped_tail_tokens']} left over at the end, not used)"]
    for split in ("train", "val"):
        s = m["splits"][split]
        lines.append(f"{split}: {s['samples']:,} sequences = {s['samples'] * m['block_size']:,} {split} tokens (what "
                     f"`mtgpt train` counts: the predicted ones; {s['tokens']:,} stored) in {len(s['shards'])} shard(s)")
    sizes = [src["bytes"] for src in m["sources"]]
    if None in sizes:  # standard input (its size is not known before it is read): the bytes read
        lines.append(f"sources: {len(sizes)}, standard input among them ({_size(m.get('text_bytes') or 0)} read)")
    else:
        lines.append(f"sources: {len(sizes)} ({_size(sum(sizes))})")
    if m.get("text_bytes"):
        line = f"bytes per token: {bytes_per_token(m):.2f}"
        if not tokenizer.same(m["tokenizer"], tokenizer.GPT2_IDENTITY) and m["splits"]["train"]["samples"]:
            if problems:
                line += " (GPT-2's not measured: the folder is damaged, see verify below)"
            else:
                tok = tokenizer.for_folder(path, m["tokenizer"])
                line += f" (GPT-2's, {tokenizer.GPT2_VOCAB_SIZE:,} tokens, on ~1 MB of this text: {gpt2_bytes_per_token(path, m, tok):.2f})"
        lines.append(line)
    if m.get("replaced_bytes"):
        lines.append(f"invalid UTF-8 bytes replaced: {m['replaced_bytes']}")
    if m.get("loss_mask"):
        lines.append(mask_line(m))
    if older := older_chat(m):
        lines.append(f"note: {older}")
    if verify:
        lines += [f"verify: {p}" for p in problems] or [f"verify: all {sum(len(m['splits'][s]['shards']) for s in ('train', 'val'))} shard(s) match their sha256"]
    elif problems:
        lines += [f"damaged: {p}" for p in problems] + ["damaged: prepare the data again (--verify checks every "
                                                        "file's sha256 too)"]
    return lines, not problems


def describe_checkpoint(path: Path) -> list[str]:
    """A checkpoint folder (or the run's checkpoints/): what it holds, then its run."""
    from mtgpt import checkpoint

    run = folders.run_holding(path)
    if checkpoint.TAG_RE.match(path.name) and path.parent.name == "universal":
        original = path.parent.parent / path.name
        return [f"{path} is DeepSpeed's universal form of the checkpoint {original}, written to resume it on "
                "another number of ranks" + (f"; resume from that one: mtgpt train --resume {original}"
                                             if (original / checkpoint.COMPLETE).is_file() else
                                             " (which is gone: resume from the run, --resume auto)")]
    if checkpoint.TAG_RE.match(path.name):
        try:
            saved = json.loads((path / checkpoint.COMPLETE).read_text())
            lines = [f"checkpoint {path.name} of the run {run}: step {saved.get('step')}, {saved.get('tokens', 0):,} "
                     f"tokens, saved by {saved.get('world_size')} rank(s) at ZeRO-{saved.get('zero_stage')} in "
                     f"{saved.get('precision')}; resume from it: mtgpt train "
                     f"{'--out NEW_RUN ' if checkpoint.set_aside(path) else ''}--resume {path}"]
        except (OSError, ValueError):
            lines = [f"checkpoint {path.name} of the run {run}: incomplete (a save cut short), which --resume auto "
                     "skips"]
    else:
        tags = checkpoint.complete_tags(run)
        latest = checkpoint.latest_complete(run)
        lines = [f"{path} is in the run {run}: complete checkpoints {', '.join(tags) or 'none'}"
                 + (f"; --resume auto takes {latest.name}" if latest else "")]
    return [*lines, "", *describe_run(run)]


def best_row(path: Path, val: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluation whose weights best/ holds (its own step and val loss; the last evaluation
    logged at that step, for its bits per byte), else the lowest val loss logged. (The lowest
    logged was named even where best/ had started again, after a resume on other data or with
    another val set, and held another step.)"""
    from mtgpt import checkpoint

    meta = checkpoint.weights_metadata(path / "best") if (path / "best" / checkpoint.WEIGHTS).is_file() else {}
    try:
        step, loss = int(meta["step"]), float(meta["val_loss"])
    except (KeyError, TypeError, ValueError):
        return min(val, key=lambda r: r["val/loss"])
    logged = next((r for r in reversed(val) if r["step"] == step), {})
    return {**logged, "step": step, "val/loss": loss}


def describe_run(path: Path) -> list[str]:
    """A run folder, or a model folder (a run's best/ named as such, with the step it holds)."""
    from mtgpt import checkpoint, rundir
    from mtgpt.monitor import METRICS, read_metrics

    is_run = (path / rundir.TRAIN_CONFIG).is_file()
    if is_run:
        lines = [f"run folder {path}"]
    else:
        meta = checkpoint.weights_metadata(path)
        best = path.name == "best" and (path.parent / rundir.TRAIN_CONFIG).is_file()
        saved = ", ".join([*([f"step {meta['step']}"] if "step" in meta else []),
                           *([f"val loss {float(meta['val_loss']):.4f}"] if "val_loss" in meta else [])])
        lines = [(f"the best model of the run {path.parent} ({path})" if best else f"model folder {path}")
                 + (f": {saved}" if saved else "")]
    vocab = ModelConfig().vocab_size
    if (path / rundir.TRAIN_CONFIG).is_file():
        cfg = TrainConfig.from_dict(load_json(path / rundir.TRAIN_CONFIG))
        lines += describe_model(cfg.model)
        try:
            ranks = json.loads((path / rundir.RUN_INFO).read_text())["world_size"]
        except (OSError, ValueError, KeyError, TypeError):
            ranks = None
        batch = f"micro {cfg.micro_batch} x accum {cfg.grad_accum}" + (
            f" x {ranks} rank(s) = {cfg.micro_batch * cfg.grad_accum * ranks} sequences per step"
            if isinstance(ranks, int) and isinstance(cfg.micro_batch, int) and isinstance(cfg.grad_accum, int) else "")
        lines.append(f"data: {' + '.join(cfg.data)}; batch: {batch}; lr {cfg.lr}")
        gone = [s.path for s in data_sources(cfg.data) if not remote.is_url(s.path) and not Path(s.path).is_dir()]
        if gone:  # (moved or deleted since: what a resume will ask for)
            lines.append(f"data gone: {', '.join(gone)} no longer exist(s); a resume takes --data NEW_PATH")
        vocab = cfg.model.vocab_size
    elif (path / checkpoint.MODEL_CONFIG).is_file():
        config = checkpoint.load_model_config(path)
        lines += describe_model(config)
        vocab = config.vocab_size
    if (path / checkpoint.MODEL_CONFIG).is_file():
        lines.append(f"tokenizer: {tokenizer.describe(checkpoint.recorded_tokenizer(path))}")
    if who := rundir.training_now(path):
        lines.append(f"training now: {who}")
    elif (path / rundir.LAST_STOP).is_file():
        stop = json.loads((path / rundir.LAST_STOP).read_text())
        lines.append(f"last stop: {stop['reason']} at step {stop['step']} ({stop['tokens']:,} tokens)")
    elif (path / rundir.TRAIN_CONFIG).is_file():
        lines.append("last stop: none recorded (its last training ended without a clean stop: a crash or a kill)")
    if (path / METRICS).is_file():
        rows = read_metrics(path / METRICS, warn=lines.append)
        train = [r for r in rows if isinstance(r.get("train/loss"), float)]
        val = [r for r in rows if isinstance(r.get("val/loss"), float)]
        if train:
            lines.append(f"train loss: {train[-1]['train/loss']:.4f} at step {train[-1]['step']}")
        if val:
            best = best_row(path, val)
            lines.append(f"val loss: {val[-1]['val/loss']:.4f} at step {val[-1]['step']}; best "
                         f"{best['val/loss']:.4f} at step {best['step']} (an untrained model scores "
                         f"ln({vocab}) = {math.log(vocab):.2f})")
            if isinstance(val[-1].get("val/bpb"), float):
                lines.append(f"val bits per byte: {val[-1]['val/bpb']:.4f} at step {val[-1]['step']}"
                             + (f"; best {best['val/bpb']:.4f}" if isinstance(best.get("val/bpb"), float) else "")
                             + " (comparable across tokenizers)")
            each = {k.split("/")[1]: v for k, v in val[-1].items() if k.count("/") == 2 and k.endswith("/loss")}
            if each:  # a mixture: each source's own val split
                lines.append(f"val loss per source at step {val[-1]['step']}: "
                             + ", ".join(f"{name} {loss:.4f}" for name, loss in each.items()))
    if not checkpoint.has_val(path):
        lines.append("val loss: none (the data has no val split: it was prepared with --val-fraction 0), "
                     "so no best model and no early stopping")
    tags = checkpoint.complete_tags(path)
    root = path / checkpoint.CKPT_DIR
    torn = sorted(p.name for p in root.iterdir() if checkpoint.TAG_RE.match(p.name) and p.name not in tags) \
        if root.is_dir() else []
    if is_run or tags or torn:
        lines.append(f"checkpoints: {', '.join(tags) or 'none'}" + (f" (incomplete, ignored: {', '.join(torn)})"
                                                                      if torn else ""))
    for name, folder in (("model", path), ("best model", path / "best")):
        if (folder / checkpoint.WEIGHTS).is_file():
            lines.append(f"{name}: {folder / checkpoint.WEIGHTS}")
    if tags and not (path / checkpoint.WEIGHTS).is_file():
        lines.append(f"model: {path / checkpoint.WEIGHTS} is missing; `mtgpt train --out {path} --resume auto` "
                     "writes it again from the latest checkpoint")
    return lines


def describe_hf(path: Path) -> list[str]:
    """A Hugging Face model folder: whether mtgpt can start from it (the checks --init-from-hf
    makes), its shape, dropout as its config.json says, and its tokenizer."""
    from mtgpt import checkpoint, hf

    try:
        config = hf.check(path)
        tok = checkpoint.source_tokenizer(None, str(path))
    except ValueError as e:  # HFError, and a tokenizer.json that is not one
        return [f"Hugging Face model folder {path}; mtgpt cannot start from it: {e}"]
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    dropout = saved.get("resid_pdrop", 0.0)  # (--init-from-hf trains at --dropout, whatever this says)
    return [f"Hugging Face model folder {path}, GPT-2-shaped: mtgpt trains from it with --init-from-hf {path}",
            *describe_model(replace(config, dropout=float(dropout) if isinstance(dropout, (int, float)) and
                                    0 <= dropout < 1 else 0.0)),
            f"tokenizer: {tokenizer.describe(tok.identity())}"
            + ("" if (path / tokenizer.TOKENIZER_JSON).is_file() else f" (no {tokenizer.TOKENIZER_JSON}: GPT-2's is taken)")]


def describe(path: str | None, verify: bool = False) -> tuple[str, bool]:
    """(text, ok). No path: the default model. ok is False when --verify found a problem."""
    if path is None:
        if verify:
            raise ValueError("--verify checks a data folder's shards: give the folder, mtgpt info DATA --verify")
        return "\n".join(["default " + line for line in describe_model(ModelConfig())]), True
    p = Path(path)
    kind = folders.kind(p)
    if verify and kind in ("run", "model", "hf", "tokenizer", "checkpoint"):
        raise ValueError(f"--verify checks a data folder's shards; {path} is {folders.what(p)}: leave out --verify")
    if kind == "data":
        lines, ok = describe_data(p, verify)
        return "\n".join(lines), ok
    if kind in ("run", "model"):
        return "\n".join(describe_run(p)), True
    if kind == "hf":
        return "\n".join(describe_hf(p)), True
    if kind == "tokenizer":
        return "\n".join(describe_tokenizer(p)), True
    if kind == "missing":
        raise ValueError(f"{path}: no such file or folder")
    if kind == "checkpoint":
        return "\n".join(describe_checkpoint(p)), True
    raise ValueError(f"{path} is not a data folder (no {MANIFEST}), a run folder (no {folders.TRAIN_CONFIG} or "
                     f"{folders.WEIGHTS}) or a tokenizer folder (no {tokenizer.TOKENIZER_JSON})")
