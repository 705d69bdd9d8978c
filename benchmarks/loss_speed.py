"""The output layer's cross-entropy, forward + backward, two ways on the same padded logits:
the vocabulary's padding columns sliced off (what `mtgpt.model.cross_entropy` does on CPU) and
masked to -inf (what it does on a GPU). Same loss and gradients; the question is speed. On a GPU
the loss was a third of the seed model's training step (gpu-check's profile on an H200, when mtgpt
sliced everywhere: its backward kernel 5.3 ms and forward 2.7 ms of 23.6): the slice makes each
row 50257 values of a 50304 stride, which a compiled kernel over the flattened view cannot read or
write with vectorized accesses, and adds a zero-filled copy for the padded gradient; masking keeps
rows whole.

    python benchmarks/loss_speed.py                  # CPU: 2048 rows of 50304 logits, compiled
    python benchmarks/loss_speed.py --rows 32768     # GPU: the seed model's 64 x 512 batch

Prints milliseconds per forward + backward for each (median of --repeat alternating timings), the
ratio, the largest differences of loss and gradient between the two, and whether the way mtgpt
takes on this device is the faster one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mtgpt.model import cross_entropy


def sliced(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return cross_entropy(logits, targets, "mean", vocab_size, mask=False)  # what a CPU does


def masked(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return cross_entropy(logits, targets, "mean", vocab_size, mask=True)  # what a GPU does


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=None, help="logit rows (tokens): default 32768 on a GPU, 2048 on CPU")
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--vocab-multiple", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the logits' dtype (the loss is fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile each")
    p.add_argument("--iters", type=int, default=None, help="forward + backward per timing (default 20 GPU, 3 CPU)")
    p.add_argument("--repeat", type=int, default=5, help="alternating timings of each (the median is printed)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = p.parse_args()
    if args.vocab_multiple < 1 or args.vocab_size < 1:
        p.error("--vocab-size and --vocab-multiple must be at least 1")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    rows = args.rows or (32768 if cuda else 2048)
    iters = args.iters or (20 if cuda else 3)
    padded = -(-args.vocab_size // args.vocab_multiple) * args.vocab_multiple
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, padded, generator=g) * 2).to(device, dtype).requires_grad_()
    targets = torch.randint(0, args.vocab_size, (rows,), generator=g).to(device)
    targets[::17] = -1  # some not scored, as chat data has
    ways = {"sliced": sliced, "masked": masked}
    if args.compile:
        ways = {name: torch.compile(fn) for name, fn in ways.items()}

    def once(fn) -> tuple[torch.Tensor, torch.Tensor]:
        logits.grad = None
        loss = fn(logits, targets, args.vocab_size)
        loss.backward()
        return loss.detach(), logits.grad

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    results = {name: once(fn) for name, fn in ways.items()}  # warm-up (compiles) and the values compared
    results = {name: (loss.clone(), grad.clone()) for name, (loss, grad) in results.items()}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeat):
        for name, fn in ways.items():
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                once(fn)
            sync()
            times[name].append((time.perf_counter() - start) * 1e3 / iters)
    ms = {name: statistics.median(t) for name, t in times.items()}
    (loss_a, grad_a), (loss_b, grad_b) = results["sliced"], results["masked"]
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows, "vocab_size": args.vocab_size,
        "padded": padded, "dtype": args.dtype, "compile": args.compile, "ms": ms,
        "speedup": ms["sliced"] / ms["masked"],
        "mtgpt_takes": "masked" if cuda else "sliced",  # the rule in mtgpt.model.cross_entropy
        "mtgpt_takes_the_faster": ms["masked" if cuda else "sliced"] <= ms["sliced" if cuda else "masked"],
        # the timings' ranges overlap: the difference is this machine's noise, no reason to change the rule
        "within_noise": max(map(min, times.values())) <= min(map(max, times.values())),
        "loss_difference": (loss_a - loss_b).abs().item(),
        "grad_difference": (grad_a.float() - grad_b.float()).abs().max().item(),
        "padding_grad_max": grad_b[:, args.vocab_size:].abs().max().item() if padded > args.vocab_size else 0.0,
    }
    print(f"{report['device']}: cross-entropy forward + backward over {rows} x {padded} {args.dtype} logits "
          f"({args.vocab_size} scored columns), compile {args.compile}, median of {args.repeat} x {iters}")
    print(f"  sliced (mtgpt on CPU)    {ms['sliced']:8.2f} ms")
    print(f"  masked (mtgpt on a GPU)  {ms['masked']:8.2f} ms   speed-up {report['speedup']:.2f}x")
    print(f"  mtgpt takes the {report['mtgpt_takes']} loss here: "
          + ("as fast, within this machine's noise (the timings' ranges overlap)" if report["within_noise"]
             else "the faster one" if report["mtgpt_takes_the_faster"] else "the SLOWER one (change the rule)"))
    print(f"  |loss difference| {report['loss_difference']:.1e}, max |gradient difference| "
          f"{report['grad_difference']:.1e}, max |gradient| of a padding column {report['padding_grad_max']:.1e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
