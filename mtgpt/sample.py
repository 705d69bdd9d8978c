"""Generation on one device, without DeepSpeed: KV cache, sliding window, top-k / top-p / temperature.

The window. A GPT with learned positions sees at most block_size tokens, so once the text is
longer the context must be cropped, as the seed does. Cropping to the last block_size tokens at
every step (the seed's rule) shifts every position each step and would throw the KV cache away
each time. Here the window start moves in strides of `slide` tokens (default block_size // 4):
the context is always between block_size - slide + 1 and block_size tokens, and the cache is
rebuilt once per stride. `slide=1` is exactly the seed's rule. With or without the cache the
model sees the same window, so both give the same logits (tested).
"""

from __future__ import annotations

import codecs
import math
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch
from tqdm import tqdm

from mtgpt.config import seed_problem
from mtgpt.model import GPT, KVCache
from mtgpt.tokenizer import Tokenizer


class SampleError(ValueError):
    """A bad sampling option; the message says which and what is allowed."""




@dataclass
class SampleConfig:
    max_new_tokens: int = 200  # tokens to generate per sample
    temperature: float = 0.8  # 0 = greedy; higher = more random
    top_k: int | None = 200  # keep the k most likely tokens (None or 0: all)
    top_p: float | None = None  # keep the smallest set of tokens with this much probability
    seed: int | None = None  # same seed, same text (0..MAX_SEED)
    num_samples: int = 1  # independent continuations of the prompt
    stop_at_eot: bool = True  # stop a sample at <|endoftext|>
    stops: list[str] = field(default_factory=list)  # stop a sample when its text contains one (not output)
    slide: int | None = None  # window stride past block_size (None: block_size // 4)

    def check(self, vocab_size: int) -> None:
        if self.max_new_tokens < 1:
            raise SampleError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SampleError(f"--temperature must be a number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and not 0 <= self.top_k <= vocab_size:
            raise SampleError(f"--top-k must be between 0 (all tokens) and {vocab_size} (the vocabulary "
                              f"size), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise SampleError(f"--top-p must be in (0, 1], got {self.top_p}")
        if (problem := seed_problem(self.seed)) is not None:
            raise SampleError(f"--seed {problem}")
        if self.num_samples < 1:
            raise SampleError(f"--num-samples must be >= 1, got {self.num_samples}")
        if any(not stop for stop in self.stops):
            raise SampleError("--stop must not be empty")


def window_start(n_tokens: int, block_size: int, slide: int) -> int:
    """Index of the first token the model sees when n_tokens are known (see module docstring)."""
    if n_tokens <= block_size:
        return 0
    return -(-(n_tokens - block_size) // slide) * slide  # ceil((n - block_size) / slide) * slide


def pick(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None = None,
         uniform: torch.Tensor | None = None) -> torch.Tensor:
    """logits (N, V) -> next token ids (N,).

    With top-k, only the k best logits are kept (sorted, so top-p needs no second sort). The draw
    is Gumbel-max (the argmax of logits / temperature - log(-log(u)), u uniform, is a sample of
    the softmax): `uniform` (N, k or V) numbers in [0, 1), else drawn from `generator`. It needs
    no softmax over the whole vocabulary and no host sync, and takes its randomness as a tensor,
    so the graphed decoder and the eager one draw the same tokens from the same numbers."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    if cfg.top_k and cfg.top_k < logits.size(-1):
        values, index = torch.topk(logits, cfg.top_k, dim=-1)  # (N, k), sorted, descending
    else:
        values, index = logits.sort(dim=-1, descending=True)  # (N, V)
    # The best logit is subtracted before dividing: a tiny temperature makes the others -inf
    # (never drawn) instead of overflowing every logit to inf.
    scaled = (values - values[:, :1]) / cfg.temperature
    if cfg.top_p is not None and cfg.top_p < 1.0:
        probs = scaled.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > cfg.top_p  # keep the token that crosses top_p
        scaled = scaled.masked_fill(drop, -math.inf)
    if uniform is None:
        uniform = torch.rand(values.shape, generator=generator, device=values.device)
    choice = (scaled - (-uniform.log()).log()).argmax(dim=-1, keepdim=True)  # (N, 1), an index into values
    return index.gather(-1, choice).squeeze(-1)


class Noise:
    """The uniform numbers `pick` draws with, `chunk` steps at a time from the seeded generator:
    step i gets the same numbers whichever decoder asks (one seed, one text)."""

    def __init__(self, shape: tuple[int, int], generator: torch.Generator | None, device: torch.device):
        self.shape, self.generator, self.device = shape, generator, device
        self.chunk = max(1, min(64, (1 << 22) // (shape[0] * shape[1])))  # at most 16 MB at a time
        self.drawn, self.first = None, -1

    def __call__(self, step: int) -> torch.Tensor:
        if self.drawn is None or not self.first <= step < self.first + self.chunk:
            self.first = step
            self.drawn = torch.rand(self.chunk, *self.shape, generator=self.generator, device=self.device)
        return self.drawn[step - self.first]


class GraphedStep:
    """One decode step, `model.decode` + `pick`, captured as a CUDA graph on its first call and
    replayed after: per token the host launches two copies and one replay instead of a hundred
    kernels, and never waits for the GPU. The graph holds the addresses of the cache's buffers and
    position, so the cache must be refilled in place (KVCache.length = 0), never replaced."""

    def __init__(self, model: GPT, cache: KVCache, cfg: SampleConfig, token: torch.Tensor,
                 uniform: torch.Tensor | None):
        self.model, self.cache, self.cfg = model, cache, cfg
        self.token = torch.empty_like(token)  # (N, 1): the graph's input
        self.uniform = None if uniform is None else torch.empty_like(uniform)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.decode(self.token, self.cache)  # (N, V)
        return pick(logits, self.cfg, uniform=self.uniform), logits

    def __call__(self, token: torch.Tensor, uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        self.token.copy_(token)
        if uniform is not None:
            self.uniform.copy_(uniform)
        if self.graph is None:
            # The first step runs eagerly on a side stream (PyTorch's recipe: it warms up the
            # libraries' handles) and its result is used; the capture after it only records.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                first = self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._step()
            return first
        self.graph.replay()
        return self.out[0].clone(), self.out[1].clone()  # the graph's outputs are overwritten next step


DECODERS = ("auto", "graph", "fixed", "dynamic")


@torch.no_grad()  # not inference_mode: training calls this on ZeRO-3 parameters it must not freeze
def stream(model: GPT, prompt: list[int], cfg: SampleConfig, use_cache: bool = True, decoder: str = "auto"
           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next token ids (N,), logits (N, V)) one step at a time, for N = num_samples, as
    tensors on the model's device: nothing here waits for the device (see `on_host`).
    `prompt` is not empty (`Tokenizer.prompt` starts an empty one with <|endoftext|>).

    decoder: how each token after the first of a window is computed. "dynamic": forward with the
    cache (shapes grow; CPU, and training's samples under ZeRO-3's hooks); "fixed": GPT.decode
    (fixed shapes, eager); "graph": GPT.decode captured as a CUDA graph (GraphedStep); "auto":
    graph on a CUDA device, dynamic elsewhere. The prompt (and a window's refill) always goes
    through forward. All give the same tokens up to float rounding (tested)."""
    block = model.config.block_size
    slide = cfg.slide or max(1, block // 4)
    device = next(model.parameters()).device
    if decoder not in DECODERS:
        raise SampleError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "auto":
        decoder = "graph" if device.type == "cuda" else "dynamic"
    if decoder == "graph" and device.type != "cuda":
        raise SampleError("the graph decoder needs a CUDA device")
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if not prompt:
        raise SampleError("the prompt has no tokens; start it with <|endoftext|> (Tokenizer.prompt)")
    tokens = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)  # (N, T)
    vocab = model.config.vocab_size
    k = cfg.top_k if cfg.top_k and cfg.top_k < vocab else vocab
    noise = Noise((cfg.num_samples, k), generator, device) if cfg.temperature > 0 else None
    cache, cached_from, graphed = None, -1, None
    for i in range(cfg.max_new_tokens):
        n = tokens.size(1)
        start = window_start(n, block, slide)
        uniform = noise(i) if noise is not None else None
        cached = use_cache and cache is not None and start == cached_from  # only the newest token is new
        if cached and decoder == "graph":
            graphed = graphed or GraphedStep(model, cache, cfg, tokens[:, -1:], uniform)
            nxt, last = graphed(tokens[:, -1:], uniform)
        else:
            if cached and decoder == "fixed":
                last = model.decode(tokens[:, -1:], cache)  # (N, V)
            elif cached:
                last = model(tokens[:, -1:], cache=cache, last_only=True)[0][:, -1]
            elif use_cache:  # (re)fill the cache with the window, in place (a graph holds its buffers)
                cache = cache or KVCache(model.config.n_layer)
                cache.length, cached_from = 0, start
                last = model(tokens[:, start:], cache=cache, last_only=True)[0][:, -1]
                if cache.position is None:
                    cache.position = torch.zeros(1, dtype=torch.long, device=device)
                cache.position.fill_(cache.length)  # where GPT.decode writes next
            else:
                last = model(tokens[:, start:], last_only=True)[0][:, -1]
            nxt = pick(last, cfg, uniform=uniform)
        yield nxt, last
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)


def on_host(steps: Iterator[tuple[torch.Tensor, torch.Tensor]], ahead: int | None = None) -> Iterator[list[int]]:
    """`stream`'s steps as lists of token ids (one per sample), copied from the device `ahead`
    steps at a time (default: 16 on a GPU, 1 on a CPU): the host waits once per `ahead` tokens, not
    once per token, and a caller that stops early (end of text) has let the device run at most
    `ahead - 1` steps further."""
    pending: list[torch.Tensor] = []
    for nxt, _ in steps:
        pending.append(nxt)
        if ahead is None:
            ahead = 16 if nxt.device.type == "cuda" else 1
        if len(pending) >= ahead:
            yield from torch.stack(pending).tolist()
            pending = []
    if pending:
        yield from torch.stack(pending).tolist()


class TextStream:
    """Token ids -> text pieces, holding back bytes of a UTF-8 character split across tokens."""

    def __init__(self, tok: Tokenizer):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tok = tok

    def add(self, token: int) -> str:
        return self.decoder.decode(self.tok.token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class SampleText:
    """One sample's text as its tokens arrive: UTF-8-safe pieces, stop strings, <|endoftext|>,
    and for a chat reply the template's rules (the space after "Bot:" is dropped, the end of the
    line ends the reply). `add` returns the text that may be shown now; text that may be the start
    of a stop string is held back until it is known not to be. `finish` becomes "stop" or "length"."""

    def __init__(self, tok: Tokenizer, stops: list[str] = (), chat_reply: bool = False, stop_at_eot: bool = True):
        self.decoder, self.eot = TextStream(tok), tok.eot
        self.stops = list(stops) + (["\n"] if chat_reply else [])
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.started, self.stop_at_eot = not chat_reply, stop_at_eot
        self.out, self.shown, self.tokens, self.finish = "", 0, 0, None

    def add(self, token: int) -> str:
        self.tokens += 1
        if self.stop_at_eot and token == self.eot:
            return self._end("stop", self.decoder.flush())
        piece = self.decoder.add(token)
        if not self.started:
            piece = piece.lstrip(" ")
            self.started = bool(piece)
        return self._grow(piece)

    def length(self) -> str:
        """The token budget is spent: the rest of the text."""
        text = self._grow(self.decoder.flush())
        return text + ("" if self.finish else self._end("length"))

    def _grow(self, piece: str) -> str:
        begin = max(0, len(self.out) - self.hold)
        self.out += piece
        cuts = [i for s in self.stops if (i := self.out.find(s, begin)) >= 0]
        if cuts:
            self.out = self.out[:min(cuts)]
            return self._end("stop")
        end = max(self.shown, len(self.out) - self.hold)
        text, self.shown = self.out[self.shown:end], end
        return text

    def _end(self, reason: str, piece: str = "") -> str:
        self.out += piece
        self.finish = reason
        text, self.shown = self.out[self.shown:], len(self.out)
        return text


def sample_texts(tok: Tokenizer, cfg: SampleConfig) -> list[SampleText]:
    """One SampleText per sample of `cfg`."""
    return [SampleText(tok, cfg.stops, stop_at_eot=cfg.stop_at_eot) for _ in range(cfg.num_samples)]


def grow(texts: list[SampleText], model: GPT, ids: list[int], cfg: SampleConfig, use_cache: bool = True,
         decoder: str = "auto") -> Iterator[None]:
    """Add each step's tokens to `texts` (one per sample) and yield after each step, until every
    sample has finished; whatever stops the iteration early, each text holds what it has so far."""
    for nxt in on_host(stream(model, ids, cfg, use_cache, decoder)):
        for text, token in zip(texts, nxt):
            if not text.finish:
                text.add(token)
        yield
        if all(text.finish for text in texts):
            return
    for text in texts:
        if not text.finish:
            text.length()


def generate(model: GPT, tok: Tokenizer, prompt: str, cfg: SampleConfig, use_cache: bool = True,
             decoder: str = "auto") -> list[str]:
    """Whole continuations of `prompt` (without the prompt), one per sample (`stream`'s decoder)."""
    cfg.check(model.config.vocab_size)
    texts = sample_texts(tok, cfg)
    for _ in grow(texts, model, tok.prompt(prompt), cfg, use_cache, decoder):
        pass
    return [text.out for text in texts]


def pick_device(name: str = "auto") -> torch.device:
    """--device: auto (a GPU if one is visible), cpu, cuda, or cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise SampleError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SampleError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise SampleError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return torch.device(name)


def load_for_inference(run_dir: str, best: bool, device: str, dtype: str = "auto") -> tuple[GPT, Tokenizer]:
    """A run's model on one device, and its tokenizer. dtype auto: bf16 on a GPU, fp32 on a CPU
    (bf16 halves the bytes read per token, which is what batch-1 generation waits on, where the
    CPU has fast bf16)."""
    from mtgpt.checkpoint import load_model, load_tokenizer, model_folder

    if dtype not in ("auto", "fp32", "bf16"):
        raise SampleError(f"--dtype must be auto, fp32 or bf16, got {dtype!r}")
    dev = pick_device(device)
    model = load_model(run_dir, best=best, device=dev)
    if dtype == "bf16" or (dtype == "auto" and dev.type == "cuda"):
        model = model.to(torch.bfloat16)
    return model, load_tokenizer(model_folder(run_dir, best))


def run_sample(run_dir: str, prompt: str, cfg: SampleConfig, best: bool = False, device: str = "auto",
               write=print, warn=print, dtype: str = "auto") -> list[str]:
    """`mtgpt sample`: load a run's model, continue `prompt`, write text as it comes.

    One sample is streamed token by token; several are written one after another when done."""
    model, tok = load_for_inference(run_dir, best, device, dtype)
    cfg.check(model.config.vocab_size)
    ids = tok.prompt(prompt)
    if len(ids) > model.config.block_size:
        warn(f"warning: the prompt has {len(ids)} tokens, more than the context of "
             f"{model.config.block_size}; the model sees its last {model.config.block_size}")
    if cfg.num_samples > 1:  # generated together, written when done (a bar on a terminal meanwhile)
        texts = sample_texts(tok, cfg)
        try:
            with tqdm(grow(texts, model, ids, cfg), total=cfg.max_new_tokens, desc=f"{cfg.num_samples} samples",
                      unit="tok", dynamic_ncols=True, leave=False, disable=None) as steps:
                for _ in steps:
                    pass
        finally:  # Ctrl-C too: each sample as far as it got
            for i, text in enumerate(texts):
                write(f"--- sample {i + 1}\n{prompt}{text.out}\n")
        return [text.out for text in texts]
    [text] = sample_texts(tok, cfg)
    write(prompt)
    for nxt in on_host(stream(model, ids, cfg)):
        write(text.add(nxt[0]))
        if text.finish:
            break
    else:
        write(text.length())
    write("\n")
    return [text.out]
