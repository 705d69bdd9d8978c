"""Data: text -> shards (prepare) and shards -> batches (loader), on real webdataset tar files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mtgpt import tokenizer
from mtgpt.data import DataError, load_manifest, verify
from mtgpt.data import prepare as prepare_mod
from mtgpt.data.loader import Split
from mtgpt.data.prepare import prepare
from tests.conftest import SONNETS

GPT2 = tokenizer.gpt2()


def all_train_samples(data_dir: Path) -> list[bytes]:
    """Every train sample, in the order prepare wrote them."""
    split = Split(data_dir, load_manifest(data_dir), "train")
    return [row.tobytes() for row in split.read(np.arange(len(split)))]


def test_manifest_and_shards(tiny_data):
    m = load_manifest(tiny_data)
    assert m["block_size"] == 32 and m["sample_tokens"] == 33
    assert m["tokenizer"]["vocab_size"] == 50257 and m["tokenizer"]["sha256"].startswith("196139")
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert len(train["shards"]) >= 3  # --shard-size 0.004 MB
    assert train["samples"] == sum(s["samples"] for s in train["shards"]) == len(all_train_samples(tiny_data))
    assert abs(val["samples"] - (train["samples"] + val["samples"]) * 0.1) < 1  # evenly spaced
    assert train["samples"] + val["samples"] == m["tokens"] // 33
    assert m["sources"][0]["bytes"] == SONNETS.stat().st_size
    assert verify(tiny_data) == []


def test_tokens_match_whole_file_tokenization(tmp_path, monkeypatch):
    """Cutting the text into chunks (here 1 KB) gives exactly the ids of tokenizing it whole."""
    monkeypatch.setattr(prepare_mod, "CHUNK_BYTES", 1000)
    out = tmp_path / "d"
    prepare([str(SONNETS)], out, block_size=32, val_fraction=0.0, quiet=True)
    stream = np.concatenate([np.frombuffer(s, "<u2") for s in all_train_samples(out)])
    want = GPT2.encode(SONNETS.read_text()) + [GPT2.eot]
    assert stream.tolist() == want[: len(stream)]
    assert len(want) - len(stream) < 33


def test_documents_separated_by_endoftext(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n" * 20)
    (tmp_path / "b.txt").write_text("second document\nDOC\nthird document\n" * 3)
    out = tmp_path / "d"
    m = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], out, block_size=8, val_fraction=0.0,
                doc_separator="DOC", quiet=True)
    assert m["documents"] == 5  # a.txt, then b.txt split by 3 separator lines into 4 documents
    ids = np.concatenate([np.frombuffer(s, "<u2") for s in all_train_samples(out)]).tolist()
    text = GPT2.decode(ids)
    assert "DOC" not in text
    assert text.startswith("first document\n") and "<|endoftext|>second document" in text
    notes: list[str] = []
    prepare([str(tmp_path / "b.txt")], tmp_path / "e", block_size=8, val_fraction=0.0, doc_separator="DOC", quiet=True,
            warn=notes.append)
    assert not notes
    (tmp_path / "cr.txt").write_bytes(b"doc one\rDOC\rdoc two\r" * 20)  # (lone \r: no line of its own)
    for name, marker in (("cr.txt", "DOC"), ("b.txt", "DCO")):  # never matched: it had gone unsaid
        notes.clear()
        m = prepare([str(tmp_path / name)], tmp_path / name.replace(".", "_"), block_size=8, val_fraction=0.0,
                    doc_separator=marker, quiet=True, warn=notes.append)
        assert m["documents"] == 1 and notes == [f"note: --doc-separator {marker!r} is never a line of its own in the "
                                                 "text (the marker alone on a line that ends with a newline, \\n or "
                                                 "\\r\\n), so each source is one document"]


def test_val_split_is_deterministic(tmp_path):
    a = prepare([str(SONNETS)], tmp_path / "a", block_size=16, val_fraction=0.2, seed=1, quiet=True)
    b = prepare([str(SONNETS)], tmp_path / "b", block_size=16, val_fraction=0.2, seed=1, quiet=True)
    c = prepare([str(SONNETS)], tmp_path / "c", block_size=16, val_fraction=0.2, seed=2, quiet=True)
    sha = lambda m: [s["sha256"] for s in m["splits"]["val"]["shards"]]  # noqa: E731
    assert sha(a) == sha(b) and sha(a) != sha(c)


# ---------------------------------------------------------------- bad input


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare([str(tmp_path / "nope.txt")], tmp_path / "d", quiet=True)
    _nothing_written(tmp_path, tmp_path / "d")


def test_a_quoted_pattern_is_answered_with_glob(tmp_path, monkeypatch):
    """`mtgpt prepare 'corpus/*.txt'` (quoted: the shell passes the pattern) was answered with the
    built-in corpora; now with the command that reads those files."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text\n" * 50)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"corpus/\*\.txt: no such file or folder; mtgpt does not expand patterns "
                                        r"itself: give its folder and the pattern apart: corpus --glob '\*\.txt'$"):
        prepare(["corpus/*.txt"], tmp_path / "d", quiet=True)
    with pytest.raises(DataError, match=r"--glob '\*\*/b\?\.md'$"):
        prepare(["corpus/**/b?.md"], tmp_path / "d", quiet=True)
    with pytest.raises(DataError, match=r"give its folder and the pattern apart: \. --glob '\*\.txt'$"):
        prepare(["*.txt"], tmp_path / "d", quiet=True)


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "d", quiet=True)
    _nothing_written(tmp_path, tmp_path / "d")


def test_binary_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(DataError, match="model.bin: looks like a binary file"):
        prepare([str(tmp_path / "model.bin")], tmp_path / "d", quiet=True)
    _nothing_written(tmp_path, tmp_path / "d")


def test_corpus_shorter_than_a_block(tmp_path):
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(DataError, match="fewer than one sample"):
        prepare([str(tmp_path / "short.txt")], tmp_path / "d", block_size=64, quiet=True)
    _nothing_written(tmp_path, tmp_path / "d")


def test_existing_out_refused_then_overwritten(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        prepare([str(SONNETS)], out, block_size=32, quiet=True)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="--overwrite replaces only a data folder"):  # not a folder of other files
        prepare([str(SONNETS)], out, block_size=32, quiet=True, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    data = tmp_path / "data"
    prepare([str(SONNETS)], data, block_size=32, val_fraction=0.1, quiet=True)
    with pytest.raises(DataError, match="not empty"):
        prepare([str(SONNETS)], data, block_size=16, quiet=True)
    (data / "NOTES.md").write_text("where this text came from")  # a data folder holding more: not replaced
    with pytest.raises(DataError, match=r"also holds what mtgpt does not write there \(NOTES.md\)"):
        prepare([str(SONNETS)], data, block_size=16, quiet=True, overwrite=True)
    (data / "NOTES.md").unlink()
    prepare([str(SONNETS)], data, block_size=16, val_fraction=0.1, quiet=True, overwrite=True)
    assert load_manifest(data)["block_size"] == 16


def test_not_a_data_folder(tmp_path):
    with pytest.raises(DataError, match="not a prepared data folder"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not an mtgpt manifest"):
        load_manifest(tmp_path)


def test_folder_without_text(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.md").write_text("not a txt file")
    with pytest.raises(DataError, match="no files matching"):
        prepare([str(tmp_path / "src")], tmp_path / "d", quiet=True)
    _nothing_written(tmp_path, tmp_path / "d")
    m = prepare([str(tmp_path / "src")], tmp_path / "d", block_size=2, val_fraction=0.0, glob="*.md", quiet=True)
    assert m["sources"][0]["name"].endswith("notes.md")


def test_invalid_utf8_replaced_with_count_or_refused(tmp_path):
    text = SONNETS.read_bytes()
    bad = text[:5000] + b"\xff\xfe caf\xe9 " + text[5000:]  # three invalid bytes
    (tmp_path / "latin.txt").write_bytes(bad)
    warnings = []
    m = prepare([str(tmp_path / "latin.txt")], tmp_path / "d", block_size=32, val_fraction=0.1, quiet=True,
                warn=warnings.append)
    assert m["replaced_bytes"] == 3
    assert len(warnings) == 1 and "latin.txt: 3 invalid UTF-8 byte(s) replaced" in warnings[0]
    with pytest.raises(DataError, match=r"latin.txt: invalid UTF-8 at byte 5000.*--strict"):
        prepare([str(tmp_path / "latin.txt")], tmp_path / "e", block_size=32, quiet=True, strict=True)
    _nothing_written(tmp_path, tmp_path / "e")


def test_stdin_and_glob(tmp_path):
    from tests.conftest import run_mtgpt
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mtgpt", "prepare", "-", "--out", str(tmp_path / "d"),
                           "--block-size", "32", "--val-fraction", "0.1"], input=SONNETS.read_bytes(),
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = load_manifest(tmp_path / "d")
    assert m["sources"] == [{"name": "-", "bytes": None}]
    assert m["tokens"] == len(GPT2.encode(SONNETS.read_text())) + 1
    assert b"B/s" not in proc.stderr  # no progress bar when stderr is not a terminal
    run_mtgpt("info", tmp_path / "d", "--verify")


def test_progress_bar_on_a_terminal(tmp_path):
    """Through a pseudo-terminal the bar shows bytes done and a rate; --quiet hides it."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    def run(*extra):
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100x24 terminal
        proc = subprocess.Popen([sys.executable, "-m", "mtgpt", "prepare", str(SONNETS), "--block-size", "32",
                                 "--val-fraction", "0.1", *extra], stdin=follower, stdout=follower,
                                stderr=follower, close_fds=True)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=60)
        os.close(leader)
        return out.decode(errors="replace")

    shown = run("--out", str(tmp_path / "a"))
    assert "prepare: 100%" in shown and "B/s" in shown
    assert "prepare: " not in run("--out", str(tmp_path / "b"), "--quiet")


def _disk_full_command(tmp_path: Path, text: Path) -> tuple[list[str], str]:
    """A prepare that runs out of space: a 256 KB tmpfs in a private mount namespace (as root), or
    else a 256 KB file-size limit (the kernel refuses the write with EFBIG)."""
    import os
    import shutil
    import sys

    target = tmp_path / "small"
    target.mkdir()
    prepare_cmd = f"{sys.executable} -m mtgpt prepare {text} --out {target}/data --block-size 32"
    if os.geteuid() == 0 and shutil.which("unshare"):
        script = (f"mount -t tmpfs -o size=256k tmpfs {target} && {prepare_cmd}; rc=$?; "
                  f"echo LEFT:$(ls -A {target}); exit $rc")
        return ["unshare", "-m", "sh", "-c", script], "No space left on device"
    script = f"ulimit -f 256; trap '' XFSZ; {prepare_cmd}; rc=$?; echo LEFT:$(ls -A {target}); exit $rc"
    return ["sh", "-c", script], "File too large"


def test_disk_full_leaves_nothing(tmp_path):
    import subprocess

    text = tmp_path / "big.txt"
    text.write_text(SONNETS.read_text() * 40)  # ~500 KB of text -> ~400 KB of shards
    cmd, message = _disk_full_command(tmp_path, text)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr and "nothing was written" in proc.stderr, proc.stderr
    assert "LEFT:\n" in proc.stdout or proc.stdout.strip().endswith("LEFT:"), proc.stdout  # no temp folder left


def test_data_for_another_model_refused(tiny_data, tmp_path):
    from mtgpt.data import check_compatible

    m = load_manifest(tiny_data)
    with pytest.raises(DataError, match="block_size 32 but the model's block_size is 64: pass --block-size 32"):
        check_compatible(m, tiny_data, 50257, 64)
    other = json.loads(json.dumps(m))
    other["tokenizer"] = {"name": "bpe-512", "vocab_size": 512, "sha256": "ab" * 32}
    with pytest.raises(DataError, match="prepared with tokenizer bpe-512 of 512 tokens but the model has 50,257"):
        check_compatible(other, tiny_data, 50257, 32)


def _shapes() -> dict[str, str]:
    """Shapes of text where a careless cut changes the token ids."""
    words = SONNETS.read_text().split()
    paragraphs = [" ".join(words[i:i + 120]) for i in range(0, len(words), 120)]
    return {
        "blank-line paragraphs": "\n\n".join(paragraphs) + "\n",  # every line break is "\n\n"
        "one line": " ".join(words),
        "nbsp indents": "".join(f"\u00a0\u00a0{line}\n" for line in SONNETS.read_text().splitlines()),
        "crlf": SONNETS.read_text().replace("\n", "\r\n"),
        "runs of spaces": "   ".join(words) + "\n",
        "no spaces": "".join(words)[:20000],
        "cr": SONNETS.read_text().replace("\n", "\r"),  # old Mac line ends
        "cr, no spaces": "\r".join("".join(words[i:i + 8]) for i in range(0, len(words), 8)),  # (cut after \r only:
    }  # it was cut at 64 MB, mid-word, and the ids there differed)


@pytest.mark.parametrize("shape", list(_shapes()))
def test_chunks_never_change_token_ids(tmp_path, shape):
    """Tokenizing the chunks one by one gives exactly the ids of tokenizing the file whole, for
    every shape of text (the chunks here are 1 KB, so there are many cuts)."""
    from mtgpt.data.sources import Source, read_chunks

    text = _shapes()[shape]
    path = tmp_path / "t.txt"
    path.write_text(text)
    chunks = [data for _, data in read_chunks(Source("t", path, path.stat().st_size), 1000)]
    assert b"".join(chunks) == text.encode()
    if shape != "no spaces":  # there is nowhere safe to cut a text without spaces or line breaks
        assert len(chunks) > len(text) // 2000
    ids = [i for data in chunks for i in GPT2.encode(data.decode())]
    assert ids == GPT2.encode(text)


def test_chunk_cut_after_a_line_break_before_a_non_ascii_space():
    from mtgpt.data.sources import _cut

    for after in ("\u00a0", "\u3000", "\u2003"):
        buf = ("word\n" + after + "indented line of text").encode()
        assert _cut(buf) == buf.index(b" of")  # the newline is not a safe cut; the last space is
    buf = "DOC ONE\nsome text\nmore text".encode()
    assert _cut(buf, "DOC ONE") == len("DOC ONE\nsome text\n")
    assert _cut(b"text\nDOC ONE\nmore", None) == 8  # "DOC| ONE"
    assert _cut(b"text\nDOC ONE\nmore", "DOC ONE") == 5  # a separator line is never cut in two


def test_byte_order_mark_is_not_text(tmp_path):
    text = "\n".join(SONNETS.read_text().splitlines()[:60]) + "\n"
    (tmp_path / "plain.txt").write_bytes(text.encode())
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    for name in ("plain", "bom"):
        prepare([str(tmp_path / f"{name}.txt")], tmp_path / name, block_size=8, val_fraction=0.0, quiet=True)
    assert all_train_samples(tmp_path / "plain") == all_train_samples(tmp_path / "bom")
    ids = np.frombuffer(all_train_samples(tmp_path / "bom")[0], "<u2").tolist()
    assert ids == GPT2.encode(text)[:9]


@pytest.mark.parametrize("chunk", [1000, 16, 4 << 20])
def test_document_separators_anywhere(tmp_path, monkeypatch, chunk):
    """A separator at the start or end of a file, two in a row, or on both sides of a chunk
    boundary: one <|endoftext|> after each document with text, never one before the first or
    two in a row."""
    monkeypatch.setattr(prepare_mod, "CHUNK_BYTES", chunk)
    lines = SONNETS.read_text().splitlines()[:200]
    docs = ["\n".join(lines[i:i + 17]) + "\n" for i in range(0, len(lines), 17)]
    (tmp_path / "a.txt").write_text("DOC\n" + "DOC\nDOC\n".join(docs) + "DOC\n")
    m = prepare([str(tmp_path / "a.txt")], tmp_path / "d", block_size=8, val_fraction=0.0,
                doc_separator="DOC", quiet=True)
    assert m["documents"] == len(docs)
    stream = np.concatenate([np.frombuffer(s, "<u2") for s in all_train_samples(tmp_path / "d")]).tolist()
    want = [i for doc in docs for i in [*GPT2.encode(doc), GPT2.eot]]
    assert stream == want[:len(stream)] and len(want) - len(stream) < 9


def test_bad_shard_size_and_a_one_sample_corpus(tmp_path):
    for size in (0, -1):
        with pytest.raises(DataError, match="--shard-size must be a positive number of MB"):
            prepare([str(SONNETS)], tmp_path / "d", shard_size_mb=size, quiet=True)
    (tmp_path / "one.txt").write_text(" ".join(SONNETS.read_text().split()[:30]))
    with pytest.raises(DataError, match="the val split is empty") as e:
        prepare([str(tmp_path / "one.txt")], tmp_path / "d", block_size=32, quiet=True)
    assert "raise --val-fraction" not in str(e.value) and "--val-fraction 0" in str(e.value)
    prepare([str(tmp_path / "one.txt")], tmp_path / "d", block_size=32, val_fraction=0, quiet=True)  # as told
    _nothing_written(tmp_path, tmp_path / "e")
    # a size below a byte: a record per shard (the first shard of each split was empty)
    m = prepare([str(SONNETS)], tmp_path / "tiny", block_size=512, val_fraction=0.2, shard_size_mb=1e-9, quiet=True)
    assert all(shard["samples"] > 0 for split in ("train", "val") for shard in m["splits"][split]["shards"]), m


def test_stale_temporary_folders_removed(tmp_path):
    """A prepare killed outright (SIGKILL) leaves .NAME.tmp-PID; the next prepare of the same --out
    removes it once PID has ended, and leaves a running process's alone."""
    import subprocess
    import sys

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (ended.pid, running.pid):
            (tmp_path / f".d.tmp-{pid}").mkdir()
            (tmp_path / f".d.tmp-{pid}" / "train-000000.tar").write_bytes(b"half a shard")
        (tmp_path / ".other.tmp-1").mkdir()  # another --out's
        prepare([str(SONNETS)], tmp_path / "d", block_size=32, val_fraction=0.1, quiet=True)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == \
            [".d.tmp-" + str(running.pid), ".other.tmp-1"]
    finally:
        running.kill()
        running.wait()


# ---------------------------------------------------------------- what a folder holds


def _text(words: int = 300) -> str:
    return " ".join(SONNETS.read_text().split()[:words]) + "\n"


def test_hidden_files_in_folders_skipped(tmp_path):
    """Files under a hidden name inside a folder (notebook checkpoints, .git, a virtualenv) are
    skipped with a counted note; a hidden file named on the command line is read."""
    notes = tmp_path / "notes"
    for rel in ("a.txt", ".ipynb_checkpoints/a-checkpoint.txt", ".git/info.txt", ".venv/lib/x/readme.txt",
                "sub/.draft.txt"):
        (notes / rel).parent.mkdir(parents=True, exist_ok=True)
        (notes / rel).write_text(_text())
    warnings: list[str] = []
    m = prepare([str(notes)], tmp_path / "d", block_size=8, val_fraction=0.0, quiet=True, warn=warnings.append)
    assert [s["name"] for s in m["sources"]] == [str(notes / "a.txt")]
    assert len(warnings) == 1 and warnings[0].startswith("note: skipped 4 file(s) found in folders under a hidden name")
    m = prepare([str(notes / "sub" / ".draft.txt")], tmp_path / "e", block_size=8, val_fraction=0.0, quiet=True)
    assert [s["name"] for s in m["sources"]] == [str(notes / "sub" / ".draft.txt")]


def test_linked_folders_followed_and_each_file_read_once(tmp_path):
    """A linked folder is read like any other (a link back up is no endless loop); a file reached
    twice (named twice, in its folder and by name, through a link) is read once, with a note."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "b.txt").write_text(_text(200))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(_text(300))
    (corpus / "linked").symlink_to(real)
    (corpus / "loop").symlink_to(corpus)  # corpus/loop/loop/... is corpus again
    (corpus / "alias.txt").symlink_to(corpus / "a.txt")
    warnings: list[str] = []
    m = prepare([str(corpus), str(corpus / "a.txt"), str(real / "b.txt"), str(real / "b.txt")], tmp_path / "d",
                block_size=8, val_fraction=0.0, quiet=True, warn=warnings.append)
    assert [s["name"] for s in m["sources"]] == [str(corpus / "a.txt"), str(corpus / "linked" / "b.txt")]
    assert m["documents"] == 2
    assert m["tokens"] == len(GPT2.encode(_text(300))) + len(GPT2.encode(_text(200))) + 2
    assert len(warnings) == 1 and warnings[0].startswith("note: 4 file(s) given more than once"), warnings
    assert f"{corpus / 'alias.txt'} (= {corpus / 'a.txt'})" in warnings[0]


def test_broken_links_in_a_folder_said(tmp_path):
    """A link to nothing inside a folder (a moved file, an unmounted drive) is skipped with a
    warning naming it, not silently; a folder holding only such links names them in its error."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(_text(300))
    (corpus / "moved.txt").symlink_to(tmp_path / "gone" / "moved.txt")
    (corpus / "other.md").symlink_to(tmp_path / "gone" / "other.md")  # not matched by the glob: not said
    warnings: list[str] = []
    m = prepare([str(corpus)], tmp_path / "d", block_size=8, val_fraction=0.0, quiet=True, warn=warnings.append)
    assert [s["name"] for s in m["sources"]] == [str(corpus / "a.txt")]
    assert warnings == [f"warning: skipped 1 link(s) found in folders whose target does not exist: "
                        f"{corpus / 'moved.txt'}; fix or remove the link"]
    (corpus / "a.txt").unlink()
    with pytest.raises(DataError, match=r"no files matching '\*\*/\*.txt' in this folder \(1 link\(s\) to nothing: "
                                        + re.escape(str(corpus / "moved.txt"))):
        prepare([str(corpus)], tmp_path / "e", quiet=True)


def test_empty_or_binary_files_in_a_folder_skipped(tmp_path):
    """In a folder of many files, one that is empty, only whitespace, binary or UTF-16 is skipped
    with one counted warning naming the first few; named on the command line, each is refused."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(5):
        (folder / f"good{i}.txt").write_text(_text(100 + i))
    bad = {"empty.txt": b"", "blank.txt": b"  \n\t\n", "model.txt": bytes(range(256)),
           "wide.txt": "text".encode("utf-16")}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    warnings: list[str] = []
    m = prepare([str(folder)], tmp_path / "d", block_size=8, val_fraction=0.0, quiet=True, warn=warnings.append)
    assert [Path(s["name"]).name for s in m["sources"]] == [f"good{i}.txt" for i in range(5)]
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipped 4 file(s) found in folders that are "
                                                         "empty or not text: "), warnings
    assert f"{folder / 'blank.txt'} (whitespace)" in warnings[0] and "and 1 more" in warnings[0]
    for name, why in {"empty.txt": "the file is empty", "blank.txt": "holds only whitespace",
                      "model.txt": "binary", "wide.txt": "UTF-16"}.items():
        with pytest.raises(DataError, match=why):
            prepare([str(folder / name)], tmp_path / "e", quiet=True)
    for good in folder.glob("good*"):
        good.unlink()
    with pytest.raises(DataError, match=r"none of its 4 file\(s\) matching '\*\*/\*.txt' holds text; the first: .*blank"):
        prepare([str(folder)], tmp_path / "e", quiet=True)
    _nothing_written(tmp_path, tmp_path / "e")


def test_utf16_and_gzip_named_as_such(tmp_path):
    """Not "binary (NUL bytes)": UTF-16/32 (by its byte-order mark) and gzip say what they are and
    the command that converts them."""
    import gzip
    import shutil
    import subprocess

    text = SONNETS.read_text()
    cases = {"le.txt": text.encode("utf-16"), "be.txt": b"\xfe\xff" + text.encode("utf-16-be"),
             "u32.txt": text.encode("utf-32"), "s.txt.gz": gzip.compress(text.encode())}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name, fix in {"le.txt": "iconv -f UTF-16 -t UTF-8 {p} > {p}.utf8.txt",
                      "be.txt": "iconv -f UTF-16 -t UTF-8 {p} > {p}.utf8.txt",
                      "u32.txt": "iconv -f UTF-32 -t UTF-8 {p} > {p}.utf8.txt",
                      "s.txt.gz": "gzip-compressed; decompress it first (gunzip -k {p})"}.items():
        with pytest.raises(DataError) as e:
            prepare([str(tmp_path / name)], tmp_path / "d", quiet=True)
        assert fix.format(p=tmp_path / name) in str(e.value) and "NUL" not in str(e.value)
    if shutil.which("iconv"):  # the command given does what it says
        subprocess.run(f"iconv -f UTF-16 -t UTF-8 {tmp_path / 'le.txt'} > {tmp_path / 'le.txt'}.utf8.txt", shell=True,
                       check=True)
        assert (tmp_path / "le.txt.utf8.txt").read_text() == text


def test_standard_input_and_nul_bytes_past_the_start_are_checked_as_files_are(tmp_path):
    """Text piped on stdin skipped every check a file gets: gzip, UTF-16 and binary were tokenized
    as text (1.0 bytes/token) and prepare exited 0. NUL bytes past the first 8 KB of a file (which
    listing reads) went through too. Each is refused in one line, nothing written."""
    import gzip
    import subprocess
    import sys

    text = SONNETS.read_text()
    for data, said in ((gzip.compress(text.encode()), "-: is gzip-compressed; decompress it first (gunzip -c FILE.gz "
                                                      "| mtgpt ... -)"),
                       (text.encode("utf-16"), "-: is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; "
                                               "convert it: iconv -f UTF-16 -t UTF-8 FILE | mtgpt ... -"),
                       (b"\x7fELF\x02\x01\x01\0" + bytes(5000), "-: looks like a binary file (it contains NUL bytes)")):
        proc = subprocess.run([sys.executable, "-m", "mtgpt", "prepare", "-", "--out", str(tmp_path / "d"), "-q"],
                              input=data, capture_output=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.decode().startswith(f"Error: {said}"), proc.stderr[-2000:]
        assert not (tmp_path / "d").exists()
    (tmp_path / "late.txt").write_bytes(text.encode()[:12000] + b"\0" + text.encode()[12000:])
    with pytest.raises(DataError, match=r"late.txt: looks like a binary file \(a NUL byte at byte 12,000\)"):
        prepare([str(tmp_path / "late.txt")], tmp_path / "d", quiet=True)
    assert not (tmp_path / "d").exists()


def test_chat_looking_jsonl_prepared_as_text_gets_a_note(tmp_path):
    line = json.dumps({"messages": [{"role": "user", "content": "hi " * 20}, {"role": "assistant", "content": "yo"}]})
    (tmp_path / "talk.jsonl").write_text((line + "\n") * 20)
    warnings: list[str] = []
    prepare([str(tmp_path / "talk.jsonl")], tmp_path / "d", block_size=8, val_fraction=0.0, quiet=True,
            warn=warnings.append)
    assert len(warnings) == 1 and "looks like chat data" in warnings[0] and "--format chat" in warnings[0]
    (tmp_path / "plain.jsonl").write_text(json.dumps({"text": "not a conversation " * 20}) + "\n")
    warnings.clear()
    prepare([str(tmp_path / "plain.jsonl")], tmp_path / "e", block_size=8, val_fraction=0.0, quiet=True,
            warn=warnings.append)
    assert warnings == []


@pytest.mark.parametrize("block, fmt", [(64, "text"), (1, "text"), (32, "chat")])
def test_shards_are_the_size_asked(tmp_path, block, fmt):
    """--shard-size 10 gave 19.7 MB shards at block 64 (and 32x the size at block 1): the writer
    counted the members' bytes, not their tar headers and padding, and a float mtime added a 1 KB
    PAX header to every member. The files are now the size asked, within one record."""
    import tarfile

    if fmt == "chat":
        (tmp_path / "talk.yml").write_text("conversations:\n" + "- - Hello there\n  - Hi, how are you today?\n" * 6000)
        inputs = [str(tmp_path / "talk.yml")]
    else:
        (tmp_path / "text.txt").write_text(SONNETS.read_text() * (80 if block > 1 else 8))
        inputs = [str(tmp_path / "text.txt")]
    m = prepare(inputs, tmp_path / "d", block_size=block, val_fraction=0.0, shard_size_mb=0.1, fmt=fmt, quiet=True)
    sizes = [s["bytes"] for s in m["splits"]["train"]["shards"]]
    assert len(sizes) > 2 and all(90_000 <= n <= 100_000 + 2 * 10_240 for n in sizes[:-1]), sizes
    with tarfile.open(tmp_path / "d" / m["splits"]["train"]["shards"][0]["file"]) as tar:
        assert not any(member.pax_headers for member in tar.getmembers())
