"""One command on a lent GPU: does mtgpt train, resume, sample and export there, and how fast?

    make gpu-check                          # = python benchmarks/gpu_check.py (one GPU, ~10 minutes)
    python benchmarks/gpu_check.py --tiny   # the same checks, tiny model, on CPU (the test suite runs it)

Writes gpu_report.json and gpu_report.md (a Markdown table headed by the device's name) into
--out, and prints the table. Each check runs on its own; one that fails is reported as failed
(with its error) and the others still run; the exit status is 1 if any failed.

  throughput  the seed model (6 x 384, context 512, batch 64, bf16) through mtgpt's DeepSpeed
              path, zero0_bf16 (the GPU default) and zero1_bf16, against the plain compiled PyTorch
              loop (benchmarks/train_throughput.py): tokens/s, MFU, peak memory, ratio, host syncs,
              and a profile of 3 steps of each (ms per kernel category, the device's idle time)
  loss        the output layer and its cross-entropy, forward + backward, over the seed model's
              32768 tokens and 50304 vocabulary rows, three ways: logits with the padding masked
              (mtgpt on a GPU) or sliced off, and fused, the logits never whole (mtgpt train on
              CPU): ms and peak memory each, the same loss and gradients, whether mtgpt's way here
              is the fastest (benchmarks/loss_speed.py)
  fused       the throughput check's plain loop and zero0_bf16 with the fused loss: tokens/s and
              peak memory against the throughput check's (does it reach 1.8 M tokens/s?)
  defaults    `mtgpt train` with the defaults a user gets here: the micro-batch chosen, tokens/s,
              memory against the estimate, what one evaluation costs at the old and the new cadence
  configs     20 steps of each of the 12 bundled DeepSpeed configs on real shards (`mtgpt
              prepare` of --text), loss going down (DeepSpeed's fp16 needs a GPU: zero1-3_fp16
              are not run on CPU)
  compile     graph breaks of the compiled model through DeepSpeed: zero0_bf16 (autocast), ZeRO 1, 3
  resume      SIGKILL after a save, `--resume auto`: the same losses as an uninterrupted run (fp32)
  hf_export   logits of the exported Hugging Face model against mtgpt's, on the device
  sampling    mtgpt's sampler (a CUDA graph per token on a GPU) against Hugging Face generate() on
              the exported model (benchmarks/sample_speed.py), batch 1; graph and eager tokens agree
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64}
SEED_MODEL = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 512}
CONFIGS = [f"zero{stage}_{precision}" for stage in range(4) for precision in ("fp32", "bf16", "fp16")]


def model_args(shape: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]


def mtgpt(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mtgpt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"mtgpt {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


# --- the checks: each returns a dict of numbers with "ok" ------------------------------------

def train_throughput(args, out: Path, *more: str) -> dict:
    """benchmarks/train_throughput.py on the seed model at batch 64 in bf16 (tiny: fp32), its JSON."""
    shape = TINY if args.tiny else SEED_MODEL
    cmd = [sys.executable, str(HERE / "train_throughput.py"), "--json", str(out), *model_args(shape),
           "--batch", "4" if args.tiny else "64", "--precision", "fp32" if args.tiny else "bf16",
           "--steps", "3" if args.tiny else "30", "--warmup", "1" if args.tiny else "10", "--repeat", "1", *more]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    return json.loads(out.read_text())


def throughput(args, work: Path) -> dict:
    shape = TINY if args.tiny else SEED_MODEL
    r = train_throughput(args, work / "throughput.json", "--profile")
    import torch

    from mtgpt import monitor
    from mtgpt.config import ModelConfig
    from mtgpt.model import flops_per_token

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = monitor.peak_flops(device, r["precision"])
    per_token = flops_per_token(ModelConfig(**shape, vocab_multiple=r["model"]["vocab_multiple"]))
    mfu = {mode: rate * per_token / peak for mode, rate in r["tokens_per_s"].items()} if peak else None
    default = r["configs"][0]  # ZeRO-0: what `mtgpt train` runs on a GPU (torch autocast)
    ratio_goal = r["ratio"][default] >= 0.97
    speed_goal = r["tokens_per_s"][default] >= 1.8e6 if "H100" in r["device"] else None  # an H100's number
    return {"ok": all(x > 0 for x in r["ratio"].values()), **r, "default": default, "mfu": mfu,
            "meets_ratio_goal": None if args.tiny else ratio_goal, "meets_speed_goal": None if args.tiny else speed_goal,
            "goal": "ratio >= 0.97; >= 1.8 M tokens/s on an H100"}


def configs(args, work: Path, data: Path) -> dict:
    out = work / "configs.json"
    subprocess.run([sys.executable, __file__, "--child", "configs", "--data", str(data), "--child-out", str(out),
                    *(["--tiny"] if args.tiny else [])], check=True, capture_output=True, text=True, timeout=1200)
    found = json.loads(out.read_text())
    ran = {k: v for k, v in found.items() if "first" in v}
    return {"ok": bool(ran) and all(v["last"] < v["first"] for v in ran.values()), "runs": found}


def compile_breaks(args, work: Path, data: Path) -> dict:
    out = work / "compile.json"
    subprocess.run([sys.executable, __file__, "--child", "compile", "--data", str(data), "--child-out", str(out),
                    *(["--tiny"] if args.tiny else [])], check=True, capture_output=True, text=True, timeout=1200)
    found = json.loads(out.read_text())
    return {"ok": all(found[k]["graph_breaks"] == 0 and found[k]["graphs"] >= 1 for k in ("zero0_bf16", "zero1")),
            **found}


def resume(args, work: Path, data: Path) -> dict:
    steps, save = (8, 4) if args.tiny else (40, 20)
    common = ["--data", data, "--nproc", "1", "--ds-config", "zero1_fp32", *model_args(TINY if args.tiny else
              {**SEED_MODEL, "block_size": 128}), "--micro-batch", "4", "--lr", "3e-3", "--log-every", "1",
              "--eval-every", "1000", "--max-steps", steps, "--no-compile"]
    mtgpt("train", *common, "--out", work / "straight", "--save-every", 1000)
    run = work / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mtgpt", "train", *map(str, common), "--out", str(run),
                             "--save-every", str(save)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = run / "checkpoints" / f"step_{save:08d}" / "COMPLETE"
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    # a crash of the whole job (the machine, the OOM killer): SIGKILL to every process, the ranks first
    # (`mtgpt train` alone killed is no crash: its launcher then stops the ranks cleanly, and they save)
    tree = psutil.Process(proc.pid).children(recursive=True)
    for p in [*reversed(tree), psutil.Process(proc.pid)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)
    killed_at = max(losses(run), default=0)
    mtgpt("train", *common, "--out", run, "--save-every", save, "--resume", "auto")
    want, got = losses(work / "straight"), losses(run)
    return {"ok": killed_at < steps and got == want, "killed_at_step": killed_at, "steps": steps,
            "max_abs_loss_difference": max(abs(want[s] - got.get(s, math.inf)) for s in want)}


def defaults(args, work: Path) -> dict:
    """`mtgpt train` as a user starts it here: the seed model on block-512 shards, no batch or
    cadence options. The micro-batch it chose, tokens/s and MFU through the CLI, peak memory
    against the estimate that chose the micro-batch, and what one evaluation (val loss, best/
    export, a sample) costs, as a share of the time at the old cadence (200 steps) and the new GPU
    default (train.GPU_EVAL_EVERY)."""
    import torch

    from mtgpt.config import ModelConfig
    from mtgpt.model import training_bytes_per_token
    from mtgpt.train import CPU_EVAL_EVERY, GPU_EVAL_EVERY

    shape = TINY if args.tiny else SEED_MODEL
    data, run = work / "data_context", work / "defaults"
    mtgpt("prepare", *(args.text_args), "--out", data, "--block-size", shape["block_size"], "--val-fraction", "0.05",
          "--quiet")
    steps, every = (9, 3) if args.tiny else (300, 100)
    mtgpt("train", "--data", data, "--out", run, "--nproc", "1", "--max-steps", steps, "--eval-every", every,
          "--log-every", every // 3, *model_args(shape), timeout=900)
    cfg = json.loads((run / "train_config.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][1:]  # the first interval compiles
    evals = sorted(r["perf/eval_seconds"] for r in rows if "perf/eval_seconds" in r)
    micro, block = cfg["micro_batch"], cfg["model"]["block_size"]
    rate = sorted(rates)[len(rates) // 2]
    step_s = micro * block / rate
    eval_s = evals[len(evals) // 2]  # the median: the first evaluation is the slowest (cold)
    cuda = torch.cuda.is_available()
    memory = [r["perf/gpu_mem_gb"] for r in rows if "perf/gpu_mem_gb" in r]
    estimate = micro * block * training_bytes_per_token(ModelConfig(**cfg["model"]), "bf16" if cuda else "fp32")
    share = lambda n: eval_s / (n * step_s + eval_s)  # noqa: E731
    return {"ok": bool(rates) and bool(evals), "micro_batch": micro, "eval_every_default":
            GPU_EVAL_EVERY if cuda else CPU_EVAL_EVERY, "tokens_per_s": rate, "step_seconds": step_s,
            "eval_seconds": evals, "eval_share_every_200": share(200), "eval_share_default":
            share(GPU_EVAL_EVERY if cuda else CPU_EVAL_EVERY), "peak_memory_gib": max(memory) if memory else None,
            "estimated_activation_gib": estimate / 2**30, "mfu": ([r["perf/mfu"] for r in rows if "perf/mfu" in r]
                                                                 or [None])[-1]}


def loss(args, work: Path) -> dict:
    out = work / "loss.json"
    subprocess.run([sys.executable, str(HERE / "loss_speed.py"), "--json", str(out),
                    *(["--rows", "256", "--vocab-size", "4096", "--dtype", "fp32", "--repeat", "1", "--iters", "1"]
                      if args.tiny else [])],
                   check=True, capture_output=True, text=True, timeout=900)
    r = json.loads(out.read_text())
    d = r["relative_differences"]
    exact = d["sliced"]["loss"] < 1e-4 and max(d["sliced"]["grad_x"], d["sliced"]["grad_w"]) < 1e-6
    close = d["fused"]["loss"] < 1e-3 and max(d["fused"]["grad_x"], d["fused"]["grad_w"]) < 2e-2  # bf16's rounding
    return {"ok": exact and close and r["padding_grad_max"] == 0, **r}


def fused(args, work: Path, report: dict) -> dict:
    """The throughput check's runs (plain loop, zero0_bf16) with the fused loss, against its numbers."""
    r = train_throughput(args, work / "fused.json", "--zero", "0", "--loss", "fused")
    before = report["checks"].get("throughput", {})
    default = r["configs"][0]
    faster = {mode: rate / before["tokens_per_s"][mode] for mode, rate in r["tokens_per_s"].items()
              if mode in before.get("tokens_per_s", {})}
    speed_goal = r["tokens_per_s"][default] >= 1.8e6 if "H100" in r["device"] and not args.tiny else None
    return {"ok": all(x > 0 for x in r["ratio"].values()), **r, "default": default,
            "versus_throughput_check": faster, "meets_speed_goal": speed_goal}


def sampling(args, work: Path) -> dict:
    out = work / "sampling.json"
    subprocess.run([sys.executable, str(HERE / "sample_speed.py"), "--json", str(out),
                    *(["--tiny", "--new-tokens", "32", "--repeat", "1"] if args.tiny else ["--repeat", "3"])],
                   check=True, capture_output=True, text=True, timeout=900)
    r = json.loads(out.read_text())
    # fp32: the graph replays the eager decoder's kernels, so the same tokens; in bf16 a near-tie may
    # part them (reported, with the logit difference up to there)
    agree = r.get("graph_vs_eager")
    return {"ok": r["mtgpt_tokens_per_s"] > 0 and (agree is None or agree["torch.float32"]["same_tokens"]), **r,
            "goal": "ratio >= 2 on a GPU"}


def hf_export(args, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mtgpt import hf
    from mtgpt.config import ModelConfig
    from mtgpt.model import GPT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = GPT(ModelConfig(**(TINY if args.tiny else SEED_MODEL))).eval()
    hf.export(dict(model.named_parameters()), model.config, work / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(work / "hf").eval().to(device)
    model = model.to(device)
    ids = torch.randint(0, model.config.vocab_size, (2, model.config.block_size), device=device)
    with torch.no_grad():
        ours, hf_logits = model(ids)[0].float(), theirs(ids).logits.float()
    diff = (ours - hf_logits).abs().max().item()
    return {"ok": hf_logits.shape[-1] == model.config.vocab_size and diff < 1e-3, "max_abs_logit_difference": diff,
            "vocab": hf_logits.shape[-1]}


# --- children: in-process DeepSpeed runs, one process per check ------------------------------

def child_configs(args) -> dict:
    import torch

    from mtgpt import ds_config, world
    from mtgpt.config import TrainConfig
    from mtgpt.train import fit, make_plan

    world.init()
    cuda = torch.cuda.is_available()
    steps = 6 if args.tiny else 20
    found = {}
    for name in CONFIGS:
        if not cuda and ds_config.precision(ds_config.find(name)[1]) == "fp16" and name != "zero0_fp16":
            found[name] = {"skipped": "DeepSpeed's fp16 needs a GPU (zero0_fp16, torch autocast, runs on CPU)"}
            continue
        run = Path(args.child_out).parent / "configs" / name
        cfg = TrainConfig(data=args.data, out=str(run), model=TINY if args.tiny else {**SEED_MODEL, "block_size": 128},
                          micro_batch=4 if args.tiny else 16, lr=3e-3, log_every=1, eval_every=1000,
                          max_steps=steps, ds_config=name, compile=False)
        began = time.time()
        fit(make_plan(cfg, world_size=1))
        loss = losses(run)
        found[name] = {"first": loss[1], "last": loss[steps], "seconds": round(time.time() - began, 1)}
    return found


def child_compile(args) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from mtgpt import world
    from mtgpt.config import TrainConfig
    from mtgpt.train import fit, make_plan

    world.init()
    found = {}
    for key, name in (("zero0_bf16", "zero0_bf16"), ("zero1", "zero1_fp32"), ("zero3", "zero3_fp32")):
        torch._dynamo.reset()
        counters.clear()
        run = Path(args.child_out).parent / "compile" / key
        cfg = TrainConfig(data=args.data, out=str(run), model=TINY if args.tiny else {**SEED_MODEL, "block_size": 128},
                          micro_batch=4, log_every=1, eval_every=1000, max_steps=3, ds_config=name, compile=True)
        fit(make_plan(cfg, world_size=1))
        found[key] = {"graphs": counters["stats"]["unique_graphs"],
                                 "graph_breaks": sum(counters["graph_break"].values()),
                                 "break_reasons": sorted(counters["graph_break"])[:5]}
    return found


# --- report -----------------------------------------------------------------------------------

def summary(name: str, r: dict) -> str:
    if "error" in r:
        return r["error"].strip().splitlines()[-1][:160]
    if name == "throughput":
        t, m, syncs = r["tokens_per_s"], r.get("mfu") or {}, r.get("host_syncs") or {}

        def one(mode: str) -> str:
            waits = f", host syncs per step {syncs[mode]['per_step']:g}" if syncs.get(mode) else ""
            where = f" {syncs[mode]['where']}" if syncs.get(mode) and syncs[mode]["per_step"] else ""
            mfu = f", MFU {m[mode]:.1%}" if m else ""
            prof = (r.get("profile") or {}).get(mode)
            if prof:
                idle = f", idle {prof['idle_ms_per_step']:.1f}" if prof["idle_ms_per_step"] is not None else ""
                where += (f" (ms per step: {prof['step_ms']:.1f}{idle}, kernels " +
                          ", ".join(f"{c} {ms:.1f}" for c, ms in prof["categories_ms"].items()) + ")")
            versus = f", ratio {r['ratio'][mode]:.3f}" if mode in r["ratio"] else ""
            return (f"{'plain' if mode == 'plain' else 'mtgpt ' + mode} {t[mode]:,.0f} tokens/s{versus}{mfu}, peak "
                    f"{r['memory_bytes'][mode] / 2**30:.2f} GiB{waits}{where}")

        goal = ""
        if r.get("meets_ratio_goal") is not None:
            goal = f"; the default {'meets' if r['meets_ratio_goal'] else 'misses'} the ratio goal (>= 0.97)"
            goal += {True: ", and 1.8 M tokens/s", False: ", and misses 1.8 M tokens/s on an H100",
                     None: " (1.8 M tokens/s is the goal on an H100, not this GPU)"}[r["meets_speed_goal"]]
        return (f"batch {r['batch']}, {r['precision']}, compile {r['compile']}, {r['memory_kind']} memory: "
                + "; ".join(one(mode) for mode in [*r["configs"], "plain"]) + goal)
    if name == "loss":
        d, mem = r["relative_differences"], r["peak_memory_bytes"]
        return (f"output layer + cross-entropy, forward + backward, {r['rows']} x {r['n_embd']} {r['dtype']} hidden "
                f"states, {r['padded']} rows: " + ", ".join(
                    f"{way} {r['ms'][way]:.2f} ms" + (f" {mem[way] / 2**30:.2f} GiB" if mem[way] is not None else "")
                    for way in ("sliced", "masked", "fused")) + f"; fastest {r['fastest']}, mtgpt takes "
                f"{r['mtgpt_takes']}" + (" (within noise)" if r["within_noise"] and r["fastest"] != r["mtgpt_takes"]
                                         else "") +
                "; relative differences to masked: " + ", ".join(
                    f"{way} loss {d[way]['loss']:.1e} gradients {max(d[way]['grad_x'], d[way]['grad_w']):.1e}"
                    for way in d))
    if name == "fused":
        t, versus = r["tokens_per_s"], r["versus_throughput_check"]
        goal = {True: "; meets 1.8 M tokens/s", False: "; misses 1.8 M tokens/s on an H100", None: ""}[
            r["meets_speed_goal"]]
        return "loss fused: " + "; ".join(
            f"{'plain' if mode == 'plain' else 'mtgpt ' + mode} {t[mode]:,.0f} tokens/s, peak "
            f"{r['memory_bytes'][mode] / 2**30:.2f} GiB" + (f", {versus[mode]:.3f}x the throughput check's"
                                                          if mode in versus else "") for mode in t) + goal
    if name == "configs":
        ran = {k: v for k, v in r["runs"].items() if "first" in v}
        return "; ".join(f"{k} {v['first']:.2f}->{v['last']:.2f}" for k, v in ran.items()) + \
            (f" ({len(r['runs']) - len(ran)} not run: DeepSpeed's fp16 needs a GPU)" if len(ran) < len(r["runs"]) else "")
    if name == "compile":
        return "; ".join(f"{k if '_' in k else 'ZeRO-' + k[-1]}: {v['graphs']} graph(s), {v['graph_breaks']} "
                         f"break(s)" if v["graphs"] else f"ZeRO-{k[-1]}: trained uncompiled (mtgpt does not compile "
                         "at stage 3)" for k, v in r.items() if k.startswith("zero"))
    if name == "resume":
        return (f"killed after step {r['killed_at_step']} of {r['steps']}, resumed: max |loss difference| "
                f"{r['max_abs_loss_difference']:.1e}")
    if name == "defaults":
        memory = (f"; peak {r['peak_memory_gib']:.1f} GiB (activation estimate {r['estimated_activation_gib']:.1f})"
                  if r["peak_memory_gib"] else "")
        mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""
        return (f"micro-batch {r['micro_batch']} chosen, {r['tokens_per_s']:,.0f} tokens/s{mfu}{memory}; one "
                f"evaluation {r['eval_seconds'][len(r['eval_seconds']) // 2]:.2f} s = {r['eval_share_every_200']:.1%} "
                f"of the time every 200 steps, {r['eval_share_default']:.1%} every {r['eval_every_default']}")
    if name == "sampling":
        eager = r.get("eager_per_token_sync_tokens_per_s")
        return (f"mtgpt {r['mtgpt_tokens_per_s']:.0f} vs HF generate() {r['hf_tokens_per_s']:.0f} tokens/s, "
                f"ratio {r['ratio']:.2f} ({r['dtype']}, {r['mode']})" +
                (f"; eager with a host sync per token {eager:.0f}; host syncs per {r['new_tokens']} tokens: graph "
                 f"{r['host_syncs']['graph']}, eager {r['host_syncs']['eager']}; graph vs eager: " + ", ".join(
                     f"{k[6:]} {'same tokens' if v['same_tokens'] else 'part at token ' + str(v['first_difference'])}"
                     f" (max logit difference {v['max_logit_difference']:.1e})" for k, v in r["graph_vs_eager"].items())
                 if eager else ""))
    if name == "hf_export":
        return f"max |logit difference| {r['max_abs_logit_difference']:.1e} over {r['vocab']} logits"
    return ""


def stop(signum: int, frame) -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    sys.exit(128 + signum)


def cell(text: str) -> str:
    """Text for a Markdown table cell: a | (as in "max |loss difference|") would end the cell there."""
    return text.replace("|", "\\|")


CHECKS = ("throughput", "loss", "fused", "defaults", "configs", "compile", "resume", "hf_export", "sampling")


def write_report(report: dict, out: Path) -> str:
    """gpu_report.json and gpu_report.md in `out`; returns the Markdown table."""
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1))
    lines = [f"### mtgpt gpu-check on {report['device']}{' (tiny mode)' if report['tiny'] else ''}", "",
             f"torch {report['torch']}, {report['seconds']:.0f} s in all", "", "| check | result | numbers |",
             "|---|---|---|"]
    lines += [f"| {name} | {'ok' if r['ok'] else 'FAILED'} | {cell(summary(name, r))} |"
              for name, r in report["checks"].items()]
    (out / "gpu_report.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model and few steps (CPU, for the test suite)")
    p.add_argument("--out", type=Path, default=Path("."), help="where gpu_report.json and gpu_report.md go")
    p.add_argument("--text", type=Path, help="text to prepare shards from (default: the built-in shakespeare corpus)")
    p.add_argument("--only", nargs="+", choices=CHECKS, metavar="CHECK",
                   help=f"run only these checks (of {', '.join(CHECKS)})")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = {"configs": child_configs, "compile": child_compile}[args.child](args)
        Path(args.child_out).write_text(json.dumps(result, indent=1))
        return

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU)"
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": device, "torch": torch.__version__, "tiny": args.tiny, "checks": {}}
    began = time.time()
    report["seconds"] = 0.0
    table = write_report(report, args.out)
    # `timeout`, Slurm or kill: SIGTERM kills the commands this started (ranks included: they would save on
    # into it) and ends this one as an exception, so the temporary folder (a GB of runs) is removed
    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        data = work / "data"
        text = args.text_args = [str(args.text)] if args.text else ["shakespeare"]
        mtgpt("prepare", *text, "--out", data, "--block-size", TINY["block_size"] if args.tiny else 128,
              "--val-fraction", "0.05", "--quiet")
        # the open questions first (a run cut short by a time limit keeps them)
        checks = {"throughput": lambda: throughput(args, work), "loss": lambda: loss(args, work),
                  "fused": lambda: fused(args, work, report),
                  "defaults": lambda: defaults(args, work),
                  "configs": lambda: configs(args, work, data), "compile": lambda: compile_breaks(args, work, data),
                  "resume": lambda: resume(args, work, data), "hf_export": lambda: hf_export(args, work),
                  "sampling": lambda: sampling(args, work)}
        assert tuple(checks) == CHECKS
        for name, check in checks.items():
            if args.only and name not in args.only:
                continue
            start = time.time()
            try:
                result = check()
            except Exception as e:  # one failed check is reported, the others still run
                stderr = getattr(e, "stderr", None) or ""
                result = {"ok": False, "error": f"{traceback.format_exc()}\n{stderr[-3000:]}"}
            result["seconds"] = round(time.time() - start, 1)
            report["checks"][name] = result
            print(f"{name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s) {summary(name, result)}",
                  flush=True)
            report["seconds"] = round(time.time() - began, 1)
            table = write_report(report, args.out)  # after every check: a run cut short keeps what it found
    print(table)
    sys.exit(0 if all(r["ok"] for r in report["checks"].values()) else 1)


if __name__ == "__main__":
    main()
