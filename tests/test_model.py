import math

import pytest
import torch

from mtgpt.config import ConfigError, ModelConfig
from mtgpt.model import param_count
from mtgpt.model import GPT, KVCache
from tests.conftest import TINY


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **kw}))


def test_shapes_and_loss():
    model = tiny()
    idx = torch.randint(0, 50257, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 50257) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == ()


def test_parameter_names_match_gpt2():
    names = set(dict(tiny().named_parameters()))
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.bias",
                 "transformer.h.0.ln_2.weight", "transformer.h.0.mlp.c_fc.weight",
                 "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight"]:
        assert name in names, name
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_causality():
    """Changing token t never changes the logits at positions before t."""
    model = tiny().eval()
    idx = torch.randint(0, 50257, (1, 20))
    changed = idx.clone()
    changed[0, 12] = (idx[0, 12] + 1) % 50257
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_initial_loss_is_uniform():
    model = tiny(n_embd=64, n_head=4)
    idx = torch.randint(0, 50257, (8, 32))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(50257)) < 0.3


def test_init_scales():
    model = tiny(n_layer=4, n_embd=128, n_head=4)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 4)) < 0.002
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert model.transformer.h[0].mlp.c_fc.bias.abs().max().item() == 0.0


def test_overfits_one_batch():
    model = tiny()
    idx = torch.randint(0, 50257, (2, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_default_parameter_count():
    # 50257*384 (wte, = lm_head) + 512*384 (wpe) + 6 blocks * 1,774,464 + 768 (ln_f)
    assert param_count(ModelConfig()) == 30_142_848
    assert tiny().num_params() == param_count(ModelConfig(**TINY))
    padded = ModelConfig(**{**TINY, "vocab_multiple": 64})  # (the padding rows are no parameters: info said so)
    assert padded.padded_vocab_size > padded.vocab_size and param_count(padded) == param_count(ModelConfig(**TINY))


@torch.no_grad()
def test_kv_cache_matches_full_forward():
    model = tiny().eval()
    idx = torch.randint(0, 50257, (2, 24))
    full, _ = model(idx)
    cache = KVCache(2)
    first, _ = model(idx[:, :10], cache=cache)
    steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(10, 24)]
    cached = torch.cat([first, *steps], dim=1)
    assert cache.length == 24
    assert torch.allclose(full, cached, atol=1e-5)
    last, _ = model(idx, last_only=True)
    assert last.shape == (2, 1, 50257) and torch.allclose(last, full[:, -1:], atol=1e-6)


@torch.no_grad()
def test_fixed_shape_decode_matches_full_forward():
    """GPT.decode (one token at cache.position, all block_size keys behind a mask: the shapes a CUDA
    graph needs) gives forward's logits, up to the last position of the context; the cache's
    unwritten slots are zeros, never read."""
    model = tiny().eval()
    L = model.config.block_size
    idx = torch.randint(0, 50257, (2, L))
    full, _ = model(idx)
    cache = KVCache(2)
    model(idx[:, :5], cache=cache)
    buffer = cache.k[0].data_ptr()
    cache.position = torch.tensor([cache.length])
    steps = [model.decode(idx[:, t:t + 1], cache) for t in range(5, L)]
    assert int(cache.position) == L and cache.visible is None
    assert all(s.shape == (2, 50257) for s in steps)
    assert torch.allclose(torch.stack(steps, dim=1), full[:, 5:], atol=1e-5)
    assert cache.k[0].data_ptr() == buffer  # written in place: a graph's addresses stay valid


def test_too_long_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


def test_config_validation():
    with pytest.raises(ConfigError, match="does not divide"):
        ModelConfig(n_head=5, n_embd=384)
    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.from_dict({"n_layers": 3})


def test_param_groups_split():
    model = tiny()
    decay, no_decay = model.param_groups()
    assert no_decay["weight_decay"] == 0.0
    decay_ids = {id(p) for p in decay["params"]}
    assert id(model.transformer.h[0].attn.c_attn.weight) in decay_ids
    assert id(model.transformer.wte.weight) not in decay_ids
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def padded_and_plain(seed: int = 0) -> tuple[GPT, GPT]:
    """The same tiny model with its vocabulary padded to a multiple of 64 and without padding;
    the padding rows are made large, so any use of them would show."""
    torch.manual_seed(seed)
    padded = GPT(ModelConfig(**TINY, vocab_multiple=64))
    with torch.no_grad():
        padded.transformer.wte.weight[50257:] = 5.0
    plain = GPT(ModelConfig(**TINY))
    plain.load_state_dict({k: (v[:50257] if k in ("transformer.wte.weight", "lm_head.weight") else v)
                           for k, v in padded.state_dict().items()})
    return padded, plain


def test_a_padded_vocabulary_is_never_scored_or_sampled():
    padded, plain = padded_and_plain()
    assert padded.config.padded_vocab_size == 50304 and padded.transformer.wte.weight.shape[0] == 50304
    assert padded.lm_head.weight is padded.transformer.wte.weight
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    (a, la), (b, lb) = padded(idx, idx), plain(idx, idx)
    assert a.shape == b.shape == (2, 16, 50257)  # what sampling, eval and chat see
    assert torch.equal(a, b) and torch.equal(la, lb)  # the padding changes nothing they compute
    from mtgpt.sample import SampleConfig, stream

    for cfg in (SampleConfig(max_new_tokens=20, temperature=0), SampleConfig(max_new_tokens=20, top_k=0, seed=1)):
        ids = [int(n[0]) for n, _ in stream(padded.eval(), [1, 2, 3], cfg)]
        assert max(ids) < 50257
    with pytest.raises(ConfigError, match="vocab_multiple"):
        ModelConfig(vocab_multiple=0)
    assert ModelConfig(vocab_multiple=None).padded_vocab_size == ModelConfig(vocab_multiple=1).padded_vocab_size == 50257


def test_the_padded_output_layer_trains_like_the_plain_one():
    padded, plain = padded_and_plain()
    idx = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(2))
    for model in (padded, plain):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
    grad = padded.transformer.wte.weight.grad
    assert torch.allclose(grad[:50257], plain.transformer.wte.weight.grad, atol=1e-7)
    assert grad[50257:].abs().max() == 0  # the padding rows get no gradient: they are never used


def test_the_padding_masked_or_sliced_gives_the_same_loss_and_gradients():
    """A GPU masks the padding columns to -inf (rows stay whole for vectorized kernels), a CPU
    slices them off (faster there): the two must train the same model."""
    padded, _ = padded_and_plain()
    idx = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(3))
    idx[0, 5] = -1  # a target not scored, as chat data has
    found = {}
    for mask in (False, True):
        padded.zero_grad(set_to_none=True)
        padded.mask_padding = mask
        logits, loss = padded(idx[:, :-1].clamp(min=0), idx[:, 1:])
        loss.backward()
        found[mask] = (logits.detach(), loss.detach(), padded.transformer.wte.weight.grad.clone())
    (la, a, ga), (lb, b, gb) = found[False], found[True]
    assert la.shape == lb.shape == (2, 16, 50257) and torch.equal(la, lb)
    assert torch.allclose(a, b, rtol=0, atol=1e-6) and torch.allclose(ga, gb, rtol=0, atol=1e-8)
    assert gb[50257:].abs().max() == 0  # masked: the padding rows still get no gradient


def test_the_loss_masks_the_padding_on_a_gpu_and_slices_it_on_cpu():
    from mtgpt.model import cross_entropy

    logits = torch.randn(4, 128, requires_grad=True)
    targets = torch.randint(0, 100, (4,))
    ops = {}
    for mask in (None, False, True):  # None: by device (this CPU: slice)
        loss = cross_entropy(logits, targets, "mean", 100, mask)
        fn, names = loss.grad_fn, set()
        while fn is not None:  # walk the autograd graph back to the logits
            names.add(type(fn).__name__)
            fn = fn.next_functions[0][0] if fn.next_functions else None
        ops[mask] = names
    assert "SliceBackward0" in ops[None] and "MaskedFillBackward0" not in ops[None]
    assert ops[False] == ops[None] and "MaskedFillBackward0" in ops[True]
    assert torch.allclose(cross_entropy(logits, targets, "sum", 100, True), cross_entropy(logits, targets, "sum", 100))
    assert torch.equal(cross_entropy(logits[:, :100], targets, "mean"), cross_entropy(logits[:, :100], targets, "mean", 100))


def test_the_masked_loss_allocates_no_more_than_the_sliced_one():
    """Evaluation (uncompiled, no grad) pays no extra copy of the logits for the mask: it masks the
    fp32 copy that the loss makes anyway (gpu-check on an H200: a masked copy of the 64 x 512 bf16
    logits raised evaluation's peak from 18.9 to 22.0 GiB)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mtgpt.model import cross_entropy

    class Allocated(TorchDispatchMode):  # bytes of every new tensor an op returns (not views, not in place)
        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.bytes += t.untyped_storage().nbytes()
            return out

    logits = torch.randn(256, 50304).to(torch.bfloat16)
    targets = torch.randint(0, 50257, (256,))
    found = {}
    for mask in (False, True):
        with torch.no_grad(), Allocated() as counted:
            loss = cross_entropy(logits, targets, "sum", 50257, mask)
        found[mask] = (counted.bytes, loss.item())
    (sliced, loss_sliced), (masked, loss_masked) = found[False], found[True]
    assert loss_masked == pytest.approx(loss_sliced, rel=1e-6)
    assert sliced > 256 * 50257 * 8  # the fp32 copy and its log-softmax are counted
    assert masked <= sliced * 1.01, (masked, sliced)  # a masked bf16 copy of the logits would be +25%


def test_the_fused_loss_is_the_loss_of_the_logits():
    """linear_cross_entropy (the loss straight from the hidden states, chunk by chunk, the logits
    never whole: what mtgpt train does on CPU) gives cross_entropy's loss and gradients: summed or
    averaged, chunks that do not divide the rows, targets -1 not scored, the padding rows never
    read and left with no gradient, in fp32 and under bf16 autocast (matmuls in bf16, loss in fp32)."""
    import torch.nn.functional as F

    from mtgpt.model import cross_entropy, linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(2, 150, 32, generator=g), torch.randn(1024, 32, generator=g) * 0.5
    t = torch.randint(0, 1000, (2, 150), generator=g)
    t[:, ::7] = -1
    for bf16 in (False, True):
        for reduction in ("sum", "mean"):
            found = []
            for fused in (False, True):
                x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    loss = (linear_cross_entropy(x, w, t, reduction, 1000, chunk=64) if fused else
                            cross_entropy(F.linear(x, w), t, reduction, 1000, mask=True))
                loss.backward()
                found.append((loss.detach(), x.grad, w.grad))
            (a, gxa, gwa), (b, gxb, gwb) = found
            tol = 2e-2 if bf16 else 1e-5  # of the largest gradient: bf16 rounds sums of chunks differently
            assert b.dtype == torch.float32 and b.item() == pytest.approx(a.item(), rel=1e-3 if bf16 else 1e-6)
            assert gxb.dtype == gwb.dtype == torch.float32
            assert (gxa - gxb).abs().max() <= tol * gxa.abs().max()
            assert (gwa - gwb).abs().max() <= tol * gwa.abs().max()
            assert gwb[1000:].abs().max() == 0
    with torch.no_grad():  # evaluation: no gradients made, the same loss
        assert linear_cross_entropy(x0, w0, t, "sum", 1000, chunk=64).item() == \
            pytest.approx(cross_entropy(x0 @ w0.T, t, "sum", 1000).item(), rel=1e-6)
    with pytest.raises(ValueError, match="sums or averages"):
        linear_cross_entropy(x0, w0, t, "none", 1000)


def test_a_model_with_the_fused_loss_trains_the_same_and_compiles_whole():
    model = tiny(vocab_size=1000, vocab_multiple=64)  # 24 padding rows
    idx = torch.randint(0, 1000, (4, 33), generator=torch.Generator().manual_seed(4))
    x, y = idx[:, :-1], idx[:, 1:].clone()
    y[0, :5] = -1
    found = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        model.fused_loss = fused
        logits, loss = model(x, y, reduction="sum")
        loss.backward()
        found.append((logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits, a, ga), (none, b, gb) = found
    assert logits.shape == (4, 32, 1000) and none is None  # fused: no logits made
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    for name in ga:
        assert (ga[name] - gb[name]).abs().max() <= 1e-5 * ga[name].abs().max(), name
    assert model(x)[0].shape == (4, 32, 1000) and model(x, y, reduction="none")[0] is not None  # sampling, eval
    explained = torch._dynamo.explain(model)(x, y, reduction="sum")
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_the_fused_loss_takes_less_memory():
    """The seed model's output layer for 1024 tokens, forward + backward, each way in a fresh process:
    its peak resident memory (Linux's high-water mark, reset just before). The logits (1024 x 50304
    fp32 = 206 MB) and their copies are never whole."""
    import subprocess
    import sys

    code = ("import re, torch, torch.nn.functional as F\n"
            "from mtgpt.model import cross_entropy, linear_cross_entropy\n"
            "def status(key): return int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read())[1]) * 1024\n"
            "torch.manual_seed(0); x = torch.randn(1024, 384, requires_grad=True)\n"
            "w = (torch.randn(50304, 384) * 0.02).requires_grad_(); t = torch.randint(0, 50257, (1024,))\n"
            "open('/proc/self/clear_refs', 'w').write('5'); before = status('VmRSS')\n"
            "loss = linear_cross_entropy(x, w, t, 'sum', 50257) if {fused} else "
            "cross_entropy(F.linear(x, w), t, 'sum', 50257)\n"
            "loss.backward(); print(status('VmHWM') - before, loss.item())")
    peak = {}
    for fused in (False, True):
        out = subprocess.run([sys.executable, "-c", code.format(fused=fused)], capture_output=True, text=True,
                             timeout=120, check=True).stdout.split()
        peak[fused] = int(out[0]), float(out[1])
    assert peak[True][1] == pytest.approx(peak[False][1], rel=1e-5)
    assert peak[False][0] > 2 * 206e6, peak  # the logits, their log-softmax, their gradient
    assert peak[True][0] < 0.6 * peak[False][0], peak  # a 640-row chunk of them, the weight's gradient


def test_training_fuses_the_loss_on_cpu_below_zero_3_and_not_in_fp16():
    from mtgpt.train import fused_loss

    assert fused_loss({"zero_optimization": {"stage": 1}}) and fused_loss({})
    assert not fused_loss({"zero_optimization": {"stage": 3}})  # its hooks gather lm_head's weight for lm_head only
    assert not fused_loss({"fp16": {"enabled": True}})  # gradients made in forward have no loss scale
    assert not fused_loss({"torch_autocast": {"enabled": True, "dtype": "torch.float16"}})
    assert fused_loss({"torch_autocast": {"enabled": True, "dtype": "torch.bfloat16"}})
