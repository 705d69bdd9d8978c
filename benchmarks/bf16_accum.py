"""Does summing bf16 gradients in fp32 keep a bf16 run closer to fp32? `mtgpt train` on 2 CPU
ranks with --grad-accum 4, three times per ZeRO stage, the same seed: fp32, bf16 as DeepSpeed
does it by default (gradients accumulated and reduced in bf16), and the bundled bf16 file (fp32
accumulation and reduction); prints the mean per-step |loss - fp32 loss| of each bf16 run.

    python benchmarks/bf16_accum.py                  # ZeRO 1 and 2, the sonnets, 60 steps (~5 min)
    python benchmarks/bf16_accum.py --stages 1 2 3 --steps 100

The model is small (2 x 64, context 64) so that it runs on a laptop; the gradient itself is
measured exactly in tests/test_train.py (test_bf16_configs_accumulate_gradients_in_fp32).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mtgpt import ds_config

SONNETS = Path(__file__).resolve().parent.parent / "tests" / "data" / "sonnets.txt"


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "mtgpt", "prepare", str(SONNETS), "--out", str(tmp / "data"),
                        "--block-size", "64", "--val-fraction", "0.05", "--quiet"], check=True)
        for stage in args.stages:
            bundled = ds_config.find(f"zero{stage}_bf16")[1]
            configs = {
                "fp32": {k: v for k, v in bundled.items() if k not in ("bf16", "data_types", "communication_data_type")},
                "bf16, DeepSpeed's default": {k: v for k, v in bundled.items()
                                              if k not in ("data_types", "communication_data_type")},
                "bf16, bundled (fp32 accumulation)": bundled,
            }
            curves = {}
            for i, (name, ds) in enumerate(configs.items()):
                path = tmp / f"z{stage}_{i}.json"
                path.write_text(json.dumps(ds))
                run = tmp / f"run{stage}_{i}"
                subprocess.run([sys.executable, "-m", "mtgpt", "train", "--data", str(tmp / "data"), "--out", str(run),
                                "--nproc", "2", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--micro-batch", "2",
                                "--grad-accum", "4", "--lr", "3e-3", "--max-steps", str(args.steps), "--log-every", "1",
                                "--eval-every", "100000", "--save-every", "100000", "--ds-config", str(path),
                                "--seed", str(args.seed)], check=True, capture_output=True)
                curves[name] = losses(run)
            ref = curves.pop("fp32")
            for name, curve in curves.items():
                gaps = [abs(curve[s] - ref[s]) for s in ref]
                print(f"ZeRO-{stage} {name:<36} mean |loss - fp32| {sum(gaps) / len(gaps):.4f} "
                      f"(last step {curve[max(curve)]:.4f}, fp32 {ref[max(ref)]:.4f})", flush=True)


if __name__ == "__main__":
    from _children import run_main  # (benchmarks/ is the script's folder, first on sys.path)

    run_main(main)
