"""Benchmark `mtgpt prepare`: MB/s end to end and peak RSS, at 50 MB and 500 MB of text.

The input is the built-in Shakespeare corpora (both spellings, ~9.5 MB) repeated to size, written
to a temporary folder. Each size runs `mtgpt prepare` as a child process; its wall time and peak
RSS (the kernel's accounting for that child via wait4: mtgpt prepare is one process, its
tokenizers are threads) are printed.

    python benchmarks/prepare.py                 # 50 and 500 MB
    python benchmarks/prepare.py --sizes 50      # just 50 MB
    python benchmarks/prepare.py --sizes 500 --tokenizers gpt2 2048 16384   # own tokenizers too

A tokenizer given as a number of tokens is trained on the Shakespeare plays first (not timed).
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

from mtgpt import folders
from mtgpt.data.sources import corpus_files


def make_text(path: Path, mb: int) -> int:
    pieces = [p.read_bytes() for name in ("shakespeare", "shakespeare-folio") for p in corpus_files(name)]
    target = mb * 1_000_000
    written = 0
    with path.open("wb") as f:
        while written < target:
            for piece in pieces:
                f.write(piece)
                written += len(piece)
                if written >= target:
                    break
    return written


def run(text: Path, out: Path, extra: list[str]) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "mtgpt", "prepare", str(text), "--out", str(out), "--quiet", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare failed: {proc.stderr.read().decode()}")
    return seconds, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 500], help="input sizes in MB")
    parser.add_argument("--block-size", default="512")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (the machine is noisy: medians)")
    parser.add_argument("--keep", type=Path, help="keep the prepared data of the largest size here")
    parser.add_argument("--tokenizers", nargs="+", default=["gpt2"],
                        help="gpt2, a tokenizer folder, or a vocabulary size to train one of on the plays first")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.keep and args.keep.exists() and any(args.keep.iterdir()) and folders.kind(args.keep) != "data":
        parser.error(f"--keep {args.keep} holds something that is not a data folder (it would be replaced): give "
                     "an empty or new folder")
    print(f"mtgpt prepare, {os.cpu_count()} cores, block size {args.block_size}")
    print(f"{'input':>7} {'tokenizer':>10} {'seconds (median, min-max)':>26} {'MB/s':>6} {'peak RSS':>9} {'tokens':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = []
        for tok in args.tokenizers:
            if tok.isdigit():
                folder = Path(tmp) / f"tok-{tok}"
                subprocess.run([sys.executable, "-m", "mtgpt", "tokenizer", "train", "shakespeare", "--vocab-size", tok,
                                "--out", str(folder), "-q"], check=True, capture_output=True)
                tok = str(folder)
            tokenizers.append(tok)
        for mb in args.sizes:
            text = Path(tmp) / f"text_{mb}mb.txt"
            size = make_text(text, mb)
            out = Path(tmp) / f"data_{mb}"
            for tok in tokenizers:
                runs = []
                for _ in range(args.repeat):
                    shutil.rmtree(out, ignore_errors=True)
                    runs.append(run(text, out, ["--block-size", args.block_size, "--tokenizer", tok]))
                seconds = statistics.median(s for s, _ in runs)
                rss = max(r for _, r in runs)
                manifest = json.loads((out / "manifest.json").read_text())
                spread = f"{seconds:.1f} ({min(s for s, _ in runs):.1f}-{max(s for s, _ in runs):.1f})"
                print(f"{size / 1e6:>5.0f}MB {manifest['tokenizer']['name']:>10} {spread:>26} {size / 1e6 / seconds:>6.1f} "
                      f"{rss / 2**20:>7.0f}MB {manifest['tokens']:>13,}", flush=True)
            text.unlink()
            if args.keep and mb == max(args.sizes):
                shutil.rmtree(args.keep, ignore_errors=True)  # (a data folder of an earlier run: checked above)
                shutil.move(str(out), args.keep)


if __name__ == "__main__":
    from _children import run_main  # (benchmarks/ is the script's folder, first on sys.path)

    run_main(main)
