"""Training throughput: mtgpt's DeepSpeed path against a plain PyTorch loop, same model, batch,
precision and data, one process each. Prints tokens/s, peak memory, the ratio, and how often a
step reads a value back to the host (on a GPU each read is a host sync).

    python benchmarks/train_throughput.py                       # CPU: seed model, batch 4, bf16
    python benchmarks/train_throughput.py --batch 64 --steps 50 # GPU: the reference setting
    python benchmarks/train_throughput.py --zero 0 1 2          # which bundled zero{N}_{precision}
    python benchmarks/train_throughput.py --batch 64 --loss sliced  # the padding's loss forced one way
    python benchmarks/train_throughput.py --batch 64 --loss fused   # the loss without whole logits

The DeepSpeed path is what `mtgpt train` runs: `mtgpt.train.build_engine` (model compiled in
place before deepspeed.initialize on GPUs, DeepSpeed-managed AdamW, gradient clipping 1.0) with
the bundled zero{N}_{precision} JSON (default: ZeRO-0, the GPU default's torch autocast, and
ZeRO-1, DeepSpeed's ZeRO optimizer), and `mtgpt.train.train_step`. The plain loop is a hand-written
step: autocast, loss.backward(), clip_grad_norm_, AdamW (fused), torch.compile on GPU. All see
the same random token batches. Host reads: on CUDA, PyTorch's sync debug mode; on CPU,
mtgpt.monitor.HostReads (the calls that would sync on a GPU), each with where they are made.
With --profile, 3 more steps of each under torch.profiler: milliseconds per step by kernel
category (matmul, attention, loss, optimizer, ...) and, on a GPU, the device's idle time between
kernels, so a gap between the two sides shows where it is.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch


LOSSES = ["auto", "sliced", "masked", "fused"]  # --loss


def set_loss(model, loss: str, precision: str) -> None:
    """--loss: GPT.fused_loss, or not and GPT.mask_padding; auto as `mtgpt train` with zero0_{precision}
    (on CPU fused but in fp16, on a GPU masked: mtgpt.train.fused_loss, mtgpt.model.cross_entropy)."""
    from mtgpt import ds_config
    from mtgpt.train import fused_loss

    model.mask_padding = {"sliced": False, "masked": True}.get(loss)
    model.fused_loss = loss == "fused" or loss == "auto" and fused_loss(ds_config.find(f"zero0_{precision}")[1])


def batches(batch: int, block: int, vocab: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (8, batch, block + 1), generator=g)
    i = 0
    while True:
        chunk = data[i % 8].to(device, non_blocking=True)
        i += 1
        yield chunk[:, :-1], chunk[:, 1:]


def run_plain(args, cfg, device) -> float:
    from mtgpt.model import GPT

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    set_loss(model, args.loss, args.precision)
    if args.compile:
        model.compile()
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3, betas=(0.9, 0.95), fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    it = batches(args.batch, cfg.block_size, cfg.vocab_size, device)

    def step():
        x, y = next(it)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_deepspeed(args, cfg, device) -> float:
    from mtgpt import ds_config, world
    from mtgpt.config import TrainConfig
    from mtgpt.model import GPT
    from mtgpt.train import Plan, build_engine, train_step

    world.init()
    tc = TrainConfig(data="-", out="-", model=cfg, micro_batch=args.batch, compile=args.compile)
    _, raw = ds_config.find(f"zero{args.stage}_{args.precision}")
    ds = ds_config.resolve(tc, raw, 1, 10_000, cuda=device.type == "cuda")
    torch.manual_seed(0)
    model = GPT(cfg)
    engine = build_engine(Plan(tc, ds, "", [{}], [1.0], 1, 10_000, None), model)
    if args.loss != "auto":
        set_loss(model, args.loss, args.precision)  # over build_engine's choice
    it = batches(args.batch, cfg.block_size, cfg.vocab_size, device)
    return lambda: train_step(engine, it, 1)


def timed(step, args, device) -> float:
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def host_syncs(step, device: torch.device, steps: int = 3) -> dict:
    """How often a step makes the host wait for the device, and where (file:line of the caller
    outside torch, most frequent first). On CUDA, PyTorch's sync debug mode warns at each sync; on
    CPU, mtgpt.monitor.HostReads counts the calls that read a value back (each a sync on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                step()
        torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        where = Counter(f"{'/'.join(Path(w.filename).parts[-3:])}:{w.lineno}" for w in syncs)
        return {"per_step": len(syncs) / steps, "where": dict(where.most_common(5)), "how": "cuda sync debug mode"}
    from mtgpt.monitor import HostReads

    with HostReads() as seen:
        for _ in range(steps):
            step()
    return {"per_step": seen.total / steps, "where": dict(seen.reads.most_common(5)), "how": "HostReads (CPU)"}


# what a kernel (GPU) or an operator (CPU) name says it is, first match wins
CATEGORIES = [("loss", ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")),
              ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
              ("layernorm", ("layer_norm", "layernorm")),
              ("optimizer", ("adam", "multi_tensor", "foreach", "clip")),
              ("matmul", ("gemm", "matmul", "cutlass", "xmma", "nvjet", "aten::mm", "aten::addmm", "aten::bmm",
                          "aten::linear")),
              ("communication", ("nccl", "allreduce", "all_reduce", "gloo")),
              ("copies", ("memcpy", "memset", "copy_", "fill_"))]


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profiled(step, device: torch.device, step_ms: float, steps: int = 3) -> dict:
    """Where a step's time goes: milliseconds per step by kernel category (on CUDA the kernels'
    own device time; on CPU the operators' self time), the ten largest kernels or operators, and on
    CUDA the device's idle time: `step_ms` (a step timed without the profiler, which slows the
    host) less the kernels' time, i.e. what host overhead and syncs cost."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    totals: Counter = Counter()
    if cuda:  # kernels and copies: events that ran on the device
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                totals[e.name] += e.time_range.elapsed_us()
    else:  # operators' self time (nested ones are not counted twice)
        for e in prof.key_averages():
            totals[e.key] += e.self_cpu_time_total
    by_category: Counter = Counter()
    for name, us in totals.items():
        by_category[category(name)] += us / 1e3 / steps
    busy = sum(by_category.values())
    return {"step_ms": step_ms, "busy_ms_per_step": busy, "idle_ms_per_step": max(step_ms - busy, 0.0) if cuda else None,
            "categories_ms": {c: round(ms, 3) for c, ms in by_category.most_common()},
            "top": [[name[:120], round(us / 1e3 / steps, 3)] for name, us in totals.most_common(10)],
            "how": "torch.profiler, CUDA kernels" if cuda else "torch.profiler, CPU operators' self time"}


def child(args) -> None:
    from mtgpt.config import ModelConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    multiple = args.vocab_multiple or (64 if device.type == "cuda" else 1)  # as `mtgpt train` pads by default
    cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                      vocab_size=args.vocab_size, vocab_multiple=multiple)
    step = (run_deepspeed if args.mode == "deepspeed" else run_plain)(args, cfg, device)
    seconds = timed(step, args, device)
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    syncs = host_syncs(step, device) if not args.compile or device.type == "cuda" else None
    prof = profiled(step, device, seconds * 1e3 / args.steps) if args.profile else None
    print(json.dumps({"tokens_per_s": args.steps * args.batch * args.block_size / seconds, "gpu_memory": memory,
                      "host_syncs": syncs, "profile": prof,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["deepspeed", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1], choices=[0, 1, 2, 3],
                   help="ZeRO stages to run (bundled zero{N}_{precision})")
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--vocab-multiple", type=int, default=None,
                   help="pad the vocabulary to a multiple of this (default: as mtgpt train, 64 on a GPU, 1 on CPU)")
    p.add_argument("--loss", choices=LOSSES, default="auto",
                   help="both sides' loss: auto as mtgpt train (fused on CPU, padding masked on a GPU: "
                        "mtgpt.train.fused_loss), or forced: sliced or masked (mtgpt.model.cross_entropy), fused "
                        "(from the hidden states, no whole logits: mtgpt.model.linear_cross_entropy)")
    p.add_argument("--repeat", type=int, default=3, help="alternating runs of each (medians are printed)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile both (default: on GPUs)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 3 more steps of each: milliseconds per kernel category, idle time")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args()
    if args.compile is None:
        args.compile = torch.cuda.is_available()
    if args.mode:
        return child(args)
    modes = ["plain", *(f"zero{z}_{args.precision}" for z in args.zero)]
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.repeat):  # alternate them, so a noisy machine hits all alike
        for mode in modes:
            stage = ["--mode", "plain"] if mode == "plain" else ["--mode", "deepspeed", "--stage", mode[4:].split("_")[0]]
            proc = subprocess.run([sys.executable, __file__, *stage, *sys.argv[1:]], stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{mode} failed")
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rate = {mode: statistics.median(r["tokens_per_s"] for r in rs) for mode, rs in runs.items()}
    ratio = {mode: statistics.median(d["tokens_per_s"] / p["tokens_per_s"] for d, p in zip(rs, runs["plain"]))
             for mode, rs in runs.items() if mode != "plain"}
    print(f"{runs['plain'][0]['device']}: {args.n_layer} layers x {args.n_embd} wide, context {args.block_size}, "
          f"batch {args.batch}, {args.precision}, compile {args.compile}, loss {args.loss}, {args.steps} timed steps after "
          f"{args.warmup}, median of {args.repeat} alternating runs")
    for mode, rs in runs.items():
        r = rs[0]
        mem = (f"peak GPU memory {max(x['gpu_memory'] for x in rs) / 2**30:.2f} GiB" if r["gpu_memory"]
               else f"peak RSS {max(x['peak_rss'] for x in rs) / 2**30:.2f} GiB")
        name = "plain PyTorch loop" if mode == "plain" else f"mtgpt DeepSpeed {mode}"
        versus = f"  ratio {ratio[mode]:.3f}" if mode in ratio else ""
        syncs = (f"   host syncs per step {r['host_syncs']['per_step']:g} {r['host_syncs']['where']}"
                 if r["host_syncs"] else "")
        print(f"  {name:32s} {rate[mode]:>12,.0f} tokens/s{versus}   {mem}{syncs}")
        if r.get("profile"):
            prof = r["profile"]
            idle = f", idle {prof['idle_ms_per_step']:.2f}" if prof["idle_ms_per_step"] is not None else ""
            print(f"    per step (ms): {prof['step_ms']:.2f}, kernels {prof['busy_ms_per_step']:.2f}{idle}; "
                  + ", ".join(f"{c} {ms:.2f}" for c, ms in prof["categories_ms"].items()))
    if args.json:
        memory = {mode: max((x["gpu_memory"] or x["peak_rss"]) for x in rs) for mode, rs in runs.items()}
        Path(args.json).write_text(json.dumps({
            "device": runs["plain"][0]["device"], "batch": args.batch, "precision": args.precision, "loss": args.loss,
            "configs": modes[1:], "compile": args.compile, "tokens_per_s": rate, "memory_bytes": memory,
            "memory_kind": "gpu" if runs["plain"][0]["gpu_memory"] else "rss", "ratio": ratio,
            "host_syncs": {mode: rs[0]["host_syncs"] for mode, rs in runs.items()},
            "profile": {mode: rs[0].get("profile") for mode, rs in runs.items()},
            "model": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                      "block_size": args.block_size, "vocab_size": args.vocab_size,
                      "vocab_multiple": args.vocab_multiple or (64 if torch.cuda.is_available() else 1)}}, indent=1))

if __name__ == "__main__":
    main()
