"""One training process. Launchers start this file once per rank; it calls mtgpt.train.

One GPU:      deepspeed --num_gpus 1 launch/train.py --ds_config ds_configs/zero0_bf16.json \
                  --data data/books --out runs/books
One node:     deepspeed --num_gpus 8 launch/train.py --ds_config ds_configs/zero2_bf16.json --data ... --out ...
              torchrun --nproc_per_node 8 launch/train.py --ds_config ds_configs/zero2_bf16.json ...
Multi-node:   deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 launch/train.py ...
              or `sbatch --nodes 2 slurm/train.sbatch` (srun starts torchrun on every node)
CPU, 2 ranks: deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero1_fp32.json ...
A mixture:    ... launch/train.py --data books=data/books:0.7 --data chat=data/chat:0.3 --out runs/mix

The options are `mtgpt train`'s (`python launch/train.py --help`); `mtgpt train` itself starts
the DeepSpeed launcher on `python -m mtgpt worker`, which is this same entry point.
"""

from mtgpt.cli import worker

if __name__ == "__main__":
    worker(prog_name="launch/train.py")
