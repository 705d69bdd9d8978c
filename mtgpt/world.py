"""This process's place in the world of ranks: the only module that reads RANK / LOCAL_RANK /
WORLD_SIZE, starts the process group, picks the device and calls torch.distributed.

Launchers (`deepspeed`, `torchrun`, `srun` via slurm/train.sbatch) set RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Run as a plain `python` process with none of them set,
mtgpt is a world of one (it fills in a local master address and a free port).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass

import torch

# A rank that dies leaves the others blocked in a collective; this bounds how long they wait
# before raising (gloo honours it directly; NCCL through TORCH_NCCL_ASYNC_ERROR_HANDLING). It must
# outlast the longest legitimate wait: a first-step torch.compile on 8 ranks, a save to a slow
# shared filesystem, a universal-checkpoint conversion. 30 minutes, DeepSpeed's own default; the
# tests set 120 s.
TIMEOUT_ENV = "MTGPT_COLLECTIVE_TIMEOUT"


def collective_timeout() -> datetime.timedelta:
    """$MTGPT_COLLECTIVE_TIMEOUT (seconds, or a duration: 30m, 2h), default 1800 s; a bad value is
    a ConfigError (make_plan checks it before any process starts)."""
    from mtgpt.config import ConfigError, parse_duration

    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        return datetime.timedelta(seconds=parse_duration(raw))
    except ConfigError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a duration; give seconds or e.g. 30m, 2h") from None


@dataclass(frozen=True)
class Rank:
    """Who this process is: `me = world.init()`, then me.rank, me.world_size, me.device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


_me: Rank | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as the launcher set them; (0, 0, 1) outside a launcher."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cpu_bf16_fast() -> bool:
    """Whether this CPU runs bf16 matmuls fast (AVX-512 or newer, as oneDNN sees it). Without, PyTorch
    emulates them: on an AVX2-only AMD EPYC, 0.55 GFLOP/s against 40 in fp32, and `make demo` in
    bf16 ran at 214 tokens/s where fp32 runs 4,300 (and an AVX-512 machine 13,000 in bf16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # (a build without oneDNN: nothing known, nothing said)
        return True


def import_deepspeed():
    """Import deepspeed, telling it up front when there is no GPU (otherwise it probes for one
    and warns about it on every import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def init() -> Rank:
    """Start the process group (nccl on GPUs, gloo on CPUs) through DeepSpeed, once."""
    global _me
    if _me is not None:
        return _me
    rank, local_rank, world_size = env_world()
    if "MASTER_ADDR" not in os.environ:  # a plain `python` run: a world of one
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for key, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size)):
        os.environ.setdefault(key, str(value))  # (DeepSpeed falls back to MPI discovery without them all)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores between this machine's ranks
            local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    deepspeed = import_deepspeed()
    from deepspeed.ops import __compatible_ops__ as compatible_ops
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    # DeepSpeed asks its LR scheduler for the lr once before the first step and warns about it.
    # and about a schedule shorter than its warmup (mtgpt warns about a --warmup-steps that is, in words)
    ds_logger.addFilter(lambda record: "before it has started" not in record.getMessage()
                        and "is less than warmup_num_steps" not in record.getMessage())
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    # DeepSpeed's CPU shared-memory all-reduce is JIT-compiled with g++ on first use (~30 s);
    # gloo is fast enough for one machine's CPU ranks, so skip the build.
    compatible_ops["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, timeout=collective_timeout(),
                               dist_init_required=True, verbose=False)
    _me = Rank(rank, local_rank, world_size, device)
    return _me


def get() -> Rank:
    """The current world; a world of one on CPU if `init` was not called."""
    if _me is not None:
        return _me
    rank, local_rank, world_size = env_world()
    return Rank(rank, local_rank, world_size, torch.device("cpu"))


def is_rank0() -> bool:
    return get().rank == 0


def print0(*args, file=None) -> None:
    """Print on rank 0 only, through tqdm: a progress bar on the terminal is cleared first and
    drawn again below (a plain print glued the line onto the bar)."""
    if is_rank0():
        from tqdm import tqdm

        out = file or sys.stdout
        tqdm.write(" ".join(map(str, args)), file=out)
        out.flush()  # (a log file or a pipe sees each line as it is said)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank is gone (it died, or its node did): NCCL
    raises torch.distributed.DistError, gloo a RuntimeError naming the closed connection."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or "Connection closed by peer" in text or \
        "Connection reset by peer" in text


def all_gather_object(obj):
    """Every rank's obj, in rank order."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    """End the process group, and forget DeepSpeed's clone of it (deepspeed.utils.groups keeps
    one for the life of the process: an engine built after a new init() would use the destroyed
    group)."""
    global _me
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._WORLD_GROUP = None
    _me = None
