"""slurm/ on a real Slurm cluster: tests/slurm/cluster.sh starts one controller and two slurmd
(node1, node2) on this machine. prepare.sbatch writes the data; train.sbatch trains the tiny model
with one CPU rank on each node; a job requeued twice in the middle (Slurm's time-limit warning,
then `scontrol requeue`) resumes and logs the same loss at every step as an uninterrupted job; a
cancelled job saves and stays cancelled. The data and run folder given as the script's arguments
(--data, --out) replace DATA_DIR and RUN_DIR; a failed job's log says why; a last_stop.json left by
an earlier try does not make the script requeue.

Needs root and Slurm (installed with apt-get if missing). Skipped where that is not possible,
except under CI (CI=true), where it fails instead."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtgpt import checkpoint
from tests.conftest import SONNETS, TINY_ARGS

pytestmark = pytest.mark.slow  # DeepSpeed ranks, Slurm or a container: `make test-all`

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
STEPS = 60
TRAIN_ARGS = [*TINY_ARGS, "--micro-batch", "2", "--eval-samples", "8", "--log-every", "2",
              "--eval-every", "1000", "--save-every", "1000", "--seed", "5"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def unavailable(reason: str) -> None:
    """Skip, or fail under CI: there the test must run."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"cannot run under CI: {reason}")
    pytest.skip(reason)


def free_ports(n: int) -> int:
    """The first of n consecutive free TCP ports."""
    for base in range(16817, 30000, 7):
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        mine = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "RUN_DIR")}  # each job sets its own
        self.env = {**mine, "SLURM_CONF": str(root / "slurm.conf"), "SLURM_TEST_PORT": str(free_ports(3)),
                    # what the job sees (sbatch passes the environment on): this venv's python,
                    # one thread per rank (two ranks share this machine's two cores)
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": sys.executable,
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([*map(str, cmd)], capture_output=True, text=True, env=self.env, cwd=REPO,
                              timeout=kw.pop("timeout", 120), **kw)
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))}: {proc.stdout}{proc.stderr}\n{self.logs()}"
        return proc

    def sbatch(self, options: list, script: str, args: list, env: dict | None = None) -> str:
        """sbatch OPTIONS SCRIPT ARGS from the repository; returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *map(str, options), script, *map(str, args)],
                              capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=REPO, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        line = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(field.split("=", 1) for field in line.split() if "=" in field)

    def wait(self, job_id: str, until, what: str, timeout: float = 300, files: tuple[Path, ...] = ()) -> dict:
        """Poll the job until until(job) holds; fail with the logs if it ends or times out first."""
        deadline = time.time() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if job["JobState"] in DONE or time.time() > deadline:
                raise AssertionError(f"job {job_id} never got to: {what}; now {job['JobState']} "
                                     f"(restarts {job['Restarts']})\n{self.logs(*files)}")
            time.sleep(0.1)

    def logs(self, *files: Path) -> str:
        """The tails of the given files (job output, rank logs) and of the daemons' logs."""
        paths = [*files, *sorted((self.root / "log").glob("*.log"))]
        paths = [q for p in paths for q in (sorted(p.rglob("*.log")) if p.is_dir() else [p])]
        return "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                         for p in paths if p.is_file())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        unavailable("a Slurm cluster needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        unavailable("Slurm is not installed and apt-get is missing")
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        unavailable("mount namespaces (unshare --mount) are not permitted here")
    c = Cluster(tmp_path_factory.mktemp("slurm") / "cluster")
    start = subprocess.run([CLUSTER, "start", c.root], capture_output=True, text=True, env=c.env, timeout=600)
    try:
        assert start.returncode == 0, f"cluster.sh start failed:\n{start.stdout}{start.stderr}\n{c.logs()}"
        yield c
    finally:
        stop = subprocess.run([CLUSTER, "stop", c.root], capture_output=True, text=True, env=c.env, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert not c.root.exists()


@pytest.fixture(scope="module")
def data(cluster, tmp_path_factory) -> Path:
    """The sonnets as block-32 shards, written by a prepare.sbatch job."""
    out = tmp_path_factory.mktemp("slurm-data") / "sonnets32"
    log = out.parent / "prepare.out"
    job_id = cluster.sbatch(["--cpus-per-task", 1, "--output", log], "slurm/prepare.sbatch",
                            [SONNETS, "--out", out, "--block-size", 32, "--val-fraction", 0.1])
    job = cluster.wait(job_id, lambda j: j["JobState"] in DONE, "the end", files=(log,))
    assert job["JobState"] == "COMPLETED", cluster.logs(log)
    assert json.loads((out / "manifest.json").read_text())["block_size"] == 32
    return out


def train_job(cluster: Cluster, data: Path | str | None, run: Path, steps: int = STEPS, args: list = (),
              run_dir: bool = True) -> str:
    """Submit train.sbatch on both nodes; its output goes to RUN.out. The data is DATA_DIR (None:
    the arguments give --data); the run folder RUN_DIR (run_dir=False: the arguments give --out)."""
    env = {"DS_CONFIG": "zero1_fp32", **({"DATA_DIR": str(data)} if data is not None else {}),
           **({"RUN_DIR": str(run)} if run_dir else {})}
    return cluster.sbatch(["--nodes", 2, "--output", f"{run}.out"], "slurm/train.sbatch",
                          [*TRAIN_ARGS, "--max-steps", steps, *args], env=env)


def losses(run: Path) -> dict[int, float]:
    """{step: train/loss} from metrics.jsonl (complete lines only: the job may be writing it)."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), "a step logged twice"
    return {r["step"]: r["train/loss"] for r in rows}


def last_stop(run: Path) -> dict:
    return json.loads((run / "last_stop.json").read_text())


@pytest.fixture(scope="module")
def straight(cluster, data, tmp_path_factory) -> Path:
    """An uninterrupted job: STEPS steps on 2 nodes x 1 rank."""
    run = tmp_path_factory.mktemp("slurm-straight") / "run"
    job_id = train_job(cluster, data, run)
    job = cluster.wait(job_id, lambda j: j["JobState"] in DONE, "the end", files=(Path(f"{run}.out"), run / "logs"))
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), cluster.logs(run)
    assert list(losses(run)) == list(range(2, STEPS + 1, 2))
    assert last_stop(run)["reason"] == "max_steps"
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 2
    # one torchrun per node, each with its own log; rank 0 (on the first node) prints the banner
    node0, node1 = (run / "logs" / f"job-{job_id}-run0-node{n}.log" for n in (0, 1))
    assert node1.is_file() and "2 rank(s) on cpu" in node0.read_text()
    return run


def test_uninterrupted_job_trains_on_two_nodes(straight):
    assert checkpoint.latest_complete(straight).name == checkpoint.tag_for(STEPS)
    assert (straight / "model.safetensors").is_file()


def test_a_mixture_job(cluster, data, tmp_path):
    """DATA_DIR="a=DIR:0.7 b=DIR2:0.3": one --data per source on every node (two folders: one
    folder given twice is refused). The run folder given as `--out=RUN`: the script's log is
    there too."""
    run, other = tmp_path / "mix", tmp_path / "sonnets32-copy"
    shutil.copytree(data, other)
    job_id = train_job(cluster, f"a={data}:0.7 b={other}:0.3", run, steps=4, run_dir=False, args=[f"--out={run}"])
    job = cluster.wait(job_id, lambda j: j["JobState"] in DONE, "the end", files=(Path(f"{run}.out"), run / "logs"))
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), cluster.logs(Path(f"{run}.out"), run)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data/a/tokens"] + last["data/b/tokens"] == last["train/tokens"] and "val/b/loss" in last
    assert (run / "logs" / f"job-{job_id}.log").is_file()  # the script's own log, in the same folder


def test_requeued_job_resumes_bit_identical(cluster, data, straight, tmp_path):
    """The data and run folder given as the script's arguments, `--data=DIR --out RUN` (no DATA_DIR,
    RUN_DIR): the ranks train on DIR alone (no data/shakespeare added), and the script finds their
    last_stop.json in RUN after the time-limit warning, and requeues."""
    run = tmp_path / "run"
    out = Path(f"{run}.out")
    files = (out, run / "logs")
    job_id = train_job(cluster, None, run, args=[f"--data={data}", "--out", run], run_dir=False)

    # 1. Slurm's warning before the time limit (--signal=B:USR1@300), sent now: the script has the
    #    ranks save, then requeues the job itself.
    cluster.wait(job_id, lambda j: len(losses(run)) >= 2, "training", files=files)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    # (PENDING: the ranks are done; a requeued job waits a few seconds before it may start again)
    cluster.wait(job_id, lambda j: (j["Restarts"], j["JobState"]) == ("1", "PENDING"), "requeued by the script",
                 files=files)
    first = last_stop(run)
    assert first["reason"] == "signal" and first["step"] < STEPS
    assert checkpoint.latest_complete(run).name == checkpoint.tag_for(first["step"])

    # 2. Preemption or an operator: `scontrol requeue` while the resumed job trains. Slurm sends
    #    SIGTERM to the whole job and requeues it; the ranks save before KillWait ends.
    cluster.wait(job_id, lambda j: max(losses(run), default=0) >= first["step"] + 4, "resumed training", files=files)
    cluster.run("scontrol", "requeue", job_id)
    cluster.wait(job_id, lambda j: (j["Restarts"], j["JobState"]) == ("2", "PENDING"), "requeued by scontrol",
                 files=files)
    second = last_stop(run)
    assert second["reason"] == "signal" and first["step"] < second["step"] < STEPS

    job = cluster.wait(job_id, lambda j: j["JobState"] in DONE, "the end", files=files)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), cluster.logs(*files)
    assert last_stop(run)["reason"] == "max_steps"
    logs = [run / "logs" / f"job-{job_id}-run{n}-node0.log" for n in range(3)]
    assert f"resuming from {run / 'checkpoints' / checkpoint.tag_for(first['step'])}" in logs[1].read_text()
    assert f"(step {second['step']})" in logs[2].read_text()
    assert "requeueing job" in out.read_text()
    # the same loss at every step as the uninterrupted job, bit for bit
    assert losses(run) == losses(straight)


def test_cancelled_job_saves_and_stays_cancelled(cluster, data, tmp_path):
    run = tmp_path / "run"
    files = (Path(f"{run}.out"), run / "logs")
    job_id = train_job(cluster, data, run)
    cluster.wait(job_id, lambda j: len(losses(run)) >= 2, "training", files=files)
    cluster.run("scancel", job_id)
    # CANCELLED at once; the ranks save within KillWait and rank 0 writes last_stop.json last
    cluster.wait(job_id, lambda j: j["JobState"] in DONE and (run / "last_stop.json").is_file(), "a clean stop",
                 files=files)
    time.sleep(3)  # a requeue would show by now
    job = cluster.job(job_id)
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), cluster.logs(*files)
    stop = last_stop(run)
    assert stop["reason"] == "signal" and stop["step"] < STEPS
    assert checkpoint.latest_complete(run).name == checkpoint.tag_for(stop["step"])


def test_failed_job_says_why(cluster, tmp_path):
    """No -J, no DATA_DIR, RUN_DIR or --out, and data that is not there: the run folder is the
    job's own, runs/mtgpt-<job id> (not runs/mtgpt, which every unnamed job would share and
    resume); the ranks get only the --data given (not data/shakespeare besides); the job's log
    says why it failed (the ranks' Error line) and that no GPU was found."""
    # (run elsewhere: this repository's mtgpt all the same)
    pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    job_id = cluster.sbatch(["--nodes", 1, "--chdir", tmp_path], "slurm/train.sbatch", ["--data", "no-such-data"],
                            env={"PYTHONPATH": pythonpath})
    out = tmp_path / f"slurm-mtgpt-{job_id}.out"
    run = tmp_path / "runs" / f"mtgpt-{job_id}"
    job = cluster.wait(job_id, lambda j: j["JobState"] in DONE, "the end", files=(out, tmp_path / "runs"))
    assert job["JobState"] == "FAILED", cluster.logs(out, tmp_path / "runs")
    assert (run / "logs" / f"job-{job_id}-run0-node0.log").is_file(), sorted(map(str, tmp_path.rglob("*")))
    text = out.read_text()
    assert any("Error: " in line and "no-such-data: no such folder" in line for line in text.splitlines()), text
    assert "shakespeare" not in text
    assert "no GPU on this node" in text and "1 CPU rank(s) per node" in text


def test_stale_last_stop_does_not_requeue(cluster, tmp_path):
    """The time-limit warning, and ranks that do not stop cleanly (a stand-in python that never
    trains, killed by the SIGTERM): a last_stop.json saying "signal" from an earlier try must not
    make the script requeue the job; it fails."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "last_stop.json").write_text(json.dumps({"reason": "signal", "step": 2, "time": time.time() - 600},
                                                   indent=2) + "\n")
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0  # "import mtgpt" works\nexec sleep 300\n')
    python.chmod(0o755)
    out = Path(f"{run}.out")
    job_id = cluster.sbatch(["--nodes", 1, "--output", out], "slurm/train.sbatch", [],
                            env={"PYTHON": str(python), "RUN_DIR": str(run)})
    try:
        node0 = run / "logs" / f"job-{job_id}-run0-node0.log"
        cluster.wait(job_id, lambda j: j["JobState"] == "RUNNING" and node0.is_file(), "srun", files=(out,))
        time.sleep(1)
        cluster.run("scancel", "--batch", "--signal=USR1", job_id)
        job = cluster.wait(job_id, lambda j: j["JobState"] in DONE or j["Restarts"] != "0", "the end", files=(out,))
        assert (job["JobState"], job["Restarts"]) == ("FAILED", "0"), cluster.logs(out)
        assert "not requeued" in out.read_text() and "training exited with status" in out.read_text()
    finally:
        subprocess.run(["scancel", job_id], env=cluster.env, capture_output=True)


def test_conflicting_data_or_run_folders_are_refused(tmp_path):
    """DATA_DIR and the arguments' --data, or RUN_DIR and --out, saying different things: one
    line, exit 1, before anything starts (the script alone, no cluster)."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "RUN_DIR")},
           "SLURM_JOB_NAME": "mtgpt", "SLURM_JOB_ID": "7"}
    for extra, args, words in [({"DATA_DIR": "a"}, ["--data=a", "--data", "b"], ["DATA_DIR", "--data a b"]),
                               ({"RUN_DIR": "r"}, ["--out", "s"], ["RUN_DIR=r", "--out s"])]:
        proc = subprocess.run(["bash", REPO / "slurm" / "train.sbatch", *args], capture_output=True, text=True,
                              env={**env, **extra}, cwd=tmp_path, timeout=30)
        lines = (proc.stdout + proc.stderr).splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "error:" in lines[0], lines
        assert all(w in lines[0] for w in words), lines
    assert not list(tmp_path.iterdir())  # no run folder made


FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_SRUN_ARGS"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames ]] && echo localhost
"""


def _script_alone(tmp_path: Path, args: list[str], **env_extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """train.sbatch run by bash with a srun that records its arguments (and a scontrol that knows
    one host): what the script would start, without a cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    recorded = tmp_path / "srun_args"
    recorded.unlink(missing_ok=True)
    env = {**{k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "RUN_DIR", "DS_CONFIG")},
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
           "SLURM_JOB_NAME": "mtgpt", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost",
           "FAKE_SRUN_ARGS": str(recorded), **env_extra}
    proc = subprocess.run(["bash", REPO / "slurm" / "train.sbatch", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    return proc, recorded.read_text().splitlines() if recorded.exists() else []


def _after(srun_args: list[str], option: str) -> list[str]:
    return [srun_args[i + 1] for i, a in enumerate(srun_args[:-1]) if a == option]


def test_config_file_gives_the_data_and_run_folder(tmp_path):
    """`train.sbatch --config FILE` (a run's train_config.json) trains on the file's data into its
    run folder; the script's defaults (data/shakespeare, runs/<job>) replaced both. DATA_DIR and
    RUN_DIR, given too, replace the file's (as --data and --out do)."""
    config = tmp_path / "train_config.json"
    config.write_text(json.dumps({"data": ["books=/somewhere/books"], "out": str(tmp_path / "run1")}))
    proc, srun = _script_alone(tmp_path, ["--config", str(config), "--max-steps", "2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _after(srun, "--out") == [str(tmp_path / "run1")] and _after(srun, "--data") == [], srun
    assert f"data books=/somewhere/books, run {tmp_path / 'run1'}" in proc.stdout
    proc, srun = _script_alone(tmp_path, [f"--config={config}"], DATA_DIR="d/x", RUN_DIR="r")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _after(srun, "--data") == ["d/x"] and _after(srun, "--out") == ["r"], srun
    (tmp_path / "bad.json").write_text("{")
    proc, srun = _script_alone(tmp_path, ["--config", str(tmp_path / "bad.json")])
    assert proc.returncode == 1 and srun == [] and f"error: --config {tmp_path / 'bad.json'}: cannot read it" \
        in proc.stdout, proc.stdout + proc.stderr


def test_the_same_folder_written_two_ways_is_no_conflict_and_ds_config_is_checked(tmp_path):
    """DATA_DIR=data/ and --data data are one folder (they were refused as different); DS_CONFIG
    and a different --ds-config among the arguments are refused (the last one had won silently)."""
    proc, srun = _script_alone(tmp_path, ["--data", "data/books"], DATA_DIR="./data/books/")
    assert proc.returncode == 0 and _after(srun, "--data") == ["data/books"], proc.stdout + proc.stderr
    for i, arg in enumerate((["--ds-config", "zero2_fp32"], ["--ds_config=zero2_fp32"],
                             ["--deepspeed_config", "zero2_fp32"])):
        (tmp_path / str(i)).mkdir()
        proc, srun = _script_alone(tmp_path / str(i), arg, DS_CONFIG="zero1_fp32")
        assert not (tmp_path / str(i) / "runs").exists()  # refused before a run folder is made
        lines = (proc.stdout + proc.stderr).splitlines()
        assert proc.returncode == 1 and srun == [] and len(lines) == 1, lines
        assert "DS_CONFIG=zero1_fp32 and the arguments' --ds-config zero2_fp32 differ" in lines[0], lines
    proc, srun = _script_alone(tmp_path, ["--ds-config", "zero1_fp32"], DS_CONFIG="zero1_fp32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
