"""Data folders at a URL: `http(s)://HOST/PATH` (the folder's files under it) or `pipe:COMMAND`
(a shell command that writes the file `{shard}` names to stdout, e.g.
`pipe:aws s3 cp s3://bucket/data/{shard} -`, webdataset's convention).

The manifest is fetched first and checked like a local one (before any rank starts). Each rank
then makes a local copy in a cache folder keyed by the manifest's content: every shard streams
into a temporary file, is checked against the manifest's size and sha256, and is renamed into
place only when whole, so a cache never holds half a shard. Ranks on one machine share the
cache (a lock per shard: one fetches, the others wait and use it). Training reads the copy by
random access (mtgpt.data.loader). A failed fetch is retried with backoff `TRIES` times, then
fails with the URL and the rank; a 4xx answer (no such file) fails at once.

A complete copy is remembered by its URL (`urls/` in the cache). When the manifest cannot be
fetched (no network on a compute node, the server down; not a 4xx answer) the last complete copy
of that URL is read instead, and `from_cache` says so (training prints it as a warning).
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from mtgpt.data.sources import DataError

TRIES = 4  # attempts per file
BACKOFF_S = 0.5  # wait before the 2nd attempt; doubles after each failure
TIMEOUT_S = 60  # per HTTP read
BLOCK = 1 << 20
PLACEHOLDER = "{shard}"
URLS = "urls"  # in the cache: which folder holds the last complete copy of each URL

from_cache: dict[str, str] = {}  # URL -> why this process reads its cached copy (see read_manifest)


def is_url(data: str | Path) -> bool:
    return isinstance(data, str) and data.startswith(("http://", "https://", "pipe:"))


def file_url(data: str, name: str) -> str:
    """Where file `name` of the data folder at `data` is."""
    if data.startswith("pipe:"):
        if PLACEHOLDER not in data:
            raise DataError(f"{data}: a pipe: data URL must contain {PLACEHOLDER} where the file name goes, "
                            f"e.g. 'pipe:aws s3 cp s3://bucket/data/{PLACEHOLDER} -'")
        return data.replace(PLACEHOLDER, name)
    return data.rstrip("/") + "/" + name


class _Permanent(Exception):
    """A failure that trying again cannot fix (the server says there is no such file)."""


class _Absent(DataError):
    """The server answered that there is no such file (a DataError; not retried)."""


def _stream(url: str) -> Iterator[bytes]:
    """The bytes of one URL in blocks. Raises on any failure, _Permanent on a 4xx answer."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            while block := proc.stdout.read(BLOCK):
                yield block
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait() != 0:
                raise OSError(f"the command exited with status {proc.returncode}" + (f": {err[-300:]}" if err else ""))
        return
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            while block := response.read(BLOCK):
                yield block
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500:
            raise _Permanent(f"HTTP {e.code} {e.reason}") from None
        raise


def _fetch(url: str, write: Callable[[bytes], None], restart: Callable[[], None], expect: int | None,
           rank: int | None) -> None:
    """Stream `url` into `write`, `TRIES` times at most; `restart` empties what a failed try wrote."""
    who = f"rank {rank}: " if rank is not None else ""
    wait = BACKOFF_S
    for attempt in range(1, TRIES + 1):
        got = 0
        try:
            for block in _stream(url):
                got += len(block)
                write(block)
            if expect is not None and got != expect:
                raise OSError(f"got {got} bytes, the manifest says {expect}")
            return
        except _Permanent as e:
            raise _Absent(f"{who}cannot fetch {url}: {e}") from None
        except Exception as e:  # noqa: BLE001 (connection reset, timeout, short read, 5xx, a failed command)
            if attempt == TRIES:
                raise DataError(f"{who}cannot fetch {url} after {TRIES} tries: {e}") from None
            restart()
            time.sleep(wait)
            wait *= 2


def read_manifest(data: str, rank: int | None = None, cache: str | Path | None = None) -> tuple[dict[str, Any], bytes]:
    """The manifest of the data folder at URL `data` (and its bytes). If the URL cannot be
    reached (anything but a 4xx answer), the manifest of its last complete copy in `cache`."""
    from mtgpt.data.manifest import MANIFEST

    url = file_url(data, MANIFEST)
    if data not in from_cache:  # (this process found it unreachable already: no new tries)
        parts: list[bytes] = []
        try:
            _fetch(url, parts.append, parts.clear, None, rank)
            return _parse(url, b"".join(parts))
        except _Absent as e:
            raise DataError(f"{data} is not a data folder mtgpt can read ({e}); upload the whole folder "
                            "`mtgpt prepare` wrote, manifest.json included") from None
        except DataError as e:
            why = str(e)
    else:
        why = "it could not be reached earlier in this process"
    copy = _complete_copy(data, cache)
    if copy is None:
        raise DataError(f"{data} is not a data folder mtgpt can read ({why}), and {cache_root(cache)} holds no "
                        "complete copy of it; check that it can be reached (the folder `mtgpt prepare` wrote, "
                        "manifest.json included), or give --data-cache the cache that holds it")
    folder, fetched = copy
    from_cache.setdefault(data, f"cannot reach {data} ({why}); reading its complete copy in {folder}, fetched {fetched}")
    return _parse(folder / MANIFEST, (folder / MANIFEST).read_bytes())


def _parse(where: str | Path, raw: bytes) -> tuple[dict[str, Any], bytes]:
    try:
        return json.loads(raw), raw
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON ({e}); upload the folder `mtgpt prepare` wrote again") from None


def _url_record(data: str, cache: str | Path | None) -> Path:
    return cache_root(cache) / URLS / (hashlib.sha256(data.encode()).hexdigest()[:16] + ".json")


def _remember(data: str, cache: str | Path | None, folder: Path) -> None:
    """Record `folder` as the last complete copy of URL `data` (atomically: ranks may race)."""
    record = _url_record(data, cache)
    record.parent.mkdir(exist_ok=True)
    tmp = record.with_name(f".{record.name}.{os.getpid()}")
    fetched = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    tmp.write_text(json.dumps({"url": data, "folder": folder.name, "fetched": fetched}) + "\n")
    tmp.replace(record)


def _complete_copy(data: str, cache: str | Path | None) -> tuple[Path, str] | None:
    """The last complete copy of URL `data` in the cache and when it was fetched, if every file
    its manifest lists is whole."""
    from mtgpt.data.manifest import MANIFEST, data_files

    try:
        record = json.loads(_url_record(data, cache).read_text())
        folder = cache_root(cache) / record["folder"]
        manifest = json.loads((folder / MANIFEST).read_bytes())
        whole = all(_whole(folder / f["file"], f) for f in data_files(manifest))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (folder, record.get("fetched", "earlier")) if whole and record.get("url") == data else None


def cache_root(cache: str | Path | None) -> Path:
    """--data-cache, or $XDG_CACHE_HOME/mtgpt/data (~/.cache/mtgpt/data)."""
    if cache:
        return Path(cache)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtgpt" / "data"


def local_copy(data: str, cache: str | Path | None, rank: int | None = None, progress: bool = True) -> Path:
    """A local folder with the data folder at URL `data` in it, fetched into the cache (files
    already there are kept). Returns the folder, which reads like any prepared data folder."""
    from mtgpt.data.manifest import MANIFEST, data_files, load_manifest, sha256_file

    manifest, raw = read_manifest(data, rank, cache)
    folder = cache_root(cache) / hashlib.sha256(raw).hexdigest()[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot keep the shards of {data} in {cache_root(cache)} ({e.strerror}); give --data-cache a "
                        "folder you can write to") from None
    shards = data_files(manifest)  # the shards and the tokenizer's files
    missing = [s for s in shards if not _whole(folder / s["file"], s)]
    bar = tqdm(total=sum(s["bytes"] for s in missing), unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"fetch {data}", disable=True if not (progress and missing) else None, dynamic_ncols=True)
    for shard in missing:
        dest = folder / shard["file"]
        with open(folder / f".{shard['file']}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be fetching it: wait, then use its copy
            if _whole(dest, shard):
                bar.update(shard["bytes"])
                continue
            tmp = folder / f".{shard['file']}.part-{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    def write(block: bytes) -> None:
                        f.write(block)
                        bar.update(len(block))

                    def restart() -> None:
                        bar.update(-f.tell())
                        f.seek(0)
                        f.truncate()

                    _fetch(file_url(data, shard["file"]), write, restart, shard["bytes"], rank)
                if sha256_file(tmp) != shard["sha256"]:
                    raise DataError(f"rank {rank}: {file_url(data, shard['file'])} differs from its manifest "
                                    "(sha256); upload the data folder again")
                tmp.replace(dest)
            finally:
                tmp.unlink(missing_ok=True)  # a failed or interrupted fetch leaves nothing half-written
    bar.close()
    tmp_manifest = folder / f".{MANIFEST}.{os.getpid()}"
    tmp_manifest.write_bytes(raw)
    tmp_manifest.replace(folder / MANIFEST)
    load_manifest(folder)  # the copy is a complete data folder
    _remember(data, cache, folder)
    return folder


def _whole(path: Path, shard: dict[str, Any]) -> bool:
    """A cached shard is whole once renamed into place (it was checked before the rename)."""
    return path.is_file() and path.stat().st_size == shard["bytes"]
