"""Data folders at a URL: a real HTTP server on 127.0.0.1 serving a prepared folder (and `pipe:`
commands), fetched into a local cache, checked, retried; training from it."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mtgpt.data import DataError, load_manifest, remote
from tests.conftest import TINY, TINY_ARGS, run_mtgpt


class Handler(SimpleHTTPRequestHandler):
    """Serves a folder; logs every request; can fail some of them (see `serve`)."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        server = self.server
        name = self.path.lstrip("/").split("/")[-1]
        server.requests.append(name)
        if server.unavailable.get(name, 0) > 0:  # a transient failure
            server.unavailable[name] -= 1
            self.send_error(503, "busy")
            return
        if name == server.cut:  # the server stops in the middle of this file
            data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve(folder: Path, cut: str | None = None, unavailable: dict[str, int] | None = None):
    """An HTTP server on 127.0.0.1 serving `folder`; yields (base URL, the requested file names)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    server.requests, server.cut, server.unavailable = [], cut, dict(unavailable or {})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/data", server.requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(tiny_data, tmp_path) -> Path:
    """A folder holding the prepared data under data/ (what the server's root is)."""
    root = tmp_path / "www"
    shutil.copytree(tiny_data, root / "data")
    return root


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    return names == sorted(p.name for p in b.iterdir() if not p.name.startswith(".")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_fetch_over_http_once_into_the_cache(served, tiny_data, tmp_path):
    with serve(served) as (url, requests):
        assert load_manifest(url) == load_manifest(tiny_data)
        copy = remote.local_copy(url, tmp_path / "cache", rank=0, progress=False)
        assert same_files(copy, tiny_data)
        fetched = len(requests)
        assert remote.local_copy(url, tmp_path / "cache", rank=1, progress=False) == copy
        assert requests[fetched:] == ["manifest.json"]  # the shards come from the cache now
    assert not list(copy.glob(".*part*"))


def test_fetch_through_a_pipe_command(tiny_data, tmp_path):
    url = f"pipe:cat {tiny_data}/{{shard}}"
    assert load_manifest(url)["splits"] == load_manifest(tiny_data)["splits"]
    assert same_files(remote.local_copy(url, tmp_path / "cache", progress=False), tiny_data)
    with pytest.raises(DataError, match="must contain {shard}"):
        load_manifest(f"pipe:cat {tiny_data}/manifest.json")
    with pytest.raises(DataError, match=r"not a data folder mtgpt can read .*status 1.*No such file"):
        load_manifest(f"pipe:cat {tmp_path}/nothing/{{shard}}")


def test_a_cache_that_cannot_be_written_is_one_clear_error(tiny_data, tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(DataError, match=r"cannot keep the shards of pipe:.* in .*afile/sub \(Not a directory\); give "
                                        "--data-cache a folder you can write to"):
        remote.local_copy(f"pipe:cat {tiny_data}/{{shard}}", tmp_path / "afile" / "sub", progress=False)


def test_transient_failures_are_retried(served, tmp_path):
    shard = load_manifest(served / "data")["splits"]["train"]["shards"][0]["file"]
    with serve(served, unavailable={shard: 2, "manifest.json": 1}) as (url, requests):
        copy = remote.local_copy(url, tmp_path / "cache", rank=0, progress=False)
    assert requests.count(shard) == 3 and requests.count("manifest.json") == 2
    assert same_files(copy, served / "data")


def test_a_server_that_stops_mid_shard(served, tmp_path):
    """The retries, then an error naming the URL and the rank; no half shard left in the cache."""
    shard = load_manifest(served / "data")["splits"]["train"]["shards"][1]["file"]
    with serve(served, cut=shard) as (url, requests):
        with pytest.raises(DataError, match=rf"rank 1: cannot fetch {url}/{shard} after {remote.TRIES} tries"):
            remote.local_copy(url, tmp_path / "cache", rank=1, progress=False)
    assert requests.count(shard) == remote.TRIES
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert shard not in [p.name for p in cached] and not [p for p in cached if "part" in p.name]


def test_a_url_with_no_manifest_is_refused_at_once(served, tmp_path):
    with serve(served) as (url, requests):
        with pytest.raises(DataError, match=r"not a data folder mtgpt can read .*HTTP 404.*manifest.json included"):
            load_manifest(url + "/elsewhere")
        assert requests == ["manifest.json"]  # a 404 is not retried


def test_a_shard_that_differs_from_its_manifest(served, tmp_path):
    m = load_manifest(served / "data")
    shard = served / "data" / m["splits"]["val"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1  # same size, other content
    shard.write_bytes(bytes(raw))
    with serve(served) as (url, _):
        with pytest.raises(DataError, match=rf"rank 0: {url}/{shard.name} differs from its manifest"):
            remote.local_copy(url, tmp_path / "cache", rank=0, progress=False)


def test_an_unreachable_url_is_read_from_its_complete_cached_copy(served, tmp_path, monkeypatch):
    """No network (the server down): the last complete copy of that URL in the cache, with a
    warning in the plan; an incomplete copy, or none, is an error that says to check the URL."""
    from mtgpt.config import TrainConfig
    from mtgpt.train import make_plan, plan_warnings

    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    monkeypatch.setattr(remote, "from_cache", {})
    cache = tmp_path / "cache"
    with serve(served) as (url, _):
        copy = remote.local_copy(url, cache, rank=0, progress=False)
        cfg = TrainConfig(data=url, out=str(tmp_path / "run"), model=dict(TINY), micro_batch=2, max_steps=5,
                          data_cache=str(cache))
        assert plan_warnings(make_plan(cfg, world_size=1, cuda=False)) == []
    with pytest.raises(DataError, match=r"not a data folder mtgpt can read .*Connection refused.*, and .*other "
                                        r"holds no complete copy of it; check that it can be reached"):
        load_manifest(url, tmp_path / "other")  # another cache
    assert remote.from_cache == {}
    assert load_manifest(url, cache) == load_manifest(served / "data")
    assert remote.local_copy(url, cache, rank=1, progress=False) == copy
    warned = plan_warnings(make_plan(cfg, world_size=1, cuda=False))
    assert len(warned) == 1 and warned[0].startswith(f"warning: cannot reach {url} (")
    assert f"reading its complete copy in {copy}, fetched 20" in warned[0]
    next(p for p in copy.iterdir() if p.name.endswith(".tar")).unlink()  # no longer complete
    with pytest.raises(DataError, match="holds no complete copy of it"):
        load_manifest(url, cache)


def test_train_refuses_a_url_with_no_manifest_before_starting(served, tmp_path):
    with serve(served) as (url, requests):
        out = run_mtgpt("train", "--data", url + "/elsewhere", "--out", tmp_path / "run", *TINY_ARGS,
                        "--max-steps", "2", check=False)
    assert out.returncode != 0 and "not a data folder mtgpt can read" in out.stderr
    assert requests == ["manifest.json"] and not (tmp_path / "run").exists()


def test_training_fails_clearly_when_the_server_stops_mid_shard(served, tmp_path):
    shard = load_manifest(served / "data")["splits"]["train"]["shards"][0]["file"]
    with serve(served, cut=shard) as (url, _):
        out = run_mtgpt("train", "--data", url, "--out", tmp_path / "run", "--data-cache", tmp_path / "cache",
                        *TINY_ARGS, "--max-steps", "2", check=False)
    assert out.returncode != 0
    assert f"Error (rank 0): cannot fetch {url}/{shard} after {remote.TRIES} tries" in out.stderr  # said once


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_ranks_train_from_a_url_and_resume_exactly_after_sigkill(served, tiny_data, tmp_path):
    """2 ranks from the HTTP server: the same losses as from the local folder; killed with SIGKILL
    and resumed with --resume auto, bit for bit the uninterrupted run."""
    from mtgpt import checkpoint
    from tests.test_resume import kill_group, start, wait_for

    args = [*TINY_ARGS, "--nproc", "2", "--micro-batch", "2", "--ds-config", "zero1_fp32", "--lr", "3e-3",
            "--log-every", "1", "--eval-every", "100", "--eval-samples", "4", "--max-steps", "12"]
    local = tmp_path / "local"
    run_mtgpt("train", "--data", tiny_data, "--out", local, *args, "--save-every", "100")
    with serve(served) as (url, _):
        cmd = ["train", "--data", url, "--out", tmp_path / "run", "--data-cache", tmp_path / "cache", *args,
               "--save-every", "4"]
        proc = start(*cmd)
        wait_for(lambda: (tmp_path / "run" / "checkpoints" / "step_00000004" / checkpoint.COMPLETE).is_file(), proc)
        kill_group(proc)
        assert max(losses(tmp_path / "run")) < 12
        out = run_mtgpt(*cmd, "--resume", "auto")
    assert "resuming from" in out.stdout
    assert losses(tmp_path / "run") == losses(local)
    # the server gone (a compute node without network): resumed again from the cached copy
    out = run_mtgpt("train", "--out", tmp_path / "run", "--resume", "auto", "--max-steps", "14")
    assert f"warning: cannot reach {url} (" in out.stderr and max(losses(tmp_path / "run")) == 14


def test_a_data_folder_with_its_own_tokenizer(tmp_path):
    """The tokenizer's files come with the shards, checked alike, and read like a local folder's."""
    from mtgpt import tokenizer
    from mtgpt.data.prepare import prepare
    from tests.conftest import SONNETS

    prepare([str(SONNETS)], tmp_path / "www" / "data", block_size=32, val_fraction=0.1, quiet=True, vocab_size=300)
    with serve(tmp_path / "www") as (url, requests):
        copy = remote.local_copy(url, tmp_path / "cache", rank=0, progress=False)
        assert "tokenizer.json" in requests and same_files(copy, tmp_path / "www" / "data")
        manifest = load_manifest(url)
        assert tokenizer.for_folder(copy, manifest["tokenizer"]).vocab_size == 300
        (copy / "tokenizer.json").unlink()  # a cache missing it fetches it again
        assert remote.local_copy(url, tmp_path / "cache", rank=1, progress=False) == copy
        assert tokenizer.for_folder(copy, manifest["tokenizer"]).vocab_size == 300
