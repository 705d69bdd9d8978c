"""The GPT: a pre-norm, GPT-2-shaped decoder-only transformer.

Reads top to bottom: attention, MLP, block, GPT. Parameter names follow Hugging Face's GPT-2
(`transformer.wte`, `transformer.h.N.attn.c_attn`, `lm_head`, ...) so weights map one to one
(HF stores its Conv1D weights transposed; `mtgpt.hf` does that transpose).

Notation used in shape comments:
    B  batch size            T  sequence length (<= block_size)
    C  n_embd (width)        nh n_head           hs head size = C // nh
    V  vocab_size            P  tokens already in the KV cache
    Vp padded_vocab_size: V rounded up to config.vocab_multiple (rows of wte / lm_head)

This file never imports deepspeed or torch.distributed and never reads the environment.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtgpt.config import ModelConfig


class KVCache:
    """Keys and values of the tokens seen so far, for generation. Per layer, one (B, nh,
    block_size, hs) buffer each for k and v, allocated (zeroed) at first use and filled in place,
    never re-allocated: `length` tokens of them are valid.

    Two ways to add tokens. `GPT.forward` appends T tokens after `length` and attends to exactly
    the valid keys (shapes grow with the text). `GPT.decode` writes one token at `position`, a (1,)
    tensor on the device, and attends to all block_size keys through a mask: every shape and
    address stays the same from token to token, which is what a CUDA graph needs (mtgpt.sample)."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0  # P: tokens cached by forward (advanced by GPT.forward after the last layer)
        self.position: torch.Tensor | None = None  # decode's write position, (1,) long, on the device
        self.visible: torch.Tensor | None = None  # during GPT.decode: (1, 1, 1, block_size) keys <= position

    def _buffers(self, layer: int, k: torch.Tensor, capacity: int) -> None:
        if self.k[layer] is None:
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, capacity, hs)  # zeros: a masked-out slot is never NaN
            self.v[layer] = k.new_zeros(B, nh, capacity, hs)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) after the cached ones; return all keys and values so far."""
        self._buffers(layer, k, capacity)
        P, T = self.length, k.size(2)
        self.k[layer][:, :, P:P + T] = k
        self.v[layer][:, :, P:P + T] = v
        return self.k[layer][:, :, :P + T], self.v[layer][:, :, :P + T]  # (B, nh, P+T, hs) views

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token's k, v (B, nh, 1, hs) at `position`; return the whole buffers (B, nh,
        capacity, hs), to be read with the mask `visible`."""
        self._buffers(layer, k, capacity)
        self.k[layer].index_copy_(2, self.position, k)
        self.v[layer].index_copy_(2, self.position, v)
        return self.k[layer], self.v[layer]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.block_size = config.block_size
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        fixed = cache is not None and cache.visible is not None  # GPT.decode: one token, fixed shapes
        if fixed:
            k, v = cache.put(layer, k, v, self.block_size)  # (B, nh, block_size, hs)
        elif cache is not None:
            k, v = cache.append(layer, k, v, self.block_size)  # (B, nh, P+T, hs)
        P = k.size(2) - T
        mask, is_causal = None, T > 1  # one new token may see every key: no mask at all
        if fixed:
            mask, is_causal = cache.visible, False  # keys up to the token's position
        elif P > 0 and T > 1:
            # New query i sits at absolute position P+i and may see keys 0..P+i.
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new", so HF export gives the same logits
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str, vocab_size: int | None = None,
                  mask: bool | None = None) -> torch.Tensor:
    """The cross-entropy of logits (..., Vp) against targets (...) in fp32; a target of -1 is not
    scored. Columns from vocab_size on are the vocabulary's padding and never count: masked to -inf
    (exp(-inf) adds exactly 0 and they get no gradient; rows stay Vp wide and contiguous) or sliced
    off (rows of V values in a Vp stride). The same loss and gradients either way; the question is
    speed (benchmarks/loss_speed.py, `make gpu-check`'s `loss` check). mask None: on a GPU mask, where
    the loss was a third of the seed model's step (gpu-check's profile on an H200) and a compiled
    kernel over sliced rows cannot use vectorized loads and adds a zero-filled copy for the padded
    gradient (measured since on an H200: 5.0 against 7.7 ms, compiled); on CPU slice, measured
    faster there (128 against 192 ms compiled). Uncompiled, the mask goes on the fp32 copy the loss
    makes anyway (a masked bf16 copy raised evaluation's peak from 18.9 to 22.0 GiB on an H200)."""
    if vocab_size is not None and vocab_size < logits.size(-1):
        if logits.is_cuda if mask is None else mask:  # the rule: a GPU masks, a CPU slices
            padding = torch.arange(logits.size(-1), device=logits.device) >= vocab_size  # (Vp,)
            scores = logits.float()  # masked in place when this is a copy: eager, no third copy of the logits
            scores = scores.masked_fill_(padding, float("-inf")) if scores is not logits else \
                scores.masked_fill(padding, float("-inf"))
        else:
            scores = logits[..., :vocab_size].float()
    else:
        scores = logits.float()
    return F.cross_entropy(scores.reshape(-1, scores.size(-1)), targets.reshape(-1), ignore_index=-1,
                           reduction=reduction)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str,
                         vocab_size: int, dtype: torch.dtype | None = None, chunk: int | None = None) -> torch.Tensor:
    """cross_entropy(x @ weight.T, targets, reduction, vocab_size) for x (..., C), weight (Vp, C),
    reduction "sum" or "mean", without the (..., Vp) logits: `chunk` rows at a time (default: ~128
    MiB of fp32 logits each) make their logits, their share of the loss and, when a gradient is
    wanted, their gradients, which backward only scales (Liger's fused linear cross-entropy, in
    plain PyTorch). Matmuls in `dtype` (autocast's when None and it is on, else x's), the loss in
    fp32 as in cross_entropy; padding rows of weight are never read and get a zero gradient. What
    it saves is the memory of the logits and their gradient (8 bytes per token per vocabulary row,
    training_bytes_per_token); its speed is measured by benchmarks/loss_speed.py."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"linear_cross_entropy sums or averages, not {reduction!r}")
    if dtype is None:
        on = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if on else x.dtype
    x2, t = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    chunk = chunk or max(64, 2 ** 25 // vocab_size // 64 * 64)  # rows: a multiple of 64 for tensor cores
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        loss = _LinearCrossEntropy.apply(x2, weight, t, vocab_size, dtype, chunk)
    else:
        loss = _chunked_loss(x2, weight, t, vocab_size, dtype, chunk, grads=False)[0]
    return loss / (t >= 0).sum().clamp(min=1) if reduction == "mean" else loss


def _chunked_loss(x, weight, targets, vocab_size, dtype, chunk, grads):
    """The summed loss of x (N, C) against targets (N,), and with grads its gradients for x (N, C)
    and weight (Vp, C), both fp32, chunk rows at a time."""
    with torch.autocast(x.device.type, enabled=False):
        w, xs = weight[:vocab_size].to(dtype), x.to(dtype)  # (V, C), (N, C)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grads else None
        for start in range(0, x.size(0), chunk):
            xc, tc = xs[start:start + chunk], targets[start:start + chunk]  # (n, C), (n,)
            logits = (xc @ w.T).float()  # (n, V): the one buffer of this size, all below is in place
            scored = tc >= 0
            picked = logits.gather(1, tc.clamp(min=0)[:, None])[:, 0]  # (n,) the targets' logits
            top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            e = logits.sub_(top).exp_()  # (n, V)
            total = e.sum(dim=-1)  # (n,)
            loss = loss + ((top[:, 0] + total.log() - picked) * scored).sum()  # logsumexp - target's logit
            if grads:  # d loss / d logits = softmax - one-hot, 0 for rows not scored
                g = e.div_(total[:, None])  # (n, V) softmax
                g.scatter_add_(1, tc.clamp(min=0)[:, None], -torch.ones_like(total)[:, None])
                g = g.mul_(scored[:, None]).to(dtype)
                grad_x[start:start + chunk] = (g @ w).float()  # (n, C)
                if dtype == torch.float32:
                    grad_w[:vocab_size].addmm_(g.T, xc)  # (V, C), in place
                else:
                    grad_w[:vocab_size] += (g.T @ xc).float()
    return loss, grad_x, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """The summed loss; its gradients are made in forward, chunk by chunk, and scaled in backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, dtype, chunk):
        loss, grad_x, grad_w = _chunked_loss(x, weight, targets, vocab_size, dtype, chunk, grads=True)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = x.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return (grad_x * grad_loss).to(x_dtype), (grad_w * grad_loss).to(w_dtype), None, None, None, None


class GPT(nn.Module):
    mask_padding: bool | None = None  # how the loss leaves out the vocabulary's padding (cross_entropy)
    # The loss straight from the last hidden states, the logits never whole (linear_cross_entropy):
    # forward then returns no logits. Training decides (mtgpt.train.build_engine).
    fused_loss: bool = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embedding (Vp rows)
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017, as GPT-2): the output projection is the token embedding.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        self._init_residual_projections()

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 initialisation (Radford et al. 2019), applied to every module:

        - Linear weights and both embeddings: normal(0, 0.02); Linear biases: zero.
        - LayerNorm: weight one, bias zero (PyTorch's default, left as is).
        - c_proj weights (the two projections that write into the residual stream) are then
          re-drawn with std 0.02 / sqrt(2 * n_layer) in `_init_residual_projections`: each block adds
          two such contributions, so this keeps the residual stream's variance flat with depth.
        """
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _init_residual_projections(self) -> None:
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied wte/lm_head matrix counted once (`parameters()` already dedups)
        and without its padding rows (vocab_multiple: never trained, never saved). With
        non_embedding, position embeddings are left out too (as in the scaling-law papers)."""
        c = self.config
        n = sum(p.numel() for p in self.parameters()) - (c.padded_vocab_size - c.vocab_size) * c.n_embd
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V), and the cross-entropy if targets (B, T): its
        mean over the scored targets, or with reduction="sum" their sum. A target of -1 is not
        scored (chat data trains only on the bot's tokens). With fused_loss the loss of a sum or
        mean comes without logits (None).

        With a cache, idx holds only the new tokens; they sit at positions P..P+T-1.
        last_only: logits of the last position only, (B, 1, V) (generation needs no more).
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                             f"{self.config.block_size}; crop the context first")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)  # (B, T, C)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x[:, -1:] if last_only else x)
        V = self.config.vocab_size
        if self.fused_loss and targets is not None and reduction in ("sum", "mean"):
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, reduction, V)
        logits = self.lm_head(x)  # (B, T, Vp), or (B, 1, Vp)
        loss = None if targets is None else cross_entropy(logits, targets, reduction, V, self.mask_padding)
        if logits.size(-1) != V:
            logits = logits[..., :V]  # (B, T, V): the padding columns are never scored or sampled
        return logits, loss

    def decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """idx (B, 1): one new token per sequence, at position cache.position (a (1,) tensor) ->
        logits (B, V); advances cache.position. The same logits as forward with a cache of that
        length, computed with shapes that never change (all block_size keys, masked), so the step
        can be captured once as a CUDA graph and replayed for every token (mtgpt.sample)."""
        L = self.config.block_size
        cache.visible = (torch.arange(L, device=idx.device) <= cache.position).view(1, 1, 1, L)
        x = self.transformer.wte(idx) + self.transformer.wpe(cache.position)  # (B, 1, C) + (1, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)  # (B, 1, C)
        cache.visible = None
        cache.position += 1  # in place: the graph replays it
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, 1, Vp)
        return logits[:, -1, :self.config.vocab_size]  # (B, V)

    def param_groups(self, weight_decay: float | None = None) -> list[dict]:
        """Two optimizer groups: matrices decay, the rest (biases, LayerNorms, embeddings) do not.

        Embeddings are left undecayed as in GPT-3-style recipes; the tied wte/lm_head matrix is one
        parameter and lands in the no-decay group once. `weight_decay` None leaves the decay group's
        value to the optimizer's configuration (DeepSpeed's JSON).
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():  # named_parameters() yields the tied matrix once
            is_matrix = p.dim() >= 2 and not name.startswith(("transformer.wte", "transformer.wpe"))
            (decay if is_matrix else no_decay).append(p)
        decay_group: dict = {"params": decay}
        if weight_decay is not None:
            decay_group["weight_decay"] = weight_decay
        return [decay_group, {"params": no_decay, "weight_decay": 0.0}]


WTE = "transformer.wte.weight"


def unpadded(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights as they leave the model (model.safetensors, Hugging Face): the token embedding
    without its padding rows, exactly vocab_size of them."""
    if WTE in weights and weights[WTE].size(0) != config.vocab_size:
        return {**weights, WTE: weights[WTE][:config.vocab_size]}
    return weights


def param_count(config: ModelConfig, non_embedding: bool = False) -> int:
    """`GPT(config).num_params(non_embedding)` without allocating anything (built on the meta
    device), and right whatever has become of a live model's tensors (ZeRO-3 partitions them)."""
    with torch.device("meta"):
        return GPT(config).num_params(non_embedding)


def training_bytes_per_token(config: ModelConfig, precision: str = "bf16") -> int:
    """Rough peak memory of one training token, for sizing micro-batches: 34 bytes per layer per
    unit of width in 16-bit (Korthikanti et al. 2022, with fused attention and no dropout) plus 8
    bytes per vocabulary row for the output layer's logits and their gradient (compiled: the
    cross-entropy is fused). fp32 doubles both. The seed model at 64 x 512 in bf16: 14.7 GiB
    estimated; 15.2 GiB peak measured on an H100 with weights and optimizer (gpu-check 'throughput')."""
    per_token = 34 * config.n_layer * config.n_embd + 8 * config.padded_vocab_size
    return per_token * (2 if precision == "fp32" else 1)


def flops_per_token(config: ModelConfig) -> int:
    """Training FLOPs per token, forward + backward: 6 N + 12 L C T (PaLM, Chowdhery et al. 2022,
    appendix B): N parameters without the position embedding (so the tied output layer counts),
    L layers, C width, T context (attention included)."""
    return 6 * param_count(config, non_embedding=True) + 12 * config.n_layer * config.n_embd * config.block_size
