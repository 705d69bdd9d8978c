"""Shared fixtures: a tiny real corpus (Shakespeare's first 20 sonnets), tiny data folders, and a
helper that runs the real `mtgpt` command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# A rank that dies must not keep the others waiting 30 minutes (mtgpt.world) in a test; set here so
# the subprocesses the tests start inherit it.
os.environ.setdefault("MTGPT_COLLECTIVE_TIMEOUT", "120")
# Under `pytest -n N` (make test) the N test processes share the cores: each gets its share for
# torch's threads, and the subprocesses it starts inherit it (mtgpt.world shares them out only when
# OMP_NUM_THREADS is unset). Set before any test module imports torch.
if (workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

DATA = Path(__file__).parent / "data"
SONNETS = DATA / "sonnets.txt"
# A tiny model: every test that trains uses it (the real default is 6 x 384, context 512).
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
TINY_ARGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]


def run_mtgpt(*args: str, check: bool = True, timeout: float = 300, env: dict | None = None,
              cwd: str | Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m mtgpt ARGS` (stdin: `input`) and return the finished process (stdout/stderr as text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "mtgpt", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=cwd, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"mtgpt {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The sonnets as block-32 shards, val 10%, several small train shards."""
    from mtgpt.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "sonnets32"
    prepare([str(SONNETS)], out, block_size=32, val_fraction=0.1, shard_size_mb=0.004, quiet=True)
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts training processes (several DeepSpeed ranks, Slurm, a "
                                       "container); `make test-all` runs these, `make test` does not")


@pytest.fixture(scope="module")
def world_of_one():
    """This pytest process as a world of one rank (gloo), for training in process; torn down at
    the end of the module with the environment it changed, so later subprocesses do not inherit it."""
    import signal

    from mtgpt import world

    env = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield world.init()
    world.destroy()
    os.environ.clear()
    os.environ.update(env)
    for s, handler in handlers.items():  # fit() installs its stop-flag handlers
        signal.signal(s, handler)
