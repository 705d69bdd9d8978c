"""world.py in process: who this process is outside a launcher, and the collectives in a world of one."""

from __future__ import annotations

import os

import pytest
import torch

from mtgpt import world


def test_outside_a_launcher_is_a_world_of_one(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert world.env_world() == (0, 0, 1)
    me = world.get()
    assert (me.rank, me.world_size, me.device.type) == (0, 1, "cpu") and world.is_rank0()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world.env_world() == (3, 1, 4) and not world.is_rank0()


def test_collectives_without_a_process_group():
    t = torch.tensor([1.0, 2.0])
    assert world.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert world.all_gather_object({"a": 1}) == [{"a": 1}]
    assert world.broadcast_object("x") == "x"
    world.barrier()


def test_a_real_process_group_of_one(world_of_one):
    """init() starts gloo through DeepSpeed, as a launcher's rank would, and the collectives run."""
    assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    assert world_of_one.world_size == 1 and world.get() is world_of_one and world.init() is world_of_one
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    t = torch.tensor([1.0, 2.0])
    assert world.all_reduce_sum(t).tolist() == [1.0, 2.0]
    assert world.all_gather_object({"a": 1}) == [{"a": 1}]
    assert world.broadcast_object("x") == "x"
    world.barrier()


def test_a_new_world_after_destroy_gets_deepspeed_a_new_world_group(world_of_one):  # (restores the environment)
    """DeepSpeed clones the world group once per process (deepspeed.utils.groups); an engine built
    in a second world of one (a later test module training in process) must not get the first's."""
    from deepspeed.utils import groups

    world.init()
    first = groups._clone_world_group()
    world.destroy()
    world.init()
    try:
        again = groups._clone_world_group()
        assert again is not first and torch.distributed.get_global_rank(again, 0) == 0
    finally:
        world.destroy()


def test_free_port_is_free():
    import socket

    port = world.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_collective_timeout_is_long_by_default_and_short_in_tests():
    """30 minutes for real runs (a first-step compile on 8 ranks must not abort them); the test
    suite sets 120 s for the processes it starts."""
    import subprocess
    import sys

    code = "import mtgpt.world as w; print(w.collective_timeout().total_seconds())"
    env = {k: v for k, v in os.environ.items() if k != "MTGPT_COLLECTIVE_TIMEOUT"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "1800.0"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "120.0"


def test_collective_timeout_takes_a_duration(monkeypatch):
    from mtgpt import world
    from mtgpt.config import ConfigError

    for raw, seconds in (("45", 45), ("30m", 1800), ("2h", 7200)):
        monkeypatch.setenv("MTGPT_COLLECTIVE_TIMEOUT", raw)
        assert world.collective_timeout().total_seconds() == seconds
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("MTGPT_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ConfigError, match=f"MTGPT_COLLECTIVE_TIMEOUT='{bad}' is not a duration"):
            world.collective_timeout()


def test_a_line_printed_during_training_clears_the_progress_bar_first():
    """The evaluation's line was printed after the bar's text on the same terminal line
    ("...tok_s=1523]step 30: val loss 9.7504"); now the bar is cleared, the line printed, the bar
    drawn again below."""
    import io

    from tqdm import tqdm

    screen = io.StringIO()
    bar = tqdm(total=10, file=screen, desc="train")
    bar.update(3)
    world.print0("step 3: val loss 9.7504", file=screen)
    bar.close()
    before, after = screen.getvalue().split("step 3: val loss 9.7504\n")
    assert before.endswith("\r") and "train:" in before and "train:" in after  # cleared, then drawn again
