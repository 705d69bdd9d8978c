"""Benchmark the training loader: tokens/s one rank reads from shards (webdataset tar reading,
decoding, shuffle buffer, batching, int64 tensors), the way the training loop draws them.

    python benchmarks/loader.py                     # prepares ~50 MB of Shakespeare first
    python benchmarks/loader.py --data data/books   # or reads an existing data folder

Prints tokens/s for 0 DataLoader workers (all in the training process) and for 1 and 2 workers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from mtgpt.data import load_manifest  # noqa: E402
from mtgpt.data.loader import TrainBatches  # noqa: E402


def measure(data: Path, workers: int, micro_batch: int, tokens: int) -> float:
    m = load_manifest(data)
    batches = TrainBatches(data, m, micro_batch, rank=0, world=1, seed=0, num_workers=workers)
    next(batches)  # start-up (worker processes, first shuffle buffer fill) is not throughput
    per_batch = micro_batch * m["block_size"]
    n = max(1, tokens // per_batch)
    start = time.perf_counter()
    for _ in range(n):
        next(batches)
    return n * per_batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=30_000_000, help="tokens to read per measurement")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from prepare import make_text

            from mtgpt.data.prepare import prepare

            text = Path(tmp) / "text.txt"
            make_text(text, 50)
            data = Path(tmp) / "data"
            prepare([str(text)], data, block_size=512, shard_size_mb=20, quiet=True)
        m = load_manifest(data)
        print(f"loader: {data}, block size {m['block_size']}, {m['splits']['train']['samples'] * m['block_size']:,} "
              f"train tokens in {len(m['splits']['train']['shards'])} shards; micro-batch {args.micro_batch}")
        for workers in (0, 1, 2):
            runs = [measure(data, workers, args.micro_batch, args.tokens) for _ in range(args.repeat)]
            print(f"  {workers} workers: median {statistics.median(runs) / 1e6:.1f} M tokens/s "
                  f"(min {min(runs) / 1e6:.1f}, max {max(runs) / 1e6:.1f}, {args.repeat} runs)")


if __name__ == "__main__":
    main()
