"""Benchmark the training loader: tokens/s one rank reads (its share of the global shuffled
order, random reads through memory maps, batching, int64 tensors), the way the training loop
draws them, from a local folder and from the same folder behind an HTTP server on 127.0.0.1.

    python benchmarks/loader.py                     # prepares ~50 MB of Shakespeare first
    python benchmarks/loader.py --data data/books   # or reads an existing data folder

Prints tokens/s for 0 DataLoader workers (all in the training process) and for 1 and 2 workers;
then rank 0 of 8 ranks reading a two-source mixture (0.7 / 0.3: every rank computes the sources of
all ranks' draws), chat data with loss masks (`prepare --format chat`: tokens plus a mask per
sample), and a mixture of the two; then, over HTTP, the fetch into the local cache (tokens/s, once
per machine) and the loader reading that copy.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from mtgpt.data import load_manifest  # noqa: E402
from mtgpt.data import remote  # noqa: E402
from mtgpt.data.loader import Split, TrainBatches  # noqa: E402


def over_http(data: Path, cache: Path, args) -> None:
    """Serve the folder on 127.0.0.1, fetch it as training does, then read the copy."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(data.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{data.name}"
    m = load_manifest(data)
    tokens = sum(m["splits"][s]["samples"] for s in ("train", "val")) * m["sample_tokens"]
    began = time.perf_counter()
    copy = remote.local_copy(url, cache, progress=False)
    seconds = time.perf_counter() - began
    server.shutdown()
    print(f"  HTTP ({url}): fetched {tokens:,} tokens into the cache in {seconds:.2f} s = "
          f"{tokens / seconds / 1e6:.0f} M tokens/s (once per machine)")
    runs = [measure(copy, 0, args.micro_batch, args.tokens) for _ in range(args.repeat)]
    print(f"  HTTP, then reading the cached copy, 0 workers: median {statistics.median(runs) / 1e6:.1f} M tokens/s "
          f"(min {min(runs) / 1e6:.1f}, max {max(runs) / 1e6:.1f}, {args.repeat} runs)")


class Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def measure(data: Path | list[Path], workers: int, micro_batch: int, tokens: int, world: int = 1,
            weights: list[float] | None = None) -> float:
    """Tokens/s that rank 0 of `world` reads from `data` (one folder, or a mixture's)."""
    folders = data if isinstance(data, list) else [data]
    splits = [Split(d, load_manifest(d), "train") for d in folders]
    batches = TrainBatches(splits, micro_batch, rank=0, world=world, seed=0, num_workers=workers, weights=weights)
    next(batches)  # start-up (worker processes, the first epoch's permutation) is not throughput
    per_batch = micro_batch * load_manifest(folders[0])["block_size"]
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
    parser.add_argument("--world", type=int, default=8, help="ranks for the mixture and mask measurements")
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
            report(f"{workers} workers", [measure(data, workers, args.micro_batch, args.tokens)
                                          for _ in range(args.repeat)])
        chat = chat_data(Path(tmp), m["block_size"])
        other = Path(tmp) / "other"  # a second text source: the same shards under another name
        if not other.exists():
            other.symlink_to(data.resolve(), target_is_directory=True)
        print(f"rank 0 of {args.world} ranks, 0 workers (tokens/s of that rank):")
        for label, folders, weights in (("one source", data, None), ("mixture of two text sources 0.7/0.3",
                                                                     [data, other], [0.7, 0.3]),
                                        ("chat data with loss masks", chat, None),
                                        ("mixture: text 0.7 + chat with masks 0.3", [data, chat], [0.7, 0.3])):
            report(label, [measure(folders, 0, args.micro_batch, args.tokens, args.world, weights)
                           for _ in range(args.repeat)])
        over_http(data.resolve(), Path(tmp) / "cache", args)


def report(label: str, runs: list[float]) -> None:
    print(f"  {label}: median {statistics.median(runs) / 1e6:.1f} M tokens/s "
          f"(min {min(runs) / 1e6:.1f}, max {max(runs) / 1e6:.1f}, {len(runs)} runs)")


def chat_data(tmp: Path, block_size: int) -> Path:
    """Chat data of conversations about as long as a sample, prepared with masks."""
    import json
    import random

    from mtgpt.data.prepare import prepare

    r = random.Random(0)
    words = "the a of to and in that it is was for on you he be with as by at have are this not but".split()
    path = tmp / "chat.jsonl"
    with path.open("w") as f:
        for _ in range(4000):
            turns = [{"role": "user" if i % 2 == 0 else "assistant",
                      "content": " ".join(r.choice(words) for _ in range(r.randint(5, 60)))} for i in range(8)]
            f.write(json.dumps({"messages": turns}) + "\n")
    out = tmp / "chat"
    prepare([str(path)], out, block_size=block_size, fmt="chat", quiet=True, overwrite=True)
    return out


if __name__ == "__main__":
    main()
