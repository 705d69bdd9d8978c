"""`mtgpt serve`: a real server (a subprocess on a free loopback port) against a tiny trained
model, spoken to by the official `openai` client and by raw HTTP; the page in a real Chromium."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai  # the official client (a dev dependency, setup.py's "dev" extra)
import pytest
import torch

from mtgpt import chat, checkpoint, tokenizer
from mtgpt.config import ModelConfig
from mtgpt.model import GPT
from mtgpt.sample import SampleConfig, SampleText, generate, load_for_inference, stream
from tests.conftest import SONNETS, run_mtgpt

GPT2 = tokenizer.gpt2()


DIALOGUE = "".join(f"User: {q}\nBot: {a}\n" for q, a in [
    ("Hello", "Hi, how are you?"), ("What is your name?", "I am a small model."),
    ("Do you like sonnets?", "Yes, I know twenty of them."), ("Good night", "Sleep well.")] * 30)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny model that has learned the sonnets and a little dialogue (plain PyTorch, in
    process), saved the way `mtgpt train` saves it."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    model.fused_loss = True  # as `mtgpt train` trains on a CPU: the same loss, ~40% less time a step
    ids = GPT2.encode(SONNETS.read_text() + DIALOGUE)
    ids = torch.tensor(ids[:len(ids) // 65 * 65]).view(-1, 65)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    order = torch.randperm(len(ids) * 4, generator=torch.Generator().manual_seed(0)) % len(ids)
    for step in range(200):  # ~45 s on a 2-core AVX2 CPU: enough to answer in the template
        batch = ids[order[step * 8 % len(order):][:8]]
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("run") / "tiny"
    checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`mtgpt serve` in a subprocess, up once /health answers."""

    def __init__(self, run_dir: Path, *args: str):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "mtgpt", "serve", str(run_dir), "--port", str(self.port),
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mtgpt serve exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("mtgpt serve did not answer /health within 60 s")

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict | None = None) -> tuple[int, dict, dict]:
        """(status, JSON body, headers) of one raw HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        if isinstance(body, dict):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        try:
            parsed = json.loads(data)
        except json.JSONDecodeError:
            parsed = {"raw": data.decode("utf-8", "replace")}
        return r.status, parsed, {k.lower(): v for k, v in r.getheaders()}

    def client(self, key: str = "none", **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(run_dir):
    s = Served(run_dir, "--max-tokens-limit", "1000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(run_dir):
    return load_for_inference(str(run_dir), False, "cpu")[0]


def sample_cli(run_dir: Path, prompt: str, *args: str) -> str:
    """What `mtgpt sample` writes after the prompt (it ends the text with a newline)."""
    out = run_mtgpt("sample", run_dir, "--prompt", prompt, *args).stdout
    assert out.startswith(prompt) and out.endswith("\n")
    return out[len(prompt):-1]


# ---- the text

def test_sample_text_holds_back_a_stop_split_across_tokens():
    ids = GPT2.encode("one two three four")
    text = SampleText(GPT2, ["three"])
    shown = "".join(text.add(t) for t in ids[:3])  # "one", " two", " three"
    assert shown == "one two " and text.finish == "stop" and text.out == "one two "
    text = SampleText(GPT2, ["e f"])
    shown = [text.add(t) for t in GPT2.encode("one two")] + [text.length()]
    assert "".join(shown) == "one two" and text.finish == "length"


def test_sample_text_never_splits_a_character():
    ids = GPT2.encode("naïve 🎉 中文字符")
    text = SampleText(GPT2)
    pieces = [text.add(t) for t in ids] + [text.length()]
    assert "".join(pieces) == "naïve 🎉 中文字符" and "\ufffd" not in "".join(pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens were bytes of a character: held back


def test_worker_steps_jobs_in_turn_and_drops_a_cancelled_one(run_dir):
    """In process: jobs advance one token each per round; a cancelled job is dropped unstepped."""
    from mtgpt.serve import Job, Worker

    model = load_for_inference(str(run_dir), False, "cpu")[0]
    order: list[str] = []

    class Recording(Worker):
        def _step(self, job):
            order.append(names[id(job)])
            return super()._step(job)

    async def main():
        loop = asyncio.get_running_loop()
        jobs = {name: Job(GPT2.encode(name), SampleConfig(max_new_tokens=n, temperature=0), [SampleText(GPT2)],
                          loop) for name, n in (("a", 30), ("b", 20), ("c", 30))}
        names.update({id(job): name for name, job in jobs.items()})
        jobs["c"].cancelled = True  # its client left before the worker reached it
        worker = Recording(model)
        worker.start_thread()
        for job in jobs.values():
            worker.submit(job)
        while worker.counts()["active"] or worker.counts()["queued"]:
            await asyncio.sleep(0.01)
        worker.stop()
        return jobs

    names: dict[int, str] = {}
    jobs = asyncio.run(main())
    assert [jobs[x].choices[0].tokens for x in "abc"] == [30, 20, 0] and "c" not in order
    assert jobs["a"].choices[0].finish == jobs["b"].choices[0].finish == "length"
    both = order[order.index("b"):][:39]  # a may have had steps before b arrived; then, in turn
    assert both.count("b") == 20 and all(x != y for x, y in zip(both, both[1:]))


def test_models_health_and_page(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    status, health, _ = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["context"] == 64
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    conn.request("GET", "/")
    r = conn.getresponse()
    page = r.read().decode()
    assert r.status == 200 and r.getheader("content-type").startswith("text/html")
    assert "/v1/chat/completions" in page and "<script" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere: works offline
    for path in ("/", "/health"):  # HEAD, as link checkers and monitors ask (it was 405)
        conn.request("HEAD", path)
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"", (path, r.status)
    for path in ("/../setup.py", "/assets/chat.html", "/%2e%2e/mtgpt/serve.py", "/mtgpt/serve.py", "/..%2fsetup.py"):
        assert server.request("GET", path)[0] == 404, path


def test_retrieve_a_model(server):
    """GET /v1/models/{id}: the model object, as the official client's models.retrieve reads it; an
    unknown id is a 404 in OpenAI's error shape."""
    got = server.client().models.retrieve("tiny")
    assert (got.id, got.object, got.owned_by) == ("tiny", "model", "mtgpt")
    with pytest.raises(openai.NotFoundError) as e:
        server.client().models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found" and "'gpt-4' does not exist" in e.value.body["message"]
    status, err, _ = server.request("GET", "/v1/models/gpt-4")
    assert status == 404 and set(err["error"]) == {"message", "type", "param", "code"}


def test_greedy_and_seeded_completions_equal_mtgpt_sample(server, run_dir):
    client = server.client()
    prompt = "Shall I compare thee"
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
    assert got.choices[0].text == sample_cli(run_dir, prompt, "--max-new-tokens", "40", "--temperature", "0")
    assert got.choices[0].finish_reason in ("length", "stop")
    assert got.usage.prompt_tokens == len(GPT2.encode(prompt)) and got.usage.completion_tokens <= 40
    seeded = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0.9, seed=7,
                                       extra_body={"top_k": 50})
    assert seeded.choices[0].text == sample_cli(run_dir, prompt, "--max-new-tokens", "40", "--temperature", "0.9",
                                                "--top-k", "50", "--seed", "7")
    assert seeded.choices[0].text != got.choices[0].text
    two = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=1.0, seed=3, n=2)
    out = run_mtgpt("sample", run_dir, "--prompt", prompt, "--max-new-tokens", "20", "--temperature", "1.0",
                    "--seed", "3", "--num-samples", "2").stdout
    assert [c.index for c in two.choices] == [0, 1]
    assert out == "".join(f"--- sample {i + 1}\n{prompt}{c.text}\n" for i, c in enumerate(two.choices))


def test_null_options_mean_their_defaults_as_in_openais_api(server):
    """The official client sends `null` for an option given as None (so do wrappers passing options
    through); OpenAI reads it as the default, and so must mtgpt (it answered 400 before)."""
    client = server.client()
    nulls = dict(temperature=None, top_p=None, n=None, stream=None, presence_penalty=None, frequency_penalty=None)
    base = client.completions.create(model="tiny", prompt="From fairest", max_tokens=12, seed=5)
    got = client.completions.create(model="tiny", prompt="From fairest", max_tokens=12, seed=5, echo=None, **nulls,
                                    extra_body={"top_k": None})
    assert got.choices[0].text == base.choices[0].text and len(got.choices) == 1
    messages = [{"role": "user", "content": "hello"}]
    base = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=5)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=5, **nulls)
    assert got.choices[0].message.content == base.choices[0].message.content
    status, err, _ = server.request("POST", "/v1/completions", {"model": None, "prompt": "x"})
    assert status == 400 and err["error"]["param"] == "model"  # a required field stays required


def test_stop_strings(server):
    client = server.client()
    full = client.completions.create(model="tiny", prompt="From fairest", max_tokens=40, temperature=0).choices[0]
    assert len(full.text) > 10
    stop = full.text[5:8]
    cut = client.completions.create(model="tiny", prompt="From fairest", max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[:full.text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="From fairest", max_tokens=40, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_streamed_chunks_concatenate_to_the_whole_text(server):
    client = server.client()
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 11}):
        whole = client.completions.create(model="tiny", prompt="When I do count", max_tokens=50, **kw)
        chunks = list(client.completions.create(model="tiny", prompt="When I do count", max_tokens=50, stream=True,
                                                stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text and len([c for c in chunks if c.choices and c.choices[0].text]) > 5
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert reasons == [whole.choices[0].finish_reason]


def is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_a_character_is_never_split_across_chunks(server, model):
    """Hot sampling over the whole vocabulary writes characters of several tokens (CJK, emoji);
    each streamed chunk must be whole characters: the chunks concatenate to the text, and the
    text is the decoding of all its tokens together (a split would leave U+FFFD where it is not)."""
    client = server.client()
    for seed in range(40):
        kw = {"model": "tiny", "prompt": "中文", "max_tokens": 60, "temperature": 2.0, "seed": seed,
              "extra_body": {"top_k": 0}}
        whole = client.completions.create(**kw).choices[0].text
        cfg = SampleConfig(max_new_tokens=60, temperature=2.0, top_k=None, seed=seed, top_p=1.0)
        tokens = [int(n[0]) for n, _ in stream(model, GPT2.encode("中文"), cfg)]
        tokens = tokens[:tokens.index(GPT2.eot)] if GPT2.eot in tokens else tokens
        multi = [t for t in tokens if not is_utf8(GPT2.token_bytes(t))]
        if not multi:
            continue  # no token of this sample is a fragment of a character: try the next seed
        assert whole == GPT2.decode(tokens)
        chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kw)]
        assert "".join(chunks) == whole
        for chunk in chunks:
            assert chunk.encode("utf-8").decode("utf-8") == chunk
            assert "\ufffd" not in chunk or "\ufffd" in GPT2.decode(tokens)
        return
    pytest.fail("no seed of 40 sampled a token that is part of a character")


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_chat_completion_is_mtgpt_chats_reply(server, model, system):
    """The same reply as `mtgpt chat` gives. (The tiny model, which never saw a System: line, may
    answer one with a bare newline, an empty reply: only the other conversation must be answered.)"""
    client = server.client()
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how are you?"},
                 {"role": "user", "content": "What is your name?"}]
    got = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30)
    fit = chat.fit_history(GPT2, [("Hello", "Hi, how are you?")], "What is your name?", 64, 30, system=system)[1]
    ids, reply = fit.ids, fit.reply
    expected = "".join(chat.reply_stream(model, GPT2, ids, SampleConfig(max_new_tokens=reply, temperature=0)))
    assert got.choices[0].message.content == expected and (expected.strip() or system)
    assert got.choices[0].message.role == "assistant" and "\n" not in expected
    assert got.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_a_long_conversation_is_cropped_with_a_warning(server):
    messages = [{"role": "user", "content": f"question {i} " * 10} for i in range(30)]
    status, body, headers = server.request("POST", "/v1/chat/completions",
                                           {"model": "tiny", "messages": messages, "max_tokens": 8})
    assert status == 200 and "x-mtgpt-warning" in headers
    assert headers["x-mtgpt-warning"] == "the conversation is longer than the context of 64 tokens; left out: the " \
        "28 oldest messages", headers  # (each of 22 tokens: two and the last fit beside the 8 of the reply)
    whole = GPT2.encode(chat.render([(chat.USER, m["content"]) for m in messages]) + "Bot:")
    assert body["usage"]["prompt_tokens"] == len(whole) > 64  # the prompt as sent, not what was kept
    # a system message with no room beside a long last message is left out: said so (it was not)
    messages = [{"role": "system", "content": "Be brief. " * 20}, {"role": "user", "content": "weather " * 60}]
    status, body, headers = server.request("POST", "/v1/chat/completions",
                                           {"model": "tiny", "messages": messages, "max_tokens": 8})
    assert status == 200 and headers["x-mtgpt-warning"] == "the conversation is longer than the context of 64 " \
        "tokens; left out: the system message(s), the start of the last message", headers
    status, body, headers = server.request("POST", "/v1/completions", {"model": "tiny", "prompt": "word " * 200,
                                                                       "max_tokens": 8})
    assert status == 200 and "last 64" in headers["x-mtgpt-warning"]
    assert body["usage"]["prompt_tokens"] == len(GPT2.encode("word " * 200))


@pytest.mark.parametrize("path, body, status, says", [
    ("/v1/completions", "{not json", 400, "not valid JSON"),
    ("/v1/completions", "[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1001}, 400, "limit of 1000"),
    # wrong types that pydantic's lax mode took as the value they look like (OpenAI refuses them)
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "3"}, 400, "max_tokens: Input should be a "
                                                                                 "valid integer"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": True}, 400, "max_tokens: Input should be a "
                                                                                  "valid integer"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": "2"}, 400, "n: Input should be a valid integer"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "0.5"}, 400, "temperature: Input should be"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": "1"}, 400, "seed: Input should be a valid integer"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400,
     "stream: Input should be a valid boolean"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": 1}, 400,
     "stream: Input should be a valid boolean"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": 60000}, 400, "top_k"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": 2**64}, 400, "seed: must be between 0 and 4294967295"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": -2**63 - 1}, 400, "seed: must be between 0 and"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 2**32}, 400,
     "seed: must be between 0 and 4294967295"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temprature": 0.5}, 400, "temprature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "store": True}, 400,
     "store: OpenAI's, not supported by mtgpt serve"),  # (it said "unknown parameter(s): store")
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format other than"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999999]}, 400, "vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, 400, "prompt: must be a string, a list of strings, a list of "
                                                              "token ids or a list of lists of token ids"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop: Input should be a valid string"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": math.nan}, 400,
     "temperature: Input should be a finite number"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": True, "stream_options": {"include_usag": True}},
     400, "stream_options.include_usag: Extra inputs are not permitted"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options is only allowed when stream is true"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                              "tool_choice": "required"}, 400, "tool_choice needs tools"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                              "max_completion_tokens": 1000}, 400, "max_tokens (3) and max_completion_tokens (1000) "
                                                                   "disagree"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a"] * 10, "n": 7}, 400, "more than 64"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "user"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "text"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": None}]}, 400,
     "messages.0.content: a user message needs its text"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "system", "content": None},
                                                            {"role": "user", "content": "hi"}]}, 400,
     "messages.0.content: a system message needs its text"),
])
def test_bad_input_gets_an_openai_error_and_the_server_lives(server, path, body, status, says):
    got, err, _ = server.request("POST", path, body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and says in err["error"]["message"], err
    assert server.request("GET", "/health")[0] == 200


def test_oversized_bodies_and_wrong_methods(server):
    got, err, _ = server.request("POST", "/v1/completions", "x" * (2 << 20))
    assert got == 413 and "over" in err["error"]["message"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)  # no Content-Length: chunked
    conn.request("POST", "/v1/completions", body=iter([b"{" + b" " * (1 << 19)] * 4),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "over" in json.loads(r.read())["error"]["message"]
    conn.close()
    assert server.request("GET", "/v1/completions")[0] == 405
    assert server.request("POST", "/v1/nothing", {})[0] == 404
    assert server.request("GET", "/health")[0] == 200


def test_sixteen_concurrent_streaming_clients_all_get_their_own_correct_text(server, model):
    prompts = [f"Sonnet {i}: thy beauty" for i in range(16)]
    expected = [generate(model, GPT2, p, SampleConfig(max_new_tokens=40, temperature=0))[0] for p in prompts]

    async def one(client, prompt):
        began, first, text = time.perf_counter(), None, ""
        async for chunk in await client.completions.create(model="tiny", prompt=prompt, max_tokens=40,
                                                           temperature=0, stream=True):
            if first is None:
                first = time.perf_counter() - began
            text += chunk.choices[0].text
        return text, first, time.perf_counter() - began

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(all_of_them())
    assert [r[0] for r in results] == expected
    # served together, not one after another: every client had its first token before the
    # slowest client was done
    assert max(r[1] for r in results) < max(r[2] for r in results)


def open_stream(server, max_tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "Long", "stream": True,
                                                             "max_tokens": max_tokens, "temperature": 1.0}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    return conn, r


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_slow_client_does_not_stall_the_others(server):
    conn, r = open_stream(server, 1000)  # never read
    try:
        began = time.perf_counter()
        got = server.client().completions.create(model="tiny", prompt="Quick", max_tokens=20, temperature=0)
        assert got.choices[0].finish_reason and time.perf_counter() - began < 10
    finally:
        conn.close()


def test_a_client_that_disconnects_stops_its_generation(server):
    before = server.request("GET", "/health")[1]["generated_tokens"]
    conn, r = open_stream(server, 1000)
    r.fp.readline()  # the first event has come: it is generating
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_for(lambda: server.request("GET", "/health")[1]["active"] == 0, 5)
    generated = server.request("GET", "/health")[1]["generated_tokens"] - before
    assert generated < 500, f"{generated} of 1000 tokens generated for a client that had left"
    began = time.perf_counter()
    server.client().completions.create(model="tiny", prompt="Next", max_tokens=5, temperature=0)
    assert time.perf_counter() - began < 5


@pytest.mark.parametrize("n", [1, 4])
def test_a_client_that_leaves_before_a_plain_answer_stops_its_generation(server, n):
    """Not streamed: the answer comes whole at the end, and a client that gave up (a timeout,
    Ctrl-C) kept the worker generating all its tokens, slowing every other client."""
    before = server.request("GET", "/health")[1]["generated_tokens"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "Long", "n": n,
                                                             "max_tokens": 1000, "temperature": 1.0}),
                 headers={"Content-Type": "application/json"})
    assert wait_for(lambda: server.request("GET", "/health")[1]["generated_tokens"] > before + 5 * n, 10)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_for(lambda: server.request("GET", "/health")[1]["active"] == 0, 5)
    generated = server.request("GET", "/health")[1]["generated_tokens"] - before
    assert generated < 500 * n, f"{generated} of {1000 * n} tokens generated for a client that had left"
    got = server.client().completions.create(model="tiny", prompt="Next", max_tokens=5, temperature=0)
    assert got.usage.completion_tokens <= 5  # the server answers the next one


def test_api_key(run_dir):
    s = Served(run_dir, "--api-key", "s3cret", "--model-name", "sonnets")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer s3cret2"}):
            got, err, _ = s.request("GET", "/v1/models", headers=headers)
            assert got == 401 and err["error"]["code"] == "invalid_api_key"
            assert s.request("POST", "/v1/completions", {"model": "sonnets", "prompt": "x"}, headers)[0] == 401
        for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive (RFC 9110): these got 401
            assert s.request("GET", "/v1/models", headers={"Authorization": f"{scheme} s3cret"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("s3cret").completions.create(model="sonnets", prompt="x", max_tokens=3).choices
        assert s.request("GET", "/health")[1]["auth"] is True
    finally:
        assert s.stop(signal.SIGINT) == 0


def test_a_request_without_max_tokens_gets_the_default_within_the_servers_limit(run_dir):
    """OpenAI's default of 16 completion tokens, capped at --max-tokens-limit: a completion that
    sent no max_tokens was refused for "max_tokens is 16" (chat completions already capped)."""
    s = Served(run_dir, "--max-tokens-limit", "5")
    try:
        client = s.client()
        done = client.completions.create(model="tiny", prompt="x", seed=1)
        assert 1 <= done.usage.completion_tokens <= 5
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], seed=1)
        assert 1 <= reply.usage.completion_tokens <= 5
        with pytest.raises(openai.BadRequestError, match=r"max_tokens is 6, above this server's limit of 5"):
            client.completions.create(model="tiny", prompt="x", max_tokens=6)
    finally:
        assert s.stop(signal.SIGINT) == 0


def test_open_host_warns_without_a_key_and_sigterm_exits_cleanly(run_dir, server, tiny_data, tmp_path):
    """Also: serving a model trained on plain text notes that its chat will not answer (as
    `mtgpt chat` does)."""
    text_run = shutil.copytree(run_dir, tmp_path / "text")
    (text_run / "train_config.json").write_text(json.dumps({"data": [str(tiny_data)]}))
    s = Served(text_run, "--host", "0.0.0.0")
    assert s.stop(signal.SIGTERM) == 0
    said = s.proc.stderr.read()
    assert "without --api-key" in said and f"note: {text_run} was trained on plain text, not dialogue" in said
    taken = run_mtgpt("serve", run_dir, "--port", server.port, check=False, timeout=60)
    assert taken.returncode == 1 and "could not serve on 127.0.0.1:" in taken.stderr
    for host, says in (("999.1.1.1", "--host 999.1.1.1: no such address"),
                       ("192.0.2.1", "--host 192.0.2.1 is not an address of this machine")):
        proc = run_mtgpt("serve", run_dir, "--host", host, "--port", free_port(), check=False, timeout=60)
        assert proc.returncode == 1 and proc.stderr.startswith(f"Error: {says}") and proc.stderr.count("\n") == 1, \
            proc.stderr
        assert "port" not in proc.stderr.split("(")[0]
    bad = run_mtgpt("serve", run_dir.parent / "missing", check=False)
    assert bad.returncode == 1 and "no such folder" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_the_page_in_a_real_browser(server, tmp_path):
    """Chromium (Debian's, driven by Selenium through Debian's chromedriver; `make browser`
    installs both): type a message, watch the reply stream in, take a screenshot."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    for path in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert Path(path).exists(), f"{path} is missing: run `make browser` (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
        assert not driver.find_element(By.ID, "keybox").is_displayed()  # no --api-key: nothing to ask
        driver.find_element(By.ID, "temperature").clear()
        driver.find_element(By.ID, "temperature").send_keys("0")
        box = driver.find_element(By.ID, "input")
        box.send_keys("Hello")
        box.send_keys(Keys.ENTER)
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant .reply")
                                        and d.find_element(By.CSS_SELECTOR, ".assistant .reply").text.strip()
                                        and d.find_element(By.ID, "send").is_enabled())
        reply = driver.find_element(By.CSS_SELECTOR, ".assistant .reply").text
        expected = server.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=100,
            extra_body={"top_k": 200}).choices[0].message.content
        assert reply == expected.strip()
        assert driver.find_element(By.CSS_SELECTOR, ".user").text == "Hello"
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
        driver.find_element(By.ID, "reset").click()
        assert not driver.find_elements(By.CSS_SELECTOR, ".assistant")
    finally:
        driver.quit()


def test_ctrl_c_with_a_client_streaming_ends_its_stream_and_exits_cleanly(run_dir):
    """SIGINT while a client reads a long stream slowly: its stream ends (an error event that says
    the server is stopping, after the text so far), and the server exits 0 within seconds with
    nothing on stderr but its start line (no uvicorn traceback, no cancelled task)."""
    import threading

    s = Served(run_dir, "--max-tokens-limit", "5000")
    received, ended = [], threading.Event()

    def read_slowly():
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "Long", "stream": True,
                                                                 "max_tokens": 5000, "temperature": 1.0}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        try:
            while line := r.fp.readline():
                received.append(line.decode())
                time.sleep(0.002)
        except OSError as e:
            received.append(f"reading failed: {e}")
        finally:
            conn.close()
            ended.set()

    whole = []  # a request answered whole, cut off too: told that it was not completed (it was told
                # "the text so far was sent", and nothing was)

    def ask_whole():
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "Long", "max_tokens": 5000,
                                                                 "temperature": 1.0}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        whole.append((r.status, json.loads(r.read())))
        conn.close()

    reader = threading.Thread(target=read_slowly, daemon=True)
    reader.start()
    asker = threading.Thread(target=ask_whole, daemon=True)
    asker.start()
    assert wait_for(lambda: len(received) > 20, 30)
    began = time.perf_counter()
    s.proc.send_signal(signal.SIGINT)
    code = s.proc.wait(timeout=30)
    took = time.perf_counter() - began
    stderr = s.proc.stderr.read()
    assert ended.wait(10)
    assert code == 0 and took < 5, (code, took, stderr)
    assert "Traceback" not in stderr and "ERROR" not in stderr and stderr.count("\n") == 1, stderr
    events = [json.loads(line[6:]) for line in received if line.startswith("data: {")]
    assert events[-1]["error"]["message"].startswith("the server is stopping") and "reading failed" not in received[-1]
    assert events[-1]["error"]["message"].endswith("; the text so far was sent")
    asker.join(10)
    assert whole and whole[0][0] == 503 and whole[0][1]["error"]["message"] == \
        "the server is stopping (mtgpt serve got Ctrl-C or SIGTERM); the request was not completed", whole


def test_openais_defaults_for_what_mtgpt_lacks_are_accepted(server):
    """response_format {"type": "text"} is the default (it was refused as unsupported)."""
    got, body, _ = server.request("POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "response_format": {"type": "text"}, "tool_choice": "none", "presence_penalty": 0})
    assert got == 200 and body["choices"][0]["message"]["role"] == "assistant", body


@pytest.mark.parametrize("args, says", [(["--api-key", ""], "--api-key must not be empty"),
                                        (["--model-name", " "], "--model-name must not be empty"),
                                        (["--max-tokens-limit", "0"], "--max-tokens-limit must be >= 1")])
def test_empty_or_bad_serve_options_are_one_line(run_dir, args, says):
    """An empty --model-name was ignored without a word (the folder's name served), as the others were not."""
    proc = subprocess.run([sys.executable, "-m", "mtgpt", "serve", str(run_dir), *args],
                          capture_output=True, text=True, timeout=120)  # (refused before it binds a port)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"Error: {says}"), proc.stderr
