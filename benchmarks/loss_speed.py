"""The output layer's cross-entropy, forward + backward, three ways: on the same padded logits,
the vocabulary's padding columns sliced off (what `mtgpt.model.cross_entropy` does on CPU) or
masked to -inf (what it does on a GPU); and fused, from the hidden states and the output layer's
weight, chunk by chunk, the logits never whole (`mtgpt.model.linear_cross_entropy`, what `mtgpt
train` does on CPU: mtgpt.train.fused_loss). The fused way's timing includes the output layer's
matmuls (forward and both of backward's); the other two are timed with the same matmuls, so all
three do the same work. Same loss and gradients; the questions are speed and memory. On a GPU
the loss was a third of the seed model's training step (gpu-check's profile on an H200, when mtgpt
sliced everywhere: its backward kernel 5.3 ms and forward 2.7 ms of 23.6): the slice makes each
row 50257 values of a 50304 stride, which a compiled kernel over the flattened view cannot read or
write with vectorized accesses, and adds a zero-filled copy for the padded gradient; masking keeps
rows whole.

    python benchmarks/loss_speed.py                  # CPU: 2048 rows of 50304 logits, compiled
    python benchmarks/loss_speed.py --rows 32768     # GPU: the seed model's 64 x 512 batch

Prints milliseconds per forward + backward for each (median of --repeat alternating timings), the
peak memory each allocates on a GPU, the largest differences of loss and gradients against the
masked way, and whether the way mtgpt takes on this device is the fastest.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from mtgpt.model import cross_entropy, linear_cross_entropy
from mtgpt.train import fused_loss


def sliced(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return cross_entropy(x @ w.T, targets, "mean", vocab_size, mask=False)  # cross_entropy on CPU


def masked(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return cross_entropy(x @ w.T, targets, "mean", vocab_size, mask=True)  # cross_entropy on a GPU


def fused(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int | None = None
          ) -> torch.Tensor:
    return linear_cross_entropy(x, w, targets, "mean", vocab_size, chunk=chunk)  # mtgpt train on CPU


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=None, help="tokens: default 32768 on a GPU, 2048 on CPU")
    p.add_argument("--n-embd", type=int, default=384, help="width of the hidden states")
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--vocab-multiple", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="hidden states' and weight's dtype "
                   "(the loss is fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile each")
    p.add_argument("--iters", type=int, default=None, help="forward + backward per timing (default 20 GPU, 3 CPU)")
    p.add_argument("--repeat", type=int, default=5, help="alternating timings of each (the median is printed)")
    p.add_argument("--chunk", type=int, help="the fused way's rows per chunk (default linear_cross_entropy's)")
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
    x = torch.randn(rows, args.n_embd, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(padded, args.n_embd, generator=g) * 0.1).to(device, dtype).requires_grad_()
    targets = torch.randint(0, args.vocab_size, (rows,), generator=g).to(device)
    targets[::17] = -1  # some not scored, as chat data has
    ways = {"sliced": sliced, "masked": masked, "fused": functools.partial(fused, chunk=args.chunk)}
    if args.compile:
        ways = {name: torch.compile(fn) for name, fn in ways.items()}

    def once(fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x.grad = w.grad = None
        loss = fn(x, w, targets, args.vocab_size)
        loss.backward()
        return loss.detach(), x.grad, w.grad

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    results, memory = {}, {}
    for name, fn in ways.items():  # warm-up (compiles), the values compared and the peak memory
        once(fn)
        x.grad = w.grad = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        results[name] = [t.clone() for t in once(fn)]
        memory[name] = torch.cuda.max_memory_allocated() - before if cuda else None
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

    def differences(name: str) -> dict:  # against the masked way
        (loss, gx, gw), (loss0, gx0, gw0) = results[name], results["masked"]
        return {"loss": (loss - loss0).abs().item(),
                "grad_x": (gx.float() - gx0.float()).abs().max().item() / gx0.float().abs().max().item(),
                "grad_w": (gw.float() - gw0.float()).abs().max().item() / gw0.float().abs().max().item()}

    takes = "fused" if fused_loss({}) else "masked" if cuda else "sliced"  # as mtgpt train (bundled JSONs)
    fastest = min(ms, key=ms.get)
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows, "n_embd": args.n_embd,
        "vocab_size": args.vocab_size, "padded": padded, "dtype": args.dtype, "compile": args.compile,
        "chunk": args.chunk, "ms": ms,
        "peak_memory_bytes": memory, "fastest": fastest, "mtgpt_takes": takes,
        # the timings' ranges overlap: the difference is this machine's noise, no reason to change the rule
        "within_noise": min(times[takes]) <= max(times[fastest]),
        "relative_differences": {name: differences(name) for name in ("sliced", "fused")},
        "padding_grad_max": max(results[n][2][args.vocab_size:].abs().max().item() if padded > args.vocab_size
                                else 0.0 for n in ways),
    }
    print(f"{report['device']}: output layer + cross-entropy, forward + backward, {rows} x {args.n_embd} "
          f"{args.dtype} hidden states, {padded} x {args.n_embd} weight ({args.vocab_size} scored rows), "
          f"compile {args.compile}, median of {args.repeat} x {iters}")
    for name, what in (("sliced", "logits, padding sliced"), ("masked", "logits, padding masked"),
                       ("fused", "no whole logits")):
        mem = f"   peak {memory[name] / 2**30:6.2f} GiB" if memory[name] is not None else ""
        diff = report["relative_differences"].get(name)
        diff = (f"   vs masked: |loss| {diff['loss']:.1e}, gradients x {diff['grad_x']:.1e} w {diff['grad_w']:.1e} "
                f"(relative)" if diff else "")
        print(f"  {name:7s} ({what:22s}) {ms[name]:8.2f} ms{mem}{diff}")
    print(f"  mtgpt train takes {takes} here: "
          + ("the fastest" if fastest == takes else
             f"as fast as {fastest}, within this machine's noise" if report["within_noise"] else
             f"SLOWER than {fastest} ({ms[takes] / ms[fastest]:.2f}x: change the rule)")
          + f"; max |gradient| of a padding row {report['padding_grad_max']:.1e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
