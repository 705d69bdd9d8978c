"""Time to the first step: `mtgpt train` of the demo model (4 x 256, context 32 here) on 2 CPU ranks for one step,
whole command timed, and each phase as the run itself records it (last_stop.json "seconds":
checks, launcher, imports, DeepSpeed initialize, data and resume, first step, final save).
The rest of the wall time is the last step's evaluation and the processes' exits.

    python benchmarks/startup.py                          # this checkout, 5 runs, medians
    python benchmarks/startup.py --other /tmp/before      # also another checkout, runs alternating

Each command starts from nothing (a fresh run folder), so DeepSpeed's and torch's on-disk caches
are warm but nothing else is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(checkout: Path, data: Path, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mtgpt", "train", "--data", str(data), "--out", str(out), "--nproc", "2",
                    "--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--block-size", "32", "--micro-batch", "4", "--max-steps", "1",
                    "--eval-samples", "8"], check=True, capture_output=True, env=env, cwd=checkout)
    wall = time.perf_counter() - began
    phases = json.loads((out / "last_stop.json").read_text()).get("seconds", {})
    rest = wall - sum(phases.values())
    return {**phases, "rest: last evaluation, exits": rest, "whole command": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--other", type=Path, help="another mtgpt checkout to compare (e.g. a git worktree)")
    args = p.parse_args()
    if args.other and not (args.other / "mtgpt" / "__init__.py").is_file():  # (else the installed mtgpt ran)
        p.error(f"--other {args.other} is not an mtgpt checkout (no mtgpt/__init__.py in it)")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    checkouts = {"this": REPO, **({"other": args.other.resolve()} if args.other else {})}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "mtgpt", "prepare", str(REPO / "tests" / "data" / "sonnets.txt"),
                        "--out", str(tmp / "data"), "--block-size", "32", "--val-fraction", "0.1", "--quiet"], check=True, cwd=REPO)
        one_run(REPO, tmp / "data", tmp / "warm")  # DeepSpeed's JIT and the file caches, once
        results: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
        for _ in range(args.runs):
            for name, checkout in checkouts.items():
                results[name].append(one_run(checkout, tmp / "data", tmp / name))
    phases = list(dict.fromkeys(k for rs in results.values() for r in rs for k in r))
    print(f"mtgpt train, demo model (4 x 256), 2 CPU ranks, 1 step; median of {args.runs} runs (seconds)")
    print(f"{'phase':<24}" + "".join(f"{name:>10}" for name in checkouts))
    for phase in phases:
        cells = []
        for name in checkouts:
            values = [r[phase] for r in results[name] if phase in r]
            cells.append(f"{statistics.median(values):10.2f}" if values else f"{'-':>10}")
        print(f"{phase:<24}" + "".join(cells))


if __name__ == "__main__":
    from _children import run_main  # (benchmarks/ is the script's folder, first on sys.path)

    run_main(main)
