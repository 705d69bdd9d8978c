"""`mtgpt eval`: loss, perplexity and bits per byte of a model on any text.

Every token is scored once, with context: the text (after an <|endoftext|> that starts it, so
its first token is scored too) is read in windows of block_size + 1 tokens (block_size inputs and
their targets, as in training) that start `stride` tokens apart; each window scores only the
tokens the previous one did not reach, so every token after the first window sees at least
block_size - stride + 1 tokens of context.

TEXT... are read as `mtgpt prepare` reads them (mtgpt.data.sources.resolve_sources and read_text).
A progress bar counts the tokens scored (on stderr, when it is a terminal).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mtgpt.model import GPT
from mtgpt.tokenizer import Tokenizer


@dataclass
class Score:
    name: str
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text
    nll: float  # summed negative log-likelihood, nats

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "ppl": self.ppl, "bits_per_byte": self.bpb}


def windows(n: int, span: int, stride: int):
    """(begin, end, first scored index) for each window of at most `span` (>= 2) tokens over n
    tokens; token 0 is never scored."""
    begin, scored = 0, 1
    while scored < n:
        end = min(begin + span, n)
        yield begin, end, scored
        scored = end
        begin = min(begin + stride, scored - 1)  # at least one token of context before the first new one


@torch.no_grad()
def score_ids(model: GPT, ids: list[int], stride: int, name: str = "") -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of ids[1:] given what precedes them; `name` labels
    the progress bar."""
    block = model.config.block_size
    if not 1 <= stride <= block:
        raise ValueError(f"--stride must be between 1 and the block size {block}, got {stride}")
    device = next(model.parameters()).device
    x = torch.tensor(ids, dtype=torch.long, device=device)
    nll, count = 0.0, 0
    with tqdm(total=len(ids) - 1, desc=f"eval {name}".strip(), unit="tok", unit_scale=True, dynamic_ncols=True,
              disable=None) as bar:
        for begin, end, first in windows(len(ids), block + 1, stride):
            logits, _ = model(x[begin:end - 1][None])  # (1, end - 1 - begin <= block, V)
            # logits at position i predict token begin + i + 1; score tokens first..end-1
            pred = logits[0, first - begin - 1: end - begin - 1].float()
            nll += F.cross_entropy(pred, x[first:end], reduction="sum").item()
            count += end - first
            bar.update(end - first)
    return nll, count


def score_text(model: GPT, tok: Tokenizer, text: str, name: str, stride: int | None = None) -> Score:
    """Score `text` read with `tok` (the model's own tokenizer: bits per byte compare across
    tokenizers, loss per token does not). A text with no tokens is refused (ValueError)."""
    ids = [tok.eot, *tok.encode(text)]
    if len(ids) < 2:  # (empty stdin, a file holding only a byte-order mark): nothing to score
        raise ValueError(f"{name}: no text to score (it holds no tokens); give text with at least one character")
    nll, count = score_ids(model, ids, max(1, model.config.block_size // 2) if stride is None else stride, name)
    return Score(name, count, len(text.encode("utf-8")), nll)


def total(scores: list[Score]) -> Score:
    return Score("total", sum(s.tokens for s in scores), sum(s.bytes for s in scores), sum(s.nll for s in scores))
