"""Chat: the template, dialogue data to shards, the context window, and the terminal loop
driven through a pseudo-terminal."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest
import torch

from mtgpt import chat, checkpoint, tokenizer
from mtgpt.config import ModelConfig
from mtgpt.data import DataError, load_manifest
from mtgpt.data.prepare import prepare
from mtgpt.model import GPT
from tests.conftest import TINY, run_mtgpt
from tests.test_data import all_train_samples

GPT2 = tokenizer.gpt2()


def test_template():
    text = chat.prompt_for([("Hi there", "Hello!\nHow are you?")], "Fine", system="Be brief.")
    assert text == "System: Be brief.\nUser: Hi there\nBot: Hello! How are you?\nUser: Fine\nBot:"


def test_prepare_chat_formats(tmp_path):
    """YAML and JSONL; each conversation starts its own sample (padded with <|endoftext|>)."""
    (tmp_path / "talk.yml").write_text("categories: [test]\nconversations:\n- - Hello\n  - Hi there\n"
                                       "- - What is your name?\n  - I am a bot.\n  - Nice.\n  - Thanks.\n")
    (tmp_path / "talk.jsonl").write_text(json.dumps({"messages": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hey"},
        {"role": "assistant", "content": "Hello, friend."}]}) + "\n")
    out = tmp_path / "d"
    m = prepare([str(tmp_path / "talk.yml"), str(tmp_path / "talk.jsonl")], out, block_size=32, val_fraction=0.0,
                fmt="chat", quiet=True)
    assert m["content"] == "chat" and m["conversations"] == 3 and m["documents"] == 3 and m["loss_mask"]
    samples = [GPT2.decode(__import__("numpy").frombuffer(s, "<u2").tolist()) for s in all_train_samples(out)]
    assert [s.split("<|endoftext|>")[0] for s in samples] == [
        "User: Hello\nBot: Hi there\n", "User: What is your name?\nBot: I am a bot.\nUser: Nice.\nBot: Thanks.\n",
        "System: Be kind.\nUser: Hey\nBot: Hello, friend.\n"]
    assert all(set(s.split("<|endoftext|>", 1)[1].split("<|endoftext|>")) == {""} for s in samples)  # padding
    assert [s["name"] for s in m["sources"]] == [str(tmp_path / "talk.yml"), str(tmp_path / "talk.jsonl")]


def test_chat_files_with_a_byte_order_mark(tmp_path):
    """A JSONL or YAML file an editor saved with a byte-order mark reads as without one."""
    line = json.dumps({"messages": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hi."}]})
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (line + "\n").encode())
    (tmp_path / "bom.yml").write_bytes(b"\xef\xbb\xbfconversations:\n- - Hey\n  - Hi.\n")
    for name in ("bom.jsonl", "bom.yml"):
        assert list(chat.conversations([tmp_path / name])) == [[(chat.USER, "Hey"), (chat.BOT, "Hi.")]]


def test_conversations_with_nothing_to_train_on_are_said(tmp_path):
    """A YAML entry of one line, or one that is a list of lists, was skipped without a word (the
    latter should be refused as any list line is); JSONL lines with no messages or no reply were
    counted as documents that trained nothing. Now a list line is refused, the others said, left out
    and not counted as documents (`prepare` printed "22 document(s)" after "2 ... are left out")."""
    good = "".join(f"- - Question {i}?\n  - Answer {i}.\n" for i in range(20))
    (tmp_path / "nested.yml").write_text("conversations:\n- - - hi\n    - hello\n" + good)
    with pytest.raises(DataError, match="nested.yml: conversation 1, turn 1 is a YAML list"):
        prepare([str(tmp_path / "nested.yml")], tmp_path / "a", fmt="chat", quiet=True)
    (tmp_path / "one.yml").write_text("conversations:\n- - just a line\n- alone\n" + good)
    pair = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    lines = [{"messages": []}, {"messages": [{"role": "user", "content": "no reply"}]}] + [pair] * 20
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for name, idle in (("one.yml", 2), ("c.jsonl", 2)):
        said = []
        m = prepare([str(tmp_path / name)], tmp_path / name.replace(".", "_"), fmt="chat", quiet=True,
                    val_fraction=0.0, warn=said.append)
        assert m["documents"] == 20 and m["conversations"] == 22  # trained on, and read
        assert f"note: {idle} of 22 conversation(s) give nothing to train on (no bot reply: one line, no messages, " \
               "or only user and system turns); they are left out" in said, said
    from tests.conftest import run_mtgpt

    out = run_mtgpt("prepare", tmp_path / "c.jsonl", "--format", "chat", "--out", tmp_path / "cli",
                    "--val-fraction", "0", "--quiet").stdout
    assert f"{tmp_path / 'cli'}: 20 conversation(s), " in out


def test_yaml_replies_are_the_text_written(tmp_path):
    """YAML 1.1 reads Yes, off, 12:30, 007 and null as True, False, 750, 7 and None; a reply is the
    text as written. A turn YAML reads as a mapping ("Note: ..." unquoted) is refused, not trained."""
    (tmp_path / "yn.yml").write_text("conversations:\n- - Do you like music?\n  - Yes\n- - When do we meet?\n"
                                     "  - 12:30\n- - Lights?\n  - off\n- - Agent?\n  - 007\n- - And?\n  - null\n")
    m = prepare([str(tmp_path / "yn.yml")], tmp_path / "d", block_size=16, val_fraction=0.0, fmt="chat", quiet=True)
    replies = [GPT2.decode(np.frombuffer(s, "<u2").tolist()).split("\n")[1] for s in all_train_samples(tmp_path / "d")]
    assert m["conversations"] == 5 and replies == ["Bot: Yes", "Bot: 12:30", "Bot: off", "Bot: 007", "Bot: null"]
    (tmp_path / "map.yml").write_text("conversations:\n- - Hi\n  - Hello\n- - What is it?\n  - Note: a mapping\n")
    with pytest.raises(DataError, match=r"map.yml: conversation 2, turn 2 is a YAML mapping .*, not text; quote it"):
        prepare([str(tmp_path / "map.yml")], tmp_path / "e", fmt="chat", quiet=True)
    assert not (tmp_path / "e").exists()


def test_chat_files_with_invalid_utf8(tmp_path):
    """As text: invalid bytes are replaced with U+FFFD, counted and warned about; --strict refuses
    the file, naming the line, with the fix. Never a UnicodeDecodeError."""
    good = json.dumps({"messages": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hi."}]})
    (tmp_path / "bad.jsonl").write_bytes(good.encode() + b'\n{"messages": [{"role": "user", "content": "Caf\xe9?"}, '
                                         b'{"role": "assistant", "content": "Oui."}]}\n')
    (tmp_path / "bad.yml").write_bytes(b"conversations:\n- - Caf\xe9?\n  - Oui.\n")
    for name in ("bad.jsonl", "bad.yml"):
        warnings = []
        m = prepare([str(tmp_path / name)], tmp_path / name.replace(".", "_"), block_size=16, val_fraction=0.0,
                    fmt="chat", quiet=True, warn=warnings.append)
        texts = [GPT2.decode(np.frombuffer(s, "<u2").tolist()) for s in all_train_samples(tmp_path / name.replace(".", "_"))]
        assert "User: Caf\ufffd?\nBot: Oui.\n" in [t.split("<|endoftext|>")[0] for t in texts]
        assert m["replaced_bytes"] == 1 and warnings == [f"warning: {tmp_path / name}: 1 invalid UTF-8 byte(s) replaced "
                                                         "with U+FFFD (use --strict to refuse such files)"]
        with pytest.raises(DataError, match=rf"{name}:2: invalid UTF-8 at byte \d+; convert the file \(e.g. iconv"):
            prepare([str(tmp_path / name)], tmp_path / "strict", fmt="chat", strict=True, quiet=True)
        assert not (tmp_path / "strict").exists()


def test_chat_input_files(tmp_path):
    """A folder gives its .yml, .yaml and .jsonl files (it gave only .yml); the reader follows the
    suffix in any case: .json and .jsonl are JSON (one conversation per line, or one array of
    them), the rest YAML. A role mtgpt does not know is named, with the roles it does."""
    def conv(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    talk = tmp_path / "talk"
    (talk / "sub").mkdir(parents=True)
    (talk / "a.yml").write_text("conversations:\n- - yml q\n  - yml a\n")
    (talk / "b.yaml").write_text("conversations:\n- - yaml q\n  - yaml a\n")
    (talk / "sub" / "c.jsonl").write_text(json.dumps(conv("jsonl q", "jsonl a")) + "\n")
    (talk / "notes.txt").write_text("not dialogue")
    (talk / "sub" / "d.YML").write_text("conversations:\n- - YML q\n  - YML a\n")  # (skipped without a word)
    (tmp_path / "UP.JSONL").write_text(json.dumps(conv("UP q", "UP a")) + "\n")
    (tmp_path / "conv.json").write_text(json.dumps([conv("json q", "json a"), conv("json q2", "json a2")], indent=1))
    m = prepare([str(talk), str(tmp_path / "UP.JSONL"), str(tmp_path / "conv.json")], tmp_path / "d", block_size=16,
                val_fraction=0.0, fmt="chat", quiet=True)
    assert [s["name"] for s in m["sources"]] == [str(talk / "a.yml"), str(talk / "b.yaml"), str(talk / "sub" / "c.jsonl"),
                                                 str(talk / "sub" / "d.YML"), str(tmp_path / "UP.JSONL"),
                                                 str(tmp_path / "conv.json")]
    texts = [GPT2.decode(np.frombuffer(s, "<u2").tolist()).split("<|endoftext|>")[0] for s in all_train_samples(tmp_path / "d")]
    assert texts == [f"User: {k} q\nBot: {k} a\n" for k in ("yml", "yaml", "jsonl", "YML", "UP", "json")] + [
        "User: json q2\nBot: json a2\n"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not dialogue")
    with pytest.raises(DataError, match=r"empty: no files matching '\*\*/\*.yml' or '\*\*/\*.yaml' or '\*\*/\*.jsonl' in "
                                        r"this folder; use --glob"):
        prepare([str(tmp_path / "empty")], tmp_path / "e", fmt="chat", quiet=True)
    (tmp_path / "roles.jsonl").write_text(json.dumps(conv("q", "a")) + "\n" + json.dumps(
        {"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]}) + "\n")
    with pytest.raises(DataError, match=r"roles.jsonl:2: unknown role 'human' \(message 1\); roles are user, assistant, "
                                        r"bot, system, developer$"):  # every role it takes
        prepare([str(tmp_path / "roles.jsonl")], tmp_path / "e", fmt="chat", quiet=True)
    assert not (tmp_path / "e").exists()


def test_the_empty_val_split_advice_works_for_chat(tmp_path):
    """Chat val takes whole conversations: the --val-fraction suggested for an empty val split is
    one that gives val a conversation (it was computed from samples: 10 conversations of 3
    samples each were told 0.0333, which gave val nothing again)."""
    conv = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": " ".join(f"w{i}" for i in range(40))}]}
    (tmp_path / "ten.jsonl").write_text((json.dumps(conv) + "\n") * 10)
    with pytest.raises(DataError, match="the val split is empty") as e:
        prepare([str(tmp_path / "ten.jsonl")], tmp_path / "d", block_size=32, fmt="chat", quiet=True)
    suggested = float(str(e.value).split("raise --val-fraction to at least ")[1].split(",")[0])
    m = prepare([str(tmp_path / "ten.jsonl")], tmp_path / "d", block_size=32, val_fraction=suggested, fmt="chat",
                quiet=True)
    assert m["splits"]["val"]["samples"] > 0 and m["splits"]["train"]["samples"] > 0


def test_chatterbot_corpus(tmp_path):
    m = prepare(["chatterbot"], tmp_path / "d", block_size=64, val_fraction=0.05, fmt="chat", quiet=True)
    assert m["conversations"] > 1000 and load_manifest(tmp_path / "d")["splits"]["train"]["samples"] > 0


def test_bad_dialogue_data(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "oops"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected"):
        prepare([str(tmp_path / "bad.jsonl")], tmp_path / "d", fmt="chat", quiet=True)
    (tmp_path / "null.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'
                                         '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null}]}\n')
    with pytest.raises(DataError, match=r'null.jsonl:2: message 2 has "content": null; .* \(\"\" for an empty message\)'):
        prepare([str(tmp_path / "null.jsonl")], tmp_path / "n", fmt="chat", quiet=True)
    (tmp_path / "plain.yml").write_text("just: a mapping\n")
    with pytest.raises(DataError, match="conversations"):
        prepare([str(tmp_path / "plain.yml")], tmp_path / "e", fmt="chat", quiet=True)
    assert not any((tmp_path / name).exists() for name in "den")


def test_history_drops_oldest_turns_first():
    history = [(f"question {i} " + "word " * 10, f"answer {i} " + "word " * 10) for i in range(6)]
    kept, fit = chat.fit_history(GPT2, history, "latest question", block_size=96, reply_tokens=16)
    ids, reply = fit.ids, fit.reply
    assert kept == history[-len(kept):] and 0 < len(kept) < 6
    assert reply == 16 and len(ids) + 16 <= 96
    assert GPT2.decode(ids).endswith("User: latest question\nBot:")


def test_fitting_keeps_the_most_recent_turns_that_fit_in_a_few_tokenizations():
    """fit_turns keeps what dropping the oldest turn one at a time keeps, but tokenized the whole
    conversation once per dropped turn: a request of 6,000 short turns held `mtgpt serve` for 30 s
    (every client waiting). Now a few tokenizations of at most a context of turns."""
    import random

    def one_at_a_time(turns, block_size, reply):
        head, middle, last = turns[:1], list(turns[1:-1]), turns[-1]
        while len(chat.prompt_ids(GPT2, head + middle + [last])) + reply > block_size and middle:
            del middle[:1]
        return middle

    rng = random.Random(0)
    for _ in range(40):
        turns = [(chat.SYSTEM, "Be brief.")] + [(rng.choice([chat.USER, chat.BOT]), " ".join(
            rng.choice(["a", "word", "longer words here", "x" * rng.randint(1, 30)]) for _ in range(rng.randint(0, 6))))
            for _ in range(rng.randint(1, 30))] + [(chat.USER, "and now?")]
        block = rng.choice([32, 64, 128, 256])
        fit = chat.fit_turns(GPT2, turns, block, 8)
        kept, ids, reply = fit.kept, fit.ids, fit.reply
        assert kept == one_at_a_time(turns, block, reply) and len(ids) + reply <= block

    encoded = []
    tok = copy.copy(GPT2)
    tok.encode = lambda text: (encoded.append(len(text)), GPT2.encode(text))[1]
    turns = [(chat.USER if i % 2 == 0 else chat.BOT, "a") for i in range(6000)] + [(chat.USER, "hi")]
    kept = chat.fit_turns(tok, turns, 64, 2).kept
    assert kept == turns[-1 - len(kept):-1] and 10 < len(kept) < 64
    assert sum(encoded) < 20 * 64 * len("User: a\n")  # (one at a time: 6,000 x 6,000 / 2 turns)


@pytest.mark.parametrize("reply_tokens", [128, 120, 500])
def test_the_current_turn_is_kept_whole(reply_tokens):
    """A reply budget as large as the context used to crop the prompt to ":" (so the model never
    saw the question); the budget is capped instead."""
    history = [("hello", "hi there")] * 3
    kept, fit = chat.fit_history(GPT2, history, "What is your name?", block_size=128, reply_tokens=reply_tokens,
                                 system="Be brief.")
    ids, reply = fit.ids, fit.reply
    assert GPT2.decode(ids) == "System: Be brief.\nUser: What is your name?\nBot:"
    assert kept == [] and len(ids) + reply == 128


def test_a_message_longer_than_the_context_keeps_its_end():
    message = " ".join(f"word{i}" for i in range(200))
    kept, fit = chat.fit_history(GPT2, [], message, block_size=64, reply_tokens=32, system="Be brief.")
    ids, reply = fit.ids, fit.reply
    text = GPT2.decode(ids)
    assert text.startswith("System: Be brief.\nUser:") and text.endswith("word199\nBot:")
    assert reply == 16 and len(ids) + reply <= 64 and "word0 " not in text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "block_size": 64}))
    folder = tmp_path_factory.mktemp("chatmodel")
    checkpoint.save_weights(dict(model.named_parameters()), model.config, folder)
    return folder


class Terminal:
    """mtgpt chat on a pseudo-terminal: type lines, read what it prints."""

    def __init__(self, *args):
        self.leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-m", "mtgpt", "chat", *map(str, args)], stdin=follower,
                                     stdout=follower, stderr=follower, close_fds=True)
        os.close(follower)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 60) -> str:
        """What it printed before `text`; fails (never hangs) if `text` does not come in `timeout` s."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.leader], [], [], left)[0]:
                raise AssertionError(f"never saw {text!r} in {timeout} s; got {self.seen[-2000:]!r}")
            try:
                chunk = os.read(self.leader, 4096)
            except OSError:  # (EIO: the program closed the terminal)
                chunk = b""
            if not chunk:
                raise AssertionError(f"the terminal closed before {text!r}; got {self.seen[-2000:]!r}")
            self.seen += chunk.decode(errors="replace")
        out, self.seen = self.seen.split(text, 1)
        return out

    def type(self, line: str) -> None:
        os.write(self.leader, line.encode())

    def close(self) -> int:
        code = self.proc.wait(timeout=30)
        os.close(self.leader)
        return code


def test_chat_in_a_terminal(model_dir):
    term = Terminal(model_dir, "--seed", "1", "--max-new-tokens", "8")
    assert "/reset" in term.read_until("you> ")
    term.type("Hello, who are you?\n")
    term.read_until("bot> ")
    reply = term.read_until("you> ")
    assert reply.strip()  # an untrained model says something, up to 8 tokens on one line
    term.type("/reset\n")
    assert "(conversation forgotten)" in term.read_until("you> ")
    term.type("/quit\n")
    assert term.close() == 0


def test_chat_ends_on_ctrl_d(model_dir):
    term = Terminal(model_dir)
    term.read_until("you> ")
    term.type("\x04")  # Ctrl-D at an empty prompt: end of input
    assert term.close() == 0


def test_chat_ends_on_ctrl_c_as_every_command_does(model_dir):
    """Ctrl-C at the prompt ended chat silently with exit 0; it is `interrupted`, exit 130."""
    term = Terminal(model_dir)
    term.read_until("you> ")
    # Python's input() writes the prompt, then reads: a SIGINT that lands between the two is noted
    # but the read waits on, and only the next one ends it (CPython's, with or without readline;
    # measured: 35-45% of first SIGINTs to `python -c "input()"` on a 2-core machine with both
    # cores busy, as under pytest -n 2). A person presses Ctrl-C again; so does this test, after 5 s.
    for _ in range(6):
        term.proc.send_signal(signal.SIGINT)
        try:
            term.read_until("interrupted", timeout=5)
            break
        except AssertionError:
            assert term.proc.poll() is None, f"chat exited {term.proc.returncode} without saying interrupted"
    else:
        raise AssertionError(f"six SIGINTs did not end chat; it printed {term.seen[-2000:]!r}")
    assert term.close() == 130


def test_chat_without_a_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mtgpt", "chat", str(tmp_path)], capture_output=True, text=True,
                          input="", timeout=60)
    assert proc.returncode != 0 and "has no model" in proc.stderr


PAIRS = [("Hello", "Hi, how are you?"), ("What is your name?", "I am a bot."), ("How old are you?", "42 years.")]


def test_a_fine_tune_with_an_own_tokenizer_answers_each_message(tmp_path, world_of_one):
    """The report's case, in process: a 400-token vocabulary (where " Hi" and " 42" start with a
    bare " " token) and a tiny model fine-tuned on three exchanges answer each at temperature 0
    with its own reply. (With the space after "Bot:" untrained, every answer was "I am a bot.":
    " I" was the only first token the model had learned.)"""
    from mtgpt.sample import SampleConfig, load_for_inference
    from mtgpt.train import fit, make_plan
    from tests.conftest import SONNETS

    tok = tokenizer.train([SONNETS.read_text()], 400)
    assert [tok.encode(" " + reply)[0] for _, reply in PAIRS[::2]] == tok.encode(" ") * 2  # the case in question
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for _ in range(40) for q, a in PAIRS]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    prepare([str(tmp_path / "chat.jsonl")], tmp_path / "data", block_size=32, val_fraction=0.0, fmt="chat",
            tok=tok, quiet=True)
    from mtgpt.config import TrainConfig

    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model={**TINY, "vocab_size": 400}, micro_batch=8,
                      lr=1e-2, max_steps=60, log_every=20, ds_config="zero0_fp32")
    fit(make_plan(cfg, world_size=1))
    model, tok = load_for_inference(str(tmp_path / "run"), False, "cpu", "fp32")
    for message, reply in PAIRS:
        fit = chat.fit_history(tok, [], message, model.config.block_size, 16)[1]
        ids, budget = fit.ids, fit.reply
        got = "".join(chat.reply_stream(model, tok, ids, SampleConfig(max_new_tokens=budget, temperature=0)))
        assert got == reply, (message, got)


def test_a_message_or_system_line_that_does_not_fit_is_cropped_with_a_warning(model_dir):
    """As `mtgpt sample` warns for a long prompt: a message longer than the context keeps its end,
    a --system line with no room beside it is left out, each said once on stderr; a message that
    fits is sent whole without a word."""
    from mtgpt.sample import SampleConfig

    def talk(messages, system=None):
        lines, out, warnings = iter(messages), [], []

        def read(prompt):
            line = next(lines, None)
            if line is None:  # the end of input, as Ctrl-D
                raise EOFError
            return line

        chat.run_chat(str(model_dir), SampleConfig(max_new_tokens=4, seed=1), device="cpu", system=system,
                      read=read, write=out.append, warn=warnings.append)
        return warnings

    long = " ".join(f"word{i}" for i in range(200))
    assert talk(["Hello there"], system="Be brief.") == []
    assert talk(["hi \udcff there"]) == []  # a byte not UTF-8 read from stdin (it warned: the text compared differed)
    assert talk([long]) == ["warning: your message is longer than the context of 64 tokens allows (a quarter of it "
                            "is kept for the reply); the model sees only its end"]
    assert talk(["Hello there"], system=long) == ["warning: the --system line does not fit in the context of 64 "
                                                  "tokens beside your message; it was left out of this turn"]
    proc = subprocess.run([sys.executable, "-m", "mtgpt", "chat", str(model_dir), "--max-new-tokens", "2"],
                          capture_output=True, text=True, input=long + "\n", timeout=120)
    assert proc.returncode == 0 and "warning: your message is longer than the context of 64" in proc.stderr


def test_one_seed_gives_one_conversation_not_one_reply_again(model_dir):
    """With --seed every reply drew the same noise, so replies to "hi" began alike (after /reset,
    to the same context, were the same); now reply N draws from seed + N: the same conversation
    again, but not the same reply."""
    from mtgpt.sample import SampleConfig

    def talk(seed):
        lines, out = iter(["hi", "/reset", "hi", "/reset", "hi"]), []

        def read(prompt):
            if (line := next(lines, None)) is None:
                raise EOFError
            return line

        chat.run_chat(str(model_dir), SampleConfig(max_new_tokens=6, seed=seed), device="cpu", read=read,
                      write=out.append, warn=lambda s: None)
        return [r.split("\n")[0] for r in "".join(out).split("bot> ")[1:]]

    replies = talk(1)
    assert len(replies) == 3 and len(set(replies)) == 3, replies
    assert talk(1) == replies and talk(2) != replies


def test_chatting_with_a_model_that_never_saw_dialogue_says_so(tmp_path, tiny_data):
    """`mtgpt chat runs/demo` (trained on Shakespeare) answered in verse without a word: a note
    says it continues text rather than answering. A run that saw dialogue (alone or in a mixture),
    or one whose data cannot be found, gets none."""
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello!"}]}) + "\n")
    prepare([str(tmp_path / "c.jsonl")], tmp_path / "chatdata", fmt="chat", block_size=8, val_fraction=0.0, quiet=True)
    runs = {"text": [f"sonnets={tiny_data}"], "chat": [f"c={tmp_path / 'chatdata'}"],
            "mix": [f"sonnets={tiny_data}:1", f"c={tmp_path / 'chatdata'}:1"], "gone": [str(tmp_path / "nowhere")]}
    for name, data in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_config.json").write_text(json.dumps({"data": data}))
    assert "trained on plain text, not dialogue" in chat.dialogue_note(tmp_path / "text")
    assert [chat.dialogue_note(tmp_path / n) for n in ("chat", "mix", "gone", "chatdata")] == [None] * 4
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    checkpoint.save_weights(dict(model.named_parameters()), model.config, tmp_path / "text")
    from mtgpt.sample import SampleConfig

    warnings: list[str] = []
    chat.run_chat(str(tmp_path / "text"), SampleConfig(max_new_tokens=2, seed=1), device="cpu", read=lambda _: "/quit",
                  write=lambda _: None, warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith(f"note: {tmp_path / 'text'} was trained on plain text")


def test_chat_reads_utf8_from_a_pipe_when_python_says_ascii(model_dir):
    """PYTHONIOENCODING=ascii: the output was UTF-8 (click's), but a non-ASCII line read from stdin
    ended the chat with "'ascii' codec can't decode byte 0xc3"."""
    proc = run_mtgpt("chat", model_dir, "--max-new-tokens", "4", "--seed", "1", input="Grüße\n/quit\n",
                     env={"PYTHONIOENCODING": "ascii"}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "you> Grüße\n" in proc.stdout and "bot> " in proc.stdout
