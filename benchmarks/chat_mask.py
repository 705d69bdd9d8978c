"""Benchmark chat fine-tuning with and without the loss mask, side by side, on held-out conversations.

    make demo && python benchmarks/chat_mask.py            # fine-tunes runs/demo
    python benchmarks/chat_mask.py --base runs/demo --steps 400 --seeds 1 2

The chatterbot corpus is prepared twice with the base model's tokenizer, as `make chat-demo`
does: `--train-on bot` (the default: only the bot's replies are trained, system and user lines
are context) and `--train-on all` (every token of the conversation, as mtgpt trained chat before
the mask). Both folders hold the same conversations cut into samples the same way, and the same
val conversations; only the mask differs (the masked folder leaves out the few samples with no
bot token). Each is fine-tuned from the base with the same settings and seeds, then both models
are scored on the masked folder's val conversations, which neither saw: the mean loss on the
bot's reply tokens (what a chat model is for) and, for the record, on the user's tokens.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtgpt.data import load_manifest  # noqa: E402
from mtgpt.data.loader import Split  # noqa: E402
from mtgpt.sample import load_for_inference  # noqa: E402


def mtgpt(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "mtgpt", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"mtgpt {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


@torch.no_grad()
def scores(run: Path, bot: Path) -> tuple[float, float]:
    """(mean loss on the bot's reply tokens, on the user's and system's) over all val samples of
    the masked folder `bot` (its untrained targets that are not <|endoftext|> are the user's and
    system's: <|endoftext|> only ends a conversation and pads)."""
    model, tok = load_for_inference(str(run), False, "cpu", "fp32")
    m = load_manifest(bot)
    split = Split(bot, m, "val")
    index = np.arange(len(split))
    x, y_bot = split.examples(index)
    targets = split.read(index)[:, 1:].astype(np.int64)
    y_user = np.where((y_bot < 0) & (targets != tok.eot), targets, -1)
    sums = {"bot": [0.0, 0], "user": [0.0, 0]}
    for i in range(0, len(index), 32):
        xb = torch.from_numpy(x[i:i + 32])
        for name, y in (("bot", y_bot), ("user", y_user)):
            yb = torch.from_numpy(y[i:i + 32])
            sums[name][0] += float(model(xb, yb, reduction="sum")[1])
            sums[name][1] += int((yb >= 0).sum())
    return sums["bot"][0] / sums["bot"][1], sums["user"][0] / sums["user"][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/demo", help="The run to fine-tune (make demo's).")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--work", help="Folder for the data and runs. [default: a temporary one]")
    args = ap.parse_args()
    base = Path(args.base)
    if not (base / "model.safetensors").is_file():
        sys.exit(f"{base} holds no trained model: run `make demo` first, or pass --base RUN_DIR")
    block = load_for_inference(str(base), False, "cpu", "fp32")[0].config.block_size
    work = Path(args.work or tempfile.mkdtemp(prefix="chat_mask-"))
    data = {}
    for train_on in ("bot", "all"):
        data[train_on] = work / f"chat-{train_on}"
        line = mtgpt("prepare", "chatterbot", "--format", "chat", "--train-on", train_on, "--out", data[train_on],
                     "--block-size", block, "--val-fraction", "0.05", "--tokenizer", base, "--overwrite", "-q")
        print(line.strip())
    results = {k: [] for k in data}
    for seed in args.seeds:
        for train_on, folder in data.items():
            run = work / f"run-{train_on}-{seed}"
            shutil.rmtree(run, ignore_errors=True)
            began = time.time()
            mtgpt("train", "--init-from", base, "--data", folder, "--out", run, "--nproc", args.nproc,
                  "--micro-batch", args.micro_batch, "--lr", args.lr, "--ds-config", "zero1_bf16",
                  "--max-steps", args.steps, "--eval-every", args.steps, "--seed", seed)
            bot, user = scores(run, data["bot"])
            results[train_on].append((bot, user))
            print(f"seed {seed}, trained on {train_on:3s}: held-out loss on bot replies {bot:.4f}, on user lines "
                  f"{user:.4f} ({time.time() - began:.0f} s)")
    base_bot, base_user = scores(base, data["bot"])
    print(f"\nfine-tuning {base} for {args.steps} steps (micro {args.micro_batch} x {args.nproc} ranks, lr {args.lr}), "
          f"seeds {args.seeds}; mean nats/token on the {load_manifest(data['bot'])['splits']['val']['samples']} "
          "held-out val conversations' samples:")
    print("| trained on | bot replies (held out) | user lines (held out) |")
    print("|---|---|---|")
    print(f"| (the base model, not fine-tuned) | {base_bot:.4f} | {base_user:.4f} |")
    for train_on, label in (("all", "every token (no mask)"), ("bot", "the bot's replies (mask)")):
        bot = statistics.mean(b for b, _ in results[train_on])
        user = statistics.mean(u for _, u in results[train_on])
        print(f"| {label} | {bot:.4f} | {user:.4f} |")
    gap = [a[0] - b[0] for a, b in zip(results["all"], results["bot"])]
    print(f"\nmask minus no mask on bot replies, per seed: {', '.join(f'{-g:+.4f}' for g in gap)} nats/token")
    print(f"(data and runs in {work})")


if __name__ == "__main__":
    main()
