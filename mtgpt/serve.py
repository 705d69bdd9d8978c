"""`mtgpt serve`: a run's model behind an OpenAI-compatible HTTP API and a chat page.

    mtgpt serve runs/chat                # open http://127.0.0.1:8000/ in a browser
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")

Endpoints: GET / (the chat page, one file shipped in the package), GET /health, GET /v1/models,
GET /v1/models/{id}, POST /v1/completions and POST /v1/chat/completions (OpenAI's wire format,
streamed as server-sent events with `stream: true`). Chat goes through mtgpt's chat template (mtgpt.chat): the reply is
what the model writes after "Bot:" up to the end of the line.

One model, many clients. The model lives in the main thread's generation loop (`Worker.run`);
uvicorn serves HTTP from a second thread. Each request becomes a `Job` holding its own
`mtgpt.sample.stream` (its KV cache, window and random generator); the loop steps every active
job by one token in turn, so concurrent clients advance together (on a GPU a job's tokens are
computed 16 ahead and copied to the host together: `mtgpt.sample.on_host`). Tokens go
into the job's queue whether or not its client reads them, so a slow client never stalls the
others; a client that disconnects has its job dropped before its next step. The generation code
is `mtgpt sample`'s, so with a seed (or temperature 0) the text equals `mtgpt sample`'s.

A prompt longer than the context is cropped, not refused: a completion's model sees the last
block_size tokens (as `mtgpt sample` does), a chat drops its oldest turns (as `mtgpt chat`
does); the response then carries an `X-Mtgpt-Warning` header, and the server logs it.
Bad requests get a 4xx with an OpenAI-style JSON error; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mtgpt import chat
from mtgpt.config import seed_problem
from mtgpt.sample import SampleConfig, SampleText, on_host, stream
from mtgpt.tokenizer import Tokenizer

MAX_BODY = 1 << 20  # bytes a request body may have (a context of text is a few KB)
MAX_JOBS = 256  # requests generating or waiting at once; more get 429
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ApiError(Exception):
    """An error a client made: HTTP status, message, and OpenAI's type / param / code fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Stopping(ApiError):
    """503: the server is stopping; `done` says what became of the request (a stream has sent its
    text so far, a whole response nothing)."""

    def __init__(self, done: str = ""):
        super().__init__(503, "the server is stopping (mtgpt serve got Ctrl-C or SIGTERM)" + done, "server_error")


# ---- requests (OpenAI's fields; those mtgpt cannot honour are refused, not ignored)

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt include_usage is refused
    include_usage: bool = False
    include_obfuscation: bool = True  # (random padding against length side channels: mtgpt sends none)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(200, ge=0, description="mtgpt's extra: sample from the k best tokens (0: all)")
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted at their no-op values only
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    logit_bias: dict | None = None
    logprobs: Any = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """`null` for an option means its default, as in OpenAI's API (the official client sends
        `temperature: null` for temperature=None, and so do wrappers that pass options through)."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items()
                    if v is not None or k not in cls.model_fields or cls.model_fields[k].default is None}
        return data

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int | None) -> int | None:
        if (problem := seed_problem(seed)) is not None:  # `mtgpt sample --seed`'s range
            raise PydanticCustomError("seed_range", problem)
        return seed


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]] = ""
    max_tokens: int | None = Field(None, ge=0)  # None: OpenAI's default of 16 (the server's limit if lower)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_form(cls, prompt: Any) -> Any:
        forms = (isinstance(prompt, str) or isinstance(prompt, list) and (
            all(isinstance(p, str) for p in prompt) or all(isinstance(p, int) and not isinstance(p, bool) for p in prompt)
            or all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                   for p in prompt)))
        if not forms:
            raise PydanticCustomError("prompt_form", "must be a string, a list of strings, a list of token ids or a "
                                                     "list of lists of token ids")
        return prompt


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict], None] = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)


def _unsupported(req: _Request) -> None:
    """Refuse options mtgpt would otherwise silently ignore."""
    checks = {"presence_penalty": req.presence_penalty == 0, "frequency_penalty": req.frequency_penalty == 0,
              "logit_bias": not req.logit_bias, "logprobs": req.logprobs in (None, False)}
    if isinstance(req, CompletionRequest):
        checks.update(echo=not req.echo, best_of=req.best_of in (None, 1), suffix=req.suffix is None)
    for name, ok in checks.items():
        if not ok:
            raise ApiError(400, f"{name} is not supported by mtgpt serve", param=name)
    known = set(type(req).model_fields) | {"tools", "tool_choice", "response_format", "parallel_tool_calls"}
    extra = sorted(set(req.model_extra or {}) - known)
    if theirs := [name for name in extra if name in OPENAI_ONLY]:  # OpenAI's, with no meaning here
        raise ApiError(400, f"{', '.join(theirs)}: OpenAI's, not supported by mtgpt serve", param=theirs[0])
    if extra:  # a misspelt option must not be ignored silently
        raise ApiError(400, f"unknown parameter(s): {', '.join(extra)}", param=extra[0])
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if (req.model_extra or {}).get("tool_choice") not in (None, "none"):
        raise ApiError(400, "tool_choice needs tools, which mtgpt serve does not support", param="tool_choice")
    if isinstance(req, ChatRequest) and None not in (req.max_tokens, req.max_completion_tokens) \
            and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, f"max_tokens ({req.max_tokens}) and max_completion_tokens ({req.max_completion_tokens}) "
                            "disagree: give one (max_completion_tokens is OpenAI's newer name)",
                       param="max_completion_tokens")
    if (req.model_extra or {}).get("tools"):
        raise ApiError(400, "tools is not supported by mtgpt serve", param="tools")
    if (req.model_extra or {}).get("response_format") not in (None, {"type": "text"}):  # (text: the default)
        raise ApiError(400, "response_format other than {\"type\": \"text\"} is not supported by mtgpt serve",
                       param="response_format")


# OpenAI's request parameters that mean nothing here (stored completions, reasoning, audio, ...):
# refused as not supported rather than as unknown
OPENAI_ONLY = {"store", "metadata", "top_logprobs", "reasoning_effort", "modalities", "audio", "prediction",
               "service_tier", "web_search_options", "functions", "function_call", "verbosity", "prompt_cache_key",
               "safety_identifier"}


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: at most 4 non-empty strings", param="stop")
    return stops


# ---- generation

@dataclass
class Job:
    """One request: its prompt, options and choices, and the queue its events go to:
    ("text", index, piece), ("finish", index, reason), ("done", None, None), ("error", None, ApiError)."""
    prompt: list[int]
    cfg: SampleConfig
    choices: list[SampleText]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    steps: Any = None

    def emit(self, kind: str, index: int | None, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, index, value))
        except RuntimeError:  # the HTTP server's loop is closed: nobody is waiting any more
            pass


class Worker:
    """The loop that owns the model and steps every active job one token at a time. `mtgpt serve`
    runs it in the main thread (PyTorch's CPU kernels run ~1.7x slower from another thread here:
    OpenMP's threads spin for the main thread's team) and the HTTP server in a second thread."""

    def __init__(self, model):
        self.model = model
        self.incoming: queue.Queue = queue.Queue()
        self.active: list[Job] = []
        self.stopped = False
        self.lock = threading.Lock()  # submit() against the end of run()
        self.generated = 0  # tokens generated since start (all jobs; /health shows it)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.stopped:
                raise Stopping()
            if self.incoming.qsize() + len(self.active) >= MAX_JOBS:
                raise ApiError(429, f"the server is busy ({MAX_JOBS} requests in flight); retry later",
                               type_="rate_limit_error")
            self.incoming.put(job)

    def stop(self) -> None:
        self.stopped = True
        self.incoming.put(None)

    def counts(self) -> dict[str, int]:
        return {"active": len(self.active), "queued": self.incoming.qsize(), "generated_tokens": self.generated}

    def start_thread(self) -> threading.Thread:
        """Run the loop in a daemon thread (for embedding and tests)."""
        thread = threading.Thread(target=self.run, name="mtgpt-generate", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        """Until stop(): take new jobs, then give every active job its next token. Then every job
        not done is ended with an error event (its text so far was sent), so that no response
        waits for tokens that will never come: the HTTP server's graceful shutdown then has
        nothing to cancel."""
        try:
            self._run()
        finally:
            with self.lock:  # (a submit now is refused, not queued for nobody)
                self.stopped = True
                queued = self._drain()
            for job in self.active + queued:
                job.emit("error", None, Stopping("; the text so far was sent"))
            self.active = []

    def _drain(self) -> list[Job]:
        """The jobs still queued (the None of stop() left out)."""
        jobs = []
        while True:
            try:
                job = self.incoming.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _run(self) -> None:
        while not self.stopped:
            try:
                while True:  # wait only when there is nothing to step (with a timeout: signals)
                    job = self.incoming.get(timeout=0.2) if not self.active else self.incoming.get_nowait()
                    if job is None:
                        return
                    job.steps = on_host(stream(self.model, job.prompt, job.cfg))
                    self.active.append(job)
            except queue.Empty:
                pass
            for job in list(self.active):
                if job.cancelled:
                    self.active.remove(job)
                    continue
                try:
                    done = self._step(job)
                except Exception as e:  # a failed generation ends its request, not the server
                    job.emit("error", None, ApiError(500, f"generation failed: {type(e).__name__}: {e}",
                                                     type_="server_error"))
                    done = True
                if done:
                    self.active.remove(job)

    def _step(self, job: Job) -> bool:
        step = next(job.steps, None)  # the next token of each choice, or None when the budget is spent
        tokens = step if step is not None else [None] * len(job.choices)
        self.generated += len(tokens) if step is not None else 0
        for i, (choice, token) in enumerate(zip(job.choices, tokens)):
            if choice.finish:
                continue
            text = choice.add(token) if token is not None else ""
            if not choice.finish and (token is None or choice.tokens >= job.cfg.max_new_tokens):
                text += choice.length()
            if text:
                job.emit("text", i, text)
            if choice.finish:
                job.emit("finish", i, choice.finish)
        if all(c.finish for c in job.choices):
            job.emit("done", None, None)
            return True
        return False


# ---- the app

@dataclass
class Server:
    model: Any
    tok: Tokenizer
    name: str
    api_key: str | None = None
    max_tokens_limit: int = 1024
    worker: Worker | None = None

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def check_auth(self, headers) -> None:
        if self.api_key is None:
            return
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {self.name!r}",
                           param="model", code="model_not_found")

    def budget(self, max_tokens: int | None, default: int) -> int:
        n = default if max_tokens is None else max_tokens
        if n > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {n}, above this server's limit of {self.max_tokens_limit} "
                                "(mtgpt serve --max-tokens-limit)", param="max_tokens")
        return n

    def job(self, prompt: list[int], req: _Request, max_tokens: int, chat_reply: bool) -> Job:
        cfg = SampleConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k or None,
                           top_p=req.top_p, seed=req.seed, num_samples=req.n, stop_at_eot=True,
                           stops=_stops(req.stop))
        if cfg.top_k is not None and cfg.top_k > self.model.config.vocab_size:
            raise ApiError(400, f"top_k must be between 0 (all tokens) and {self.model.config.vocab_size} "
                                f"(the vocabulary size), got {cfg.top_k}", param="top_k")
        choices = [SampleText(self.tok, cfg.stops, chat_reply=chat_reply) for _ in range(req.n)]
        return Job(prompt, cfg, choices, asyncio.get_running_loop())


def _prompts(prompt, tok: Tokenizer) -> list[list[int]]:
    """The request's prompts as ids; an empty one starts a new document (<|endoftext|>)."""
    if isinstance(prompt, str):
        return [tok.prompt(prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [tok.prompt(p) if isinstance(p, str) else list(p) or [tok.eot] for p in prompt] or [[tok.eot]]


def chat_turns(messages: list[Message]) -> list[tuple[str, str]]:
    """OpenAI messages -> mtgpt chat template turns; the last must be the user's."""
    turns = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in m.content):
                raise ApiError(400, "only text content parts are supported", param=f"messages.{i}.content")
            text = " ".join(p["text"] for p in m.content)
        elif m.content is None and m.role != "assistant":  # (an assistant's may be null, as OpenAI's)
            raise ApiError(400, f"messages.{i}.content: a {m.role} message needs its text (a string, \"\" "
                                "for an empty one)", param=f"messages.{i}.content")
        else:
            text = m.content or ""
        turns.append((chat.SYSTEM if m.role in ("system", "developer") else chat.ROLES[m.role], text))
    if messages[-1].role != "user":
        raise ApiError(400, "the last message must be the user's (the model answers it)", param="messages")
    return turns


class Guard:
    """ASGI middleware for /v1: the API key and the body size, checked before anything is read.
    (Plain ASGI, not Starlette's BaseHTTPMiddleware, which would wrap every streamed response.)"""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                self.server.check_auth(headers)
                length = headers.get("content-length")
                if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                    raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
            except ApiError as e:
                await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: Server):
    """The FastAPI application for one loaded model."""
    app = FastAPI(title="mtgpt serve", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("mtgpt").joinpath("assets", "chat.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(404)
    async def not_found(request, _):
        return JSONResponse(ApiError(404, f"no such path: {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def bad_method(request, _):
        return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                            status_code=405)

    app.add_middleware(Guard, server=server)

    async def parse(request: Request, kind: type[BaseModel]):
        body = b""
        async for chunk in request.stream():  # bodies sent without a Content-Length are counted too
            body += chunk
            if len(body) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            req = kind.model_validate(data, strict=True)  # "3" is no number, 1 no boolean (as OpenAI's API)
        except ValidationError as e:
            err = e.errors()[0]
            # pydantic names the member of a union it tried (prompt.str, stop.list[str]): not a field
            where = ".".join(str(x) for x in err["loc"] if isinstance(x, int) or x.isidentifier()
                             and x not in ("str", "int", "float", "bool", "list", "dict", "none"))
            raise ApiError(400, f"{where}: {err['msg']}", param=where) from None
        server.check_model(req.model)
        _unsupported(req)
        return req

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)  # (HEAD: link checkers, monitors)
    async def index():
        return HTMLResponse(page)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok", "model": server.name, "context": server.block_size,
                "auth": server.api_key is not None, "max_tokens_limit": server.max_tokens_limit,
                **server.worker.counts()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [await model(server.name)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return {"id": server.name, "object": "model", "created": 0, "owned_by": "mtgpt"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = _prompts(req.prompt, server.tok)
        if len(prompts) * req.n > 64:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} is more than 64 texts in one request",
                           param="prompt")
        if any(t < 0 or t >= server.model.config.vocab_size for p in prompts for t in p):
            raise ApiError(400, "prompt: a token id is outside the vocabulary", param="prompt")
        max_tokens = server.budget(req.max_tokens, min(16, server.max_tokens_limit))
        jobs = [server.job(p, req, max_tokens, chat_reply=False) for p in prompts]
        warning = None
        if max(len(p) for p in prompts) > server.block_size:
            warning = (f"the prompt has {max(len(p) for p in prompts)} tokens, more than the context of "
                       f"{server.block_size}; the model sees its last {server.block_size}")
        return await respond(request, req, jobs, "text_completion", "cmpl", sum(len(p) for p in prompts), warning)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        turns = chat_turns(req.messages)
        max_tokens = server.budget(req.max_completion_tokens if req.max_completion_tokens is not None
                                   else req.max_tokens, server.max_tokens_limit)
        fit = chat.fit_turns(server.tok, turns, server.block_size, max(1, max_tokens))
        whole = len(chat.prompt_ids(server.tok, turns))  # usage counts the prompt as sent, as for completions
        warning = None
        if left_out := fit.left_out("message"):
            warning = (f"the conversation is longer than the context of {server.block_size} tokens; left out: "
                       f"{', '.join(left_out)}")
        job = server.job(fit.ids, req, min(max_tokens, fit.reply), chat_reply=True)
        return await respond(request, req, [job], "chat.completion", "chatcmpl", whole, warning)

    async def respond(request: Request, req, jobs: list[Job], obj: str, prefix: str, prompt_tokens: int,
                      warning: str | None):
        try:
            for job in jobs:
                server.worker.submit(job)
        except ApiError:
            for job in jobs:
                job.cancelled = True
            raise
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        headers = {"X-Mtgpt-Warning": warning} if warning else {}
        base = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()),
                "model": server.name}
        n = req.n
        if req.stream:
            events = _stream_events(jobs, n, base, obj, prompt_tokens,
                                    bool(req.stream_options and req.stream_options.include_usage))
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **headers})
        texts, reasons = {}, {}

        async def collect() -> None:
            for j, job in enumerate(jobs):
                while (event := await job.events.get())[0] != "done":
                    kind, i, value = event
                    if kind == "error":
                        raise Stopping("; the request was not completed") if isinstance(value, Stopping) else value
                    if kind == "text":
                        texts[j * n + i] = texts.get(j * n + i, "") + value
                    else:
                        reasons[j * n + i] = value

        collecting, left = asyncio.ensure_future(collect()), asyncio.ensure_future(client_left(request))
        try:  # a client that leaves before the answer (a timeout, Ctrl-C) has its generation dropped
            await asyncio.wait({collecting, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (collecting, left):
                task.cancel()
            for job in jobs:
                job.cancelled = True  # a no-op once done; frees the worker if the client left
        if not collecting.done() or collecting.cancelled():
            return Response(status_code=499)  # (nobody reads it: nginx's "client closed request")
        collecting.result()  # (raises an error event's ApiError)
        choices = []
        for k in range(len(jobs) * n):
            if obj == "chat.completion":
                choices.append({"index": k, "message": {"role": "assistant", "content": texts.get(k, "")},
                                "logprobs": None, "finish_reason": reasons.get(k)})
            else:
                choices.append({"index": k, "text": texts.get(k, ""), "logprobs": None,
                                "finish_reason": reasons.get(k)})
        return JSONResponse({**base, "choices": choices, "usage": _usage(jobs, prompt_tokens)}, headers=headers)

    def _stream_events(jobs, n, base, obj, prompt_tokens, include_usage):
        chat_like = obj == "chat.completion"
        chunk_obj = "chat.completion.chunk" if chat_like else obj

        def chunk(k: int, text: str | None, reason: str | None = None, role: bool = False) -> str:
            if chat_like:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                c = {"index": k, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                c = {"index": k, "text": text or "", "logprobs": None, "finish_reason": reason}
            return f"data: {json.dumps({**base, 'object': chunk_obj, 'choices': [c]})}\n\n"

        async def events():
            try:
                if chat_like:
                    for k in range(len(jobs) * n):
                        yield chunk(k, None, role=True)
                for j, job in enumerate(jobs):
                    while (event := await job.events.get())[0] != "done":
                        kind, i, value = event
                        if kind == "error":
                            yield f"data: {json.dumps(value.body())}\n\n"
                            return
                        yield chunk(j * n + i, value if kind == "text" else None,
                                    value if kind == "finish" else None)
                if include_usage:
                    yield f"data: {json.dumps({**base, 'object': chunk_obj, 'choices': [], 'usage': _usage(jobs, prompt_tokens)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects: its generation stops before the next token
                for job in jobs:
                    job.cancelled = True

        return events()

    return app


async def client_left(request: Request) -> None:
    """Returns when the client of a request whose body has been read disconnects: the next ASGI
    message is then http.disconnect (it comes only after the response otherwise)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(jobs: list[Job], prompt_tokens: int) -> dict[str, int]:
    completion = sum(c.tokens for job in jobs for c in job.choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here (uvicorn is handed it) so that each way binding fails says
    what to change: a host that is no address, one not of this machine, or a port that is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds: a restart reuses the port)
    try:
        sock.bind((host, port))
    except OSError as e:
        from mtgpt.sample import SampleError

        sock.close()
        if isinstance(e, socket.gaierror):
            raise SampleError(f"--host {host}: no such address ({e.strerror}); give an address of this machine, "
                              "e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every network)") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise SampleError(f"--host {host} is not an address of this machine ({e.strerror}); give one of its "
                              "addresses, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every network)") from None
        if e.errno == errno.EADDRINUSE:
            raise SampleError(f"could not serve on {host}:{port}: the port is taken; choose another with "
                              "--port") from None
        raise SampleError(f"could not serve on {host}:{port}: {e.strerror}") from None
    return sock


def run_serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              best: bool = False, device: str = "auto", dtype: str = "auto", max_tokens_limit: int = 1024,
              model_name: str | None = None, log=print) -> None:
    """`mtgpt serve`: load the model once, serve until Ctrl-C or SIGTERM."""
    from pathlib import Path

    import uvicorn

    from mtgpt.sample import SampleError, load_for_inference

    if max_tokens_limit < 1:
        raise SampleError(f"--max-tokens-limit must be >= 1, got {max_tokens_limit}")
    if api_key == "":
        raise SampleError("--api-key must not be empty")
    if model_name is not None and not model_name.strip():
        raise SampleError("--model-name must not be empty (leave it out for the run folder's name)")
    model, tok = load_for_inference(run_dir, best, device, dtype)
    sock = listen(host, port)
    if note := chat.dialogue_note(run_dir):  # the page and /v1/chat/completions would not answer
        log(note)
    name = model_name or Path(run_dir).resolve().name
    server = Server(model, tok, name, api_key, max_tokens_limit)
    server.worker = Worker(model)
    app = create_app(server)
    if host not in LOOPBACK and api_key is None:
        log(f"warning: serving on {host} without --api-key: anyone who can reach this machine can use "
            "the model (set --api-key, or MTGPT_API_KEY)")
    web = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                        timeout_graceful_shutdown=2))
    # uvicorn leaves the signals to the main thread when it runs in another one
    http = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, name="mtgpt-http", daemon=True)
    http.start()

    def stop(signum, frame):  # Ctrl-C or SIGTERM: finish the HTTP server, then the generation loop
        web.should_exit = True
        server.worker.stop()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not web.started:
            if server.worker.stopped:
                return
            if not http.is_alive():
                raise SampleError(f"could not serve on {host}:{port} (uvicorn's error is above)")
            time.sleep(0.05)
        shown = f"[{host}]" if ":" in host else host
        log(f"mtgpt serve: {name} (context {server.block_size}, {next(model.parameters()).device}) at "
            f"http://{shown}:{port}/ ; OpenAI API at http://{shown}:{port}/v1 ; Ctrl-C stops")
        server.worker.run()  # in the main thread, until stop()
    finally:
        web.should_exit = True
        server.worker.stop()
        http.join(timeout=10)
        sock.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
