"""Generation speed at batch 1: mtgpt's sampler (KV cache) against Hugging Face `generate()` on
the exported model, same weights, same settings, one device.

    python benchmarks/sample_speed.py                       # default model (6 x 384, ctx 512), CPU
    python benchmarks/sample_speed.py --run runs/demo       # a trained run instead of random weights

Both generate --new-tokens tokens after the same prompt with top-k 200, temperature 0.8 (and
greedy, --greedy); the time of each is the median of --repeat runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run folder (default: the default model, random weights)")
    p.add_argument("--new-tokens", type=int, help="default: 256, or 64 with --tiny (whose context is 128)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="weights of both (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (a quick check, not a benchmark)")
    args = p.parse_args()
    args.new_tokens = args.new_tokens or (64 if args.tiny else 256)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from mtgpt import checkpoint, hf, tokenizer
    from mtgpt.config import ModelConfig
    from mtgpt.model import GPT
    from mtgpt.sample import SampleConfig, on_host, stream

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = tokenizer.gpt2()
    if args.run:
        model, tok = checkpoint.load_model(args.run), checkpoint.load_tokenizer(args.run)  # (its own vocabulary)
    else:
        torch.manual_seed(0)
        shape = dict(n_layer=2, n_head=2, n_embd=64, block_size=128) if args.tiny else {}
        model = GPT(ModelConfig(**shape)).eval()
    prompt = tok.encode("Shall I compare thee to a summer's day? Thou art more lovely and more temperate:")
    if len(prompt) + args.new_tokens > model.config.block_size:  # (generate() fails past the positions it has)
        p.error(f"--new-tokens {args.new_tokens} and the {len(prompt)}-token prompt exceed the model's context of "
                f"{model.config.block_size}: give --new-tokens {model.config.block_size - len(prompt)} or fewer")
    with tempfile.TemporaryDirectory() as tmp:
        hf.export(dict(model.named_parameters()), model.config, tmp, tok)
        theirs = AutoModelForCausalLM.from_pretrained(tmp).eval()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model, theirs = model.to(device, dtype), theirs.to(device, dtype)
    temperature, top_k = (0.0, None) if args.greedy else (0.8, 200)
    cfg = SampleConfig(max_new_tokens=args.new_tokens, temperature=temperature, top_k=top_k, seed=0,
                       stop_at_eot=False)

    def ours(decoder: str = "auto", ahead: int | None = None) -> int:
        # as `mtgpt sample` and `generate` consume it: token ids on the host (default: 16 at a time on a GPU)
        return sum(1 for _ in on_host(stream(model, prompt, cfg, decoder=decoder), ahead))

    def agreement(m) -> dict:
        """The graphed decoder against the fixed-shape eager one (same seed): the same tokens? If
        not, where they part, and the largest logit difference up to there (same inputs until then)."""
        runs = {d: list(stream(m, prompt, cfg, decoder=d)) for d in ("graph", "fixed")}
        tokens = {d: [t.tolist() for t, _ in r] for d, r in runs.items()}
        n = next((i for i, (a, b) in enumerate(zip(tokens["graph"], tokens["fixed"])) if a != b), None)
        upto = len(tokens["graph"]) if n is None else n + 1
        diff = max((a.float() - b.float()).abs().max().item()
                   for (_, a), (_, b) in zip(runs["graph"][:upto], runs["fixed"][:upto]))
        return {"same_tokens": n is None, "first_difference": n, "max_logit_difference": diff}

    ids = torch.tensor([prompt], device=device)

    @torch.inference_mode()
    def hugging_face() -> int:
        kw = dict(do_sample=False) if args.greedy else dict(do_sample=True, top_k=200, temperature=0.8)
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, pad_token_id=tok.eot, **kw)
        return out.shape[1] - ids.shape[1]

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            n = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(n / (time.perf_counter() - start))
        return statistics.median(times)

    def syncs(fn) -> int:
        """Host waits for the GPU during fn (PyTorch's sync debug mode warns at each)."""
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
        torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message).lower() for w in caught)

    a, b = timed(ours), timed(hugging_face)
    eager = timed(lambda: ours("dynamic", 1)) if device.type == "cuda" else None  # before the graph: a sync per token
    waits = {"graph": syncs(ours), "eager": syncs(lambda: ours("dynamic", 1))} if device.type == "cuda" else None
    agree = {str(dtype): agreement(model), "torch.float32": agreement(model.float())} if device.type == "cuda" else None
    c = model.config
    mode = "greedy" if args.greedy else "top-k 200, temperature 0.8"
    print(f"{device.type}: {c.n_layer} x {c.n_embd}, context {c.block_size}, batch 1, {len(prompt)}-token prompt, "
          f"{args.new_tokens} new tokens, {mode}, {dtype}, {torch.get_num_threads()} threads, median of {args.repeat}")
    decoder = "CUDA graph" if device.type == "cuda" else "KV cache"
    print(f"  {'mtgpt sample (' + decoder + ')':28s} {a:8.1f} tokens/s")
    if eager is not None:
        print(f"  mtgpt eager, host per token  {eager:8.1f} tokens/s")
        print(f"  graph decoder against the eager one: {agree}")
        print(f"  host syncs for {args.new_tokens} tokens: graph {waits['graph']}, eager {waits['eager']}")
    print(f"  Hugging Face generate()      {b:8.1f} tokens/s")
    print(f"  ratio                        {a / b:8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "mode": mode, "new_tokens": args.new_tokens, "mtgpt_tokens_per_s": a, "hf_tokens_per_s": b,
            "eager_per_token_sync_tokens_per_s": eager, "graph_vs_eager": agree, "host_syncs": waits,
            "ratio": a / b}, indent=1))


if __name__ == "__main__":
    main()
