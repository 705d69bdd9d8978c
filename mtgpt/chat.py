"""Chat: the template, turning dialogue data into training text, and the terminal loop.

The template is written with plain-text markers (any tokenizer reads them; GPT-2's has no chat
tokens), one turn per line, each conversation one document:

    System: You are a helpful assistant.      (optional, from a "system" message)
    User: Hello!
    Bot: Hi, how are you?
    User: Fine, thanks.
    Bot: Good to hear.

A reply is the text the model writes after "Bot:" up to the end of the line. Newlines inside a
message are written as spaces, so a turn is always exactly one line.

Dialogue files (chatterbot YAML, JSONL) are decoded as prepare decodes text (`read_lines`), and
every turn is the text written in the file: a turn that is not text is refused, naming the file
and where in it.

Training data and prompts are tokenized alike (`template_ids`): the template text is cut where
each reply begins (right after "Bot:") and ends (after its line end), and each piece is encoded
on its own. A prompt ends with "Bot:", so it is exactly the ids that come before a reply in the
training data, and the reply's first token (" Hi", or a bare " " in a small vocabulary) is the
first thing the model writes, a trained target.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from mtgpt.config import MAX_SEED
from mtgpt.data.sources import decode_utf8, strip_bom
from mtgpt.tokenizer import Tokenizer

USER, BOT, SYSTEM = "User: ", "Bot: ", "System: "
ROLES = {"user": USER, "assistant": BOT, "bot": BOT, "system": SYSTEM, "developer": SYSTEM}
DOC_SEPARATOR = "\x1e"  # a line holding only ASCII "record separator" ends a conversation


class ChatDataError(ValueError):
    """Dialogue data mtgpt cannot read; the message names the file and the problem."""


def _line(text: str) -> str:
    return " ".join(str(text).split())


def turn_line(marker: str, text: str) -> str:
    """One turn of the template: its marker, its text on one line, the line end."""
    return f"{marker}{_line(text)}\n"


def render(turns: Iterable[tuple[str, str]]) -> str:
    """[(role marker, text), ...] -> the template text, one line per turn."""
    return "".join(turn_line(marker, text) for marker, text in turns)


def prompt_for(history: list[tuple[str, str]], message: str, system: str | None = None) -> str:
    """The text the model continues: past exchanges, the new user line, and "Bot:"."""
    turns = [(SYSTEM, system)] if system else []
    for user, bot in history:
        turns += [(USER, user), (BOT, bot)]
    return render(turns + [(USER, message)]) + BOT.rstrip()


def read_lines(path: Path, strict: bool = False, replaced: dict[Path, int] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a dialogue file, decoded as prepare decodes text
    (mtgpt.data.sources.decode_utf8): a leading byte-order mark is dropped, and invalid UTF-8 is
    replaced with U+FFFD and counted in replaced[path], or, when strict, refused naming the line."""
    with path.open("rb") as f:
        offset = 0
        for n, raw in enumerate(f, 1):
            data = strip_bom(raw) if n == 1 else raw
            text, bad = decode_utf8(data, strict, f"{path}:{n}", offset + len(raw) - len(data))
            if replaced is not None:
                replaced[path] = replaced.get(path, 0) + bad
            offset += len(raw)
            yield n, text


def conversations_from_yaml(path: Path, strict: bool = False, replaced: dict[Path, int] | None = None
                            ) -> Iterator[list[tuple[str, str]]]:
    """chatterbot-corpus YAML: `conversations:` lists of alternating user and bot lines. Every line
    is the text as written: YAML 1.1 would read `Yes`, `off`, `12:30`, `007`, `null` as True,
    False, 750, 7, None (BaseLoader types nothing). A line YAML reads as a mapping (`Note: x`,
    unquoted) or a list is refused; an entry of `conversations` that is one line (a user line
    with no reply) is read as it is: it gives nothing to train on, which prepare counts."""
    import yaml

    try:
        data = yaml.load("".join(line for _, line in read_lines(path, strict, replaced)), Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        raise ChatDataError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); --format chat reads chatterbot YAML or "
                            'JSONL of {"messages": [...]} (plain text is --format text, the default)') from None
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise ChatDataError(f"{path}: expected a chatterbot YAML file with a 'conversations' list")
    for k, conv in enumerate(data["conversations"], 1):
        conv = [conv] if not isinstance(conv, list) else conv  # `- hello`: one line
        for i, text in enumerate(conv, 1):
            if not isinstance(text, str):
                kind = "mapping" if isinstance(text, dict) else "list"
                raise ChatDataError(f"{path}: conversation {k}, turn {i} is a YAML {kind} ({str(text)[:40]}), not text; "
                                    "quote it (- \"Note: like this\") to keep a ': ' or a leading '[' or '{'")
        yield [(USER if i % 2 == 0 else BOT, text) for i, text in enumerate(conv)]


MESSAGES = '{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}'


def _turns(conversation: Any, where: str) -> list[tuple[str, str]]:
    """One {"messages": [...]} object as [(role marker, text), ...]; ChatDataError names `where`."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list):
        raise ChatDataError(f"{where}: expected {MESSAGES}")
    for i, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and "role" in m and "content" in m):
            raise ChatDataError(f"{where}: message {i} has no \"role\" or no \"content\"; expected {MESSAGES}")
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise ChatDataError(f"{where}: unknown role {m['role']!r} (message {i}); roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):  # str(None) would train the word "None"
            raise ChatDataError(f"{where}: message {i} has \"content\": {json.dumps(m['content'])[:40]}; "
                                "give its text as a string (\"\" for an empty message)")
    return [(ROLES[m["role"]], m["content"]) for m in messages]


def _json(text: str, path: Path, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatDataError(f"{path}:{line + e.lineno - 1}: expected {MESSAGES} (not valid JSON: {e.msg})") from None


def conversations_from_json(path: Path, strict: bool = False, replaced: dict[Path, int] | None = None
                            ) -> Iterator[list[tuple[str, str]]]:
    """JSON Lines, one conversation per line: {"messages": [{"role": ..., "content": ...}, ...]};
    or, when the file's first line starts with "[", one JSON array of such conversations."""
    lines = read_lines(path, strict, replaced)
    first = True
    for n, line in lines:
        if not line.strip():
            continue
        if first and line.lstrip().startswith("["):
            array = _json(line + "".join(rest for _, rest in lines), path, n)
            for i, conversation in enumerate(array, 1):
                yield _turns(conversation, f"{path}: conversation {i}")
            return
        first = False
        yield _turns(_json(line.rstrip("\r\n"), path, n), f"{path}:{n}")


READERS = {".yml": conversations_from_yaml, ".yaml": conversations_from_yaml, ".json": conversations_from_json,
           ".jsonl": conversations_from_json}  # by suffix, in any case; any other file is read as YAML
# what prepare takes from a folder (not *.json: data and tokenizer folders hold some; a .json file is read when named)
DIALOGUE_GLOBS = ("**/*.yml", "**/*.yaml", "**/*.jsonl")


def conversations(inputs: list[Path], strict: bool = False, replaced: dict[Path, int] | None = None
                  ) -> Iterator[list[tuple[str, str]]]:
    """Every conversation of `inputs` (YAML or JSON files: READERS), in order. Invalid UTF-8 is
    replaced and counted per file in `replaced`, or refused when `strict` (read_lines)."""
    for path in inputs:
        yield from READERS.get(path.suffix.lower(), conversations_from_yaml)(path, strict, replaced)


def to_template_file(inputs: list[Path], out: Path, strict: bool = False) -> int:
    """Write every conversation of `inputs` (YAML or JSONL) as template text, conversations
    separated by DOC_SEPARATOR lines. Returns the number of conversations."""
    count = 0
    with out.open("w", encoding="utf-8") as f:
        for turns in conversations(inputs, strict):
            f.write(render(turns) + DOC_SEPARATOR + "\n")
            count += 1
    if count == 0:
        raise ChatDataError(f"no conversations found in {', '.join(map(str, inputs))}")
    return count


def template_ids(tok: Tokenizer, turns: list[tuple[str, str]], prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The template text of `turns` (then "Bot:" if `prompt`) as token ids, and which ids are a
    bot's reply. The text is cut into context ("User: ...", "System: ..." lines and "Bot:") and
    replies (" " + the text + the line end), each piece encoded on its own, so no token spans a
    reply's start or end, and a prompt's ids are exactly those that precede a reply in training."""
    pieces: list[tuple[str, bool]] = []
    context = ""
    for marker, text in turns:
        if marker == BOT:
            pieces += [(context + BOT.rstrip(), False), (turn_line(BOT, text).removeprefix(BOT.rstrip()), True)]
            context = ""
        else:
            context += turn_line(marker, text)
    pieces.append((context + BOT.rstrip() if prompt else context, False))
    ids, is_reply = [], []
    for text, reply in pieces:
        piece = tok.encode(text)
        ids += piece
        is_reply += [reply] * len(piece)
    return np.array(ids, dtype=np.uint32), np.array(is_reply, dtype=bool)


def prompt_ids(tok: Tokenizer, turns: list[tuple[str, str]]) -> list[int]:
    """The ids the model continues to answer the last of `turns`: their template text and "Bot:"."""
    return template_ids(tok, turns, prompt=True)[0].tolist()


def training_tokens(tok: Tokenizer, turns: list[tuple[str, str]], train_on: str = "bot") -> tuple[np.ndarray, np.ndarray]:
    """A conversation as training data: (its token ids in the template, which to train on).

    train_on "bot": every token the model writes after a prompt's "Bot:": the bot's replies, the
    space after "Bot:" that starts each, and their line ends (so the model learns to answer and to
    stop); "Bot:" itself and every System and User token are only context. "all": every token (as
    plain text is trained)."""
    ids, is_reply = template_ids(tok, turns)
    return ids, np.ones(len(ids), dtype=bool) if train_on == "all" else is_reply


@dataclasses.dataclass
class Fit:
    """A conversation fitted into the context (`fit_turns`), and what of it was left out."""
    kept: list[tuple[str, str]]  # the turns between the leading System turns and the last that are kept
    ids: list[int]  # the prompt
    reply: int  # the reply's token budget
    dropped: int = 0  # the oldest turns left out
    head_out: bool = False  # the leading System turns left out (no room beside a long last turn)
    cut: bool = False  # the last turn lost the beginning of its text

    def left_out(self, turn: str = "turn") -> list[str]:
        """What was left out, in words: ["the system message(s)", "the 3 oldest turns", ...]."""
        return ((["the system message(s)"] if self.head_out else [])
                + ([f"the {self.dropped} oldest {turn}s" if self.dropped > 1 else f"the oldest {turn}"]
                   if self.dropped else [])
                + ([f"the start of the last {turn}"] if self.cut else []))


def fit_turns(tok: Tokenizer, turns: list[tuple[str, str]], block_size: int, reply_tokens: int, unit: int = 1) -> Fit:
    """Fit a conversation into the context.

    `turns` is [(role marker, text), ...]: leading System turns, the conversation, and the turn
    to answer last. The prompt is their template text followed by "Bot:" (`prompt_ids`). The
    leading System turns and the last turn are always kept whole: the reply budget is capped at
    what the context leaves after them, then the oldest turns in between are dropped, `unit` at a
    time, until the rest fits. Only a last turn too long for the context loses the beginning of
    its text (its marker and the "Bot:" after it stay), with a quarter of the context left for
    the reply, and the System turns too when there is no room for them beside it."""
    n_head = next((i for i, (marker, _) in enumerate(turns[:-1]) if marker != SYSTEM), len(turns) - 1)
    head, middle, last = turns[:n_head], turns[n_head:-1], turns[-1]
    turn = prompt_ids(tok, head + [last])
    reply = max(1, min(reply_tokens, block_size - len(turn)))
    if len(turn) + reply > block_size:
        reply = max(1, min(reply_tokens, block_size // 4))
        start = tok.encode(render(head)) + tok.encode(last[0].rstrip())
        tail = tok.encode("\n" + BOT.rstrip())
        head_out = bool(head) and block_size - reply - len(start) - len(tail) < 1  # no room beside the System lines
        if head_out:
            start = tok.encode(last[0].rstrip())
        body = tok.encode(" " + _line(last[1]))
        room = max(1, block_size - reply - len(start) - len(tail))
        ids = (start + body[-room:] + tail)[-(block_size - reply):]
        return Fit([], ids, reply, dropped=len(middle), head_out=head_out, cut=len(body) > room)

    def fits(dropped: int) -> bool:  # with the oldest `dropped` units of the middle left out
        return len(prompt_ids(tok, head + middle[dropped * unit:] + [last])) + reply <= block_size

    # The fewest units dropped that fit, found in a few tokenizations of at most a context of turns
    # (dropping one at a time tokenized the conversation once per turn: a request of thousands of
    # short turns held a server for minutes). All dropped fits (checked above); every turn takes a
    # token at least, so fewer than len(middle) - block_size dropped never does.
    low, high = -(-max(0, len(middle) - block_size) // unit), -(-len(middle) // unit)
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    kept = list(middle[low * unit:])
    return Fit(kept, prompt_ids(tok, head + kept + [last]), reply, dropped=len(middle) - len(kept))


def fit_history(tok: Tokenizer, history: list[tuple[str, str]], message: str, block_size: int, reply_tokens: int,
                system: str | None = None) -> tuple[list[tuple[str, str]], Fit]:
    """`fit_turns` for the terminal chat: (the history of (user, bot) exchanges kept, the fit);
    the oldest exchanges are dropped whole."""
    turns = [(SYSTEM, system)] if system else []
    for user, bot in history:
        turns += [(USER, user), (BOT, bot)]
    fit = fit_turns(tok, turns + [(USER, message)], block_size, reply_tokens, unit=2)
    return list(history[len(history) - len(fit.kept) // 2:]) if fit.kept else [], fit


def crop_warnings(fit: Fit, block_size: int) -> list[str]:
    """What of the new message and the --system line a `fit_history` left out, as warnings (the
    oldest exchanges are dropped without a word: that is the chat's rule)."""
    warnings = []
    if fit.head_out:
        warnings.append(f"warning: the --system line does not fit in the context of {block_size} tokens beside "
                        "your message; it was left out of this turn")
    if fit.cut:
        warnings.append(f"warning: your message is longer than the context of {block_size} tokens allows (a quarter "
                        "of it is kept for the reply); the model sees only its end")
    return warnings


def reply_stream(model, tok: Tokenizer, prompt_ids: list[int], cfg) -> Iterator[str]:
    """Text pieces of the model's reply, up to the end of the line (or <|endoftext|>)."""
    from mtgpt.sample import SampleText, on_host, stream

    text = SampleText(tok, chat_reply=True)
    for nxt in on_host(stream(model, prompt_ids, cfg)):
        piece = text.add(nxt[0])
        if piece:
            yield piece
        if text.finish:
            return
    yield text.length()


HELP = "Type a message and press Enter. /reset forgets the conversation, /quit or Ctrl-D ends it."


def dialogue_note(run_dir: str | Path) -> str | None:
    """A note for chatting with a run whose training data held no dialogue (every data folder it
    names that is still on disk was prepared as plain text): it continues text rather than
    answering. None when it saw dialogue, or when that cannot be told (no train_config.json, a
    Hugging Face folder, data moved or at a URL)."""
    from mtgpt import folders
    from mtgpt.config import data_sources
    from mtgpt.data import load_manifest

    run = Path(run_dir)
    try:
        data = json.loads((run / folders.TRAIN_CONFIG).read_text(encoding="utf-8"))["data"]
        contents = {load_manifest(s.path).get("content", "text") for s in data_sources(data)
                    if (Path(s.path) / folders.MANIFEST).is_file()}
    except Exception:  # (anything unreadable: no note, never an error)
        return None
    if contents != {"text"}:
        return None
    return (f"note: {run_dir} was trained on plain text, not dialogue, so it continues the conversation as text "
            "rather than answering; fine-tune it on dialogue first (README, Chat: make chat-demo shows how)")


def run_chat(run_dir: str, cfg, best: bool = False, device: str = "auto", system: str | None = None,
             read=input, write=print, dtype: str = "auto", warn=print) -> None:
    """The terminal loop of `mtgpt chat`; `warn` says what of a message or the system line did
    not fit in the context (crop_warnings)."""
    from mtgpt.sample import load_for_inference

    model, tok = load_for_inference(run_dir, best, device, dtype)
    cfg.check(model.config.vocab_size)
    cfg.num_samples, cfg.stop_at_eot = 1, True
    write(f"mtgpt chat with {run_dir} (context {model.config.block_size} tokens). {HELP}\n")
    if note := dialogue_note(run_dir):
        warn(note)
    history: list[tuple[str, str]] = []
    turn = 0  # with --seed, reply N draws from seed + N: one seed, one conversation, not one stream per reply
    while True:
        try:
            message = read("you> ")
        except EOFError:  # (Ctrl-C ends it as it ends every command: `interrupted`, exit 130)
            write("\n")
            return
        if message.strip() in ("/quit", "/exit"):
            return
        if message.strip() == "/reset":
            history = []
            write("(conversation forgotten)\n")
            continue
        if not message.strip():
            continue
        history, fit = fit_history(tok, history, message, model.config.block_size, cfg.max_new_tokens, system)
        ids, reply = fit.ids, fit.reply
        for warning in crop_warnings(fit, model.config.block_size):
            warn(warning)
        write("bot> ")
        pieces = []
        seed = None if cfg.seed is None else (cfg.seed + turn) % (MAX_SEED + 1)
        turn += 1
        for piece in reply_stream(model, tok, ids, dataclasses.replace(cfg, max_new_tokens=reply, seed=seed)):
            pieces.append(piece)
            write(piece)
        write("\n")
        history.append((message, "".join(pieces).strip()))
