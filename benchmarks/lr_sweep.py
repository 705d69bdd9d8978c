"""A short learning-rate sweep for the default model (6 layers, 6 heads, 384 wide, context 512) on
the demo corpus, through `mtgpt train` on 2 CPU ranks. Prints val loss per learning rate.

    python benchmarks/lr_sweep.py --lrs 5e-5 3e-4 1e-3 3e-3 --steps 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 3e-4, 6e-4, 1e-3, 2e-3, 4e-3])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--ds-config", default="zero1_bf16")
    parser.add_argument("--data", type=Path, help="a block-512 data folder (default: prepare shakespeare)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "shakespeare"
        if args.data is None:
            subprocess.run([sys.executable, "-m", "mtgpt", "prepare", "shakespeare", "--out", str(data),
                            "--block-size", "512", "--val-fraction", "0.02", "--quiet"], check=True)
        tokens = args.steps * args.micro_batch * 2 * 512
        print(f"default model, {args.steps} steps x {args.micro_batch * 2} x 512 = {tokens:,} tokens, "
              f"2 CPU ranks, {args.ds_config}, warmup 5%, cosine to 10%")
        print(f"{'lr':>8} {'val loss':>9} {'best val':>9} {'train loss':>11} {'minutes':>8}")
        for lr in args.lrs:
            run = Path(tmp) / f"lr{lr:g}"
            start = time.time()
            subprocess.run([sys.executable, "-m", "mtgpt", "train", "--data", str(data), "--out", str(run),
                            "--nproc", "2", "--micro-batch", str(args.micro_batch), "--lr", str(lr),
                            "--max-steps", str(args.steps), "--eval-every", str(max(1, args.steps // 4)),
                            "--eval-samples", "64", "--save-every", str(10 * args.steps),
                            "--ds-config", args.ds_config], check=True, capture_output=True)
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            val = [r["val/loss"] for r in rows if "val/loss" in r]
            train = [r["train/loss"] for r in rows if "train/loss" in r]
            print(f"{lr:>8g} {val[-1]:>9.3f} {min(val):>9.3f} {train[-1]:>11.3f} {(time.time() - start) / 60:>8.1f}",
                  flush=True)


if __name__ == "__main__":
    from _children import run_main  # (benchmarks/ is the script's folder, first on sys.path)

    run_main(main)
