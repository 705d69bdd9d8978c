"""Generation without DeepSpeed: determinism, the KV cache, the sliding window, bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtgpt import checkpoint, tokenizer
from mtgpt.config import ModelConfig
from mtgpt.model import GPT
from mtgpt.sample import SampleConfig, SampleError, generate, on_host, pick, run_sample, stream, window_start
from tests.conftest import TINY, run_mtgpt

GPT2 = tokenizer.gpt2()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model saved the way training saves it."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "block_size": 16}))
    folder = tmp_path_factory.mktemp("model")
    weights = {k: v.detach() for k, v in model.named_parameters()}
    checkpoint.save_weights(weights, model.config, folder)
    return folder


def test_same_seed_same_text(model_dir):
    model = checkpoint.load_model(model_dir)
    cfg = lambda seed: SampleConfig(max_new_tokens=20, seed=seed, stop_at_eot=False)  # noqa: E731
    a = generate(model, GPT2, "Shall I compare thee", cfg(1))
    assert a == generate(model, GPT2, "Shall I compare thee", cfg(1))
    assert a != generate(model, GPT2, "Shall I compare thee", cfg(2))


def test_window_start():
    assert [window_start(n, 8, 2) for n in (1, 8, 9, 10, 11, 12)] == [0, 0, 2, 2, 4, 4]
    assert [window_start(n, 8, 1) for n in (9, 10)] == [1, 2]  # slide 1 = the seed's crop
    assert all(n - window_start(n, 8, 3) <= 8 for n in range(1, 50))


@pytest.mark.parametrize("slide", [1, 4])
def test_cache_matches_no_cache_past_block_size(model_dir, slide):
    """Greedy decoding for 40 tokens with a 16-token context: same tokens, logits within 1e-5."""
    model = checkpoint.load_model(model_dir)
    cfg = SampleConfig(max_new_tokens=40, temperature=0.0, stop_at_eot=False, slide=slide)
    prompt = GPT2.encode("From fairest creatures we desire increase")
    with_cache = list(stream(model, prompt, cfg, use_cache=True))
    without = list(stream(model, prompt, cfg, use_cache=False))
    assert [int(t) for t, _ in with_cache] == [int(t) for t, _ in without]
    for (_, a), (_, b) in zip(with_cache, without):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("slide", [1, 4])
@pytest.mark.parametrize("cfg", [dict(temperature=0.0), dict(temperature=0.8, top_k=200, seed=3),
                                 dict(temperature=1.0, top_k=None, top_p=0.9, seed=4, num_samples=2)])
def test_every_decoder_gives_the_same_tokens(model_dir, slide, cfg):
    """The fixed-shape decoder (what the CUDA graph replays) and the growing-shape one draw the same
    tokens from the same seed, past block_size (refills included), logits within 1e-5. The output
    embedding is scaled so that the next-token distributions are peaked, as a trained model's are:
    a random model's are near-uniform over 50,257 tokens, where a 1e-7 difference in the logits
    (another CPU's kernels) moves a top-p draw to the neighbouring token."""
    model = checkpoint.load_model(model_dir)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(25)  # (tied: the input embedding too)
    cfg = SampleConfig(max_new_tokens=40, stop_at_eot=False, slide=slide, **cfg)
    prompt = GPT2.encode("From fairest creatures we desire increase")
    runs = {d: list(stream(model, prompt, cfg, decoder=d)) for d in ("dynamic", "fixed")}
    runs["no cache"] = list(stream(model, prompt, cfg, use_cache=False))
    tokens = {d: [t.tolist() for t, _ in steps] for d, steps in runs.items()}
    assert tokens["fixed"] == tokens["dynamic"] == tokens["no cache"] and len(tokens["fixed"]) == 40
    for (_, a), (_, b) in zip(runs["fixed"], runs["dynamic"]):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(SampleError, match="needs a CUDA device"):
        next(stream(model, prompt, cfg, decoder="graph"))
    with pytest.raises(SampleError, match="decoder must be one of"):
        next(stream(model, prompt, cfg, decoder="fast"))


def test_on_host_copies_ahead_and_keeps_order(model_dir):
    model = checkpoint.load_model(model_dir)
    cfg = SampleConfig(max_new_tokens=23, seed=1, num_samples=2, stop_at_eot=False)
    steps = [t.tolist() for t, _ in stream(model, [1, 2, 3], cfg)]
    for ahead in (None, 1, 5, 40):
        assert list(on_host(stream(model, [1, 2, 3], cfg), ahead)) == steps
    computed = []
    device_steps = (computed.append(s) or s for s in stream(model, [1, 2, 3], cfg))
    for i, _ in enumerate(on_host(device_steps, 5)):  # a caller that stops at the 7th token
        if i == 6:
            break
    assert len(computed) == 10  # the device ran at most ahead - 1 steps past it


def test_gumbel_draws_follow_the_softmax():
    """pick draws by Gumbel-max: each token's share of 40,000 draws is its softmax probability
    (temperature 0.5 applied, top-k 3 of 4 renormalised) within 4 standard deviations."""
    logits = torch.tensor([[0.0, 0.3, -0.4, -3.0]]).expand(40_000, 4)
    g = torch.Generator().manual_seed(0)
    drawn = pick(logits, SampleConfig(temperature=0.5, top_k=3), g)
    want = torch.tensor([0.0, 0.3, -0.4]).div(0.5).softmax(-1)
    share = torch.bincount(drawn, minlength=4).double() / len(drawn)
    sd = (want * (1 - want) / len(drawn)).sqrt()
    assert share[3] == 0 and torch.all((share[:3] - want).abs() < 4 * sd), (share, want)


def test_top_k_one_is_greedy(model_dir):
    model = checkpoint.load_model(model_dir)
    greedy = generate(model, GPT2, "Thy", SampleConfig(max_new_tokens=10, temperature=0, stop_at_eot=False))
    top1 = generate(model, GPT2, "Thy", SampleConfig(max_new_tokens=10, top_k=1, seed=3, stop_at_eot=False))
    assert greedy == top1


def test_long_prompt_is_cropped_with_warning(model_dir):
    warnings, out = [], []
    prompt = "word " * 40  # 40 tokens > block size 16
    run_sample(str(model_dir), prompt, SampleConfig(max_new_tokens=5, seed=0), device="cpu",
               write=out.append, warn=warnings.append)
    assert "more than the context of 16" in warnings[0]
    assert "".join(out).startswith(prompt)


@pytest.mark.parametrize("kw, match", [
    ({"top_k": -1}, r"--top-k must be between 0 \(all tokens\) and 50257"),
    ({"top_k": 50258}, r"--top-k must be between 0 \(all tokens\) and 50257"),
    ({"temperature": -0.5}, "--temperature must be a number >= 0"),
    ({"temperature": float("nan")}, "--temperature must be a number >= 0"),
    ({"temperature": float("inf")}, "--temperature must be a number >= 0"),
    ({"top_p": 1.5}, "--top-p"),
    ({"top_p": float("nan")}, "--top-p"),
    ({"seed": 2**32}, r"--seed must be between 0 and 4294967295 \(2\*\*32 - 1"),
    ({"seed": -1}, r"--seed must be between 0 and 4294967295"),
])
def test_bad_options(kw, match):
    with pytest.raises(SampleError, match=match):
        SampleConfig(**kw).check(50257)


def test_folder_without_model(tmp_path):
    with pytest.raises(checkpoint.ModelFileError, match="has no model: .*model.safetensors is missing"):
        checkpoint.load_model(tmp_path)
    with pytest.raises(checkpoint.ModelFileError, match="no such folder"):
        checkpoint.load_model(tmp_path / "missing")


def test_weights_that_do_not_fit_their_config(model_dir, tmp_path):
    """A config.json edited (or copied) from another model: a clear error, not a half-loaded model."""
    (tmp_path / checkpoint.WEIGHTS).write_bytes((model_dir / checkpoint.WEIGHTS).read_bytes())
    config = json.loads((model_dir / checkpoint.MODEL_CONFIG).read_text())
    config["n_layer"] += 1
    (tmp_path / checkpoint.MODEL_CONFIG).write_text(json.dumps(config))
    with pytest.raises(checkpoint.ModelFileError, match=r"do not fit the model: missing \['transformer.h.2"):
        checkpoint.load_model(tmp_path)
    config["n_layer"] -= 1
    config["block_size"] += 8  # the same tensors, one of another shape
    (tmp_path / checkpoint.MODEL_CONFIG).write_text(json.dumps(config))
    with pytest.raises(checkpoint.ModelFileError, match=r"transformer.wpe.weight is \(16, 32\) there but \(24, 32\)"):
        checkpoint.load_model(tmp_path)
    proc = run_mtgpt("sample", tmp_path, "--max-new-tokens", "2", check=False)
    assert proc.returncode != 0 and "config.json edited" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("text", ["[]", '"x"', "null"])
def test_a_config_or_tokenizer_info_that_is_json_but_no_object(model_dir, tmp_path, text):
    """config.json or tokenizer_info.json holding valid JSON that is not an object was a TypeError
    or AttributeError traceback in sample, eval, export; now config.json is one line and
    tokenizer_info.json (notes about the tokenizer) is not needed."""
    (tmp_path / checkpoint.WEIGHTS).write_bytes((model_dir / checkpoint.WEIGHTS).read_bytes())
    (tmp_path / checkpoint.MODEL_CONFIG).write_text(text)
    with pytest.raises(checkpoint.ModelFileError, match=r"config.json: expected a JSON object of the model's "
                                                        r"settings, got (list|str|NoneType); restore"):
        checkpoint.load_model(tmp_path)
    own = tokenizer.train([(Path(__file__).parent / "data" / "sonnets.txt").read_text()], 300)
    own.save(tmp_path / "tok")
    (tmp_path / "tok" / tokenizer.INFO_JSON).write_text(text)
    assert tokenizer.load(tmp_path / "tok").vocab_size == 300


def test_pick_top_k_and_top_p():
    from mtgpt.sample import pick

    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(pick(logits, SampleConfig(top_k=2, temperature=1.0), g)) for _ in range(200)}
    assert draws == {1, 2}  # only the two most likely
    assert {int(pick(logits, SampleConfig(top_k=None, top_p=1e-9), g)) for _ in range(50)} == {1}  # = greedy
    # top-p 0.9 keeps 1, 2 and 4 (softmax: .64, .23, .09 -> the third crosses 0.9)
    draws = {int(pick(logits, SampleConfig(top_k=None, top_p=0.9, temperature=1.0), g)) for _ in range(500)}
    assert draws == {1, 2, 4}


def test_stop_text(model_dir):
    from mtgpt.sample import run_sample

    cfg = SampleConfig(max_new_tokens=40, seed=5, stop_at_eot=False)
    full = run_sample(str(model_dir), "a", cfg, device="cpu", write=lambda s: None)[0]
    stop = full[5:8]
    printed = []
    cut = run_sample(str(model_dir), "a", SampleConfig(max_new_tokens=40, seed=5, stop_at_eot=False, stops=[stop]),
                     device="cpu", write=printed.append)[0]
    assert cut == full.split(stop)[0] and stop not in "".join(printed)
    assert "".join(printed) == "a" + cut + "\n"


def test_inference_needs_no_deepspeed(model_dir):
    """`mtgpt sample` imports neither deepspeed nor torch.distributed's launcher machinery."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from mtgpt.cli import main; "
            f"r = CliRunner().invoke(main, ['sample', {str(model_dir)!r}, '--max-new-tokens', '3', '--device', 'cpu']); "
            "assert r.exit_code == 0, r.output; assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_tiny_temperature_is_greedy_and_top_k_zero_keeps_all():
    """A temperature of 1e-38 divides the logits into inf; the softmax must stay finite (greedy)."""
    from mtgpt.sample import pick

    torch.manual_seed(0)
    logits = torch.randn(3, 50257) * 5
    for temperature in (1e-38, 1e-30, 1e-6):
        cfg = SampleConfig(temperature=temperature, top_k=None)
        assert pick(logits, cfg, None).tolist() == logits.argmax(-1).tolist()
    cfg = SampleConfig(temperature=1.0, top_k=0)  # every token may be drawn
    cfg.check(50257)
    g = torch.Generator().manual_seed(0)
    drawn = {int(t) for _ in range(200) for t in pick(torch.zeros(1, 50257), cfg, g)}
    assert len(drawn) > 150 and max(drawn) > 200  # not only the 200 of the old default


def test_cli_temperature_nan_is_refused(model_dir):
    proc = run_mtgpt("sample", model_dir, "--temperature", "nan", "--max-new-tokens", "2", check=False)
    assert proc.returncode != 0 and "--temperature must be a number >= 0" in proc.stderr
    out = run_mtgpt("sample", model_dir, "--temperature", "1e-38", "--max-new-tokens", "4", "--seed", "1")
    greedy = run_mtgpt("sample", model_dir, "--temperature", "0", "--max-new-tokens", "4")
    assert out.stdout == greedy.stdout


def test_every_seed_in_the_range_is_its_own_text(model_dir):
    """PyTorch's CPU generator keeps 32 bits of a seed, so 2**63 - 1 and 2**64 - 1 drew one text:
    the seeds taken are 0..2**32 - 1, and one past it is a one-line error, not an overflow."""
    model = checkpoint.load_model(model_dir)
    texts = {seed: generate(model, GPT2, "Thy", SampleConfig(max_new_tokens=12, seed=seed, temperature=1.0,
                                                             top_k=None, stop_at_eot=False))[0]
             for seed in (0, 1, 2**31, 2**32 - 1)}
    assert len(set(texts.values())) == 4
    for seed in ("18446744073709551616", "4294967296", "-1"):
        proc = run_mtgpt("sample", model_dir, "--seed", seed, "--max-new-tokens", "2", check=False)
        assert proc.returncode == 1 and proc.stderr == \
            f"Error: --seed must be between 0 and 4294967295 (2**32 - 1: the seeds PyTorch's generator tells apart), got {seed}\n"


def test_stop_is_repeatable(model_dir):
    """--stop A --stop B stops at whichever comes first (it used to keep only the last); --help says so."""
    args = ["--prompt", "a", "--max-new-tokens", "40", "--seed", "5", "--temperature", "1.0"]
    full = run_mtgpt("sample", model_dir, *args).stdout[1:-1]
    early, late = full[4:7], full[20:23]
    assert early not in full[:4] and late not in full[:20] and early != late
    out = run_mtgpt("sample", model_dir, *args, "--stop", early, "--stop", late).stdout
    assert out == "a" + full.split(early)[0] + "\n"
    out = run_mtgpt("sample", model_dir, *args, "--stop", late, "--stop", early).stdout
    assert out == "a" + full.split(early)[0] + "\n"
    assert "repeat" in run_mtgpt("sample", "--help").stdout.split("--stop")[1].split("--")[0]


def test_the_readmes_python_example_runs(model_dir, capsys):
    """README, "From Python": the block as written, on a saved run."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### From Python\n\n```python\n", 1)[1].split("```", 1)[0]
    exec(block.replace('"runs/demo"', repr(str(model_dir))), {})
    out = capsys.readouterr().out.splitlines()
    model = checkpoint.load_model(model_dir)
    assert out[0] == f"{model.num_params():,} parameters" and len(out) >= 2


@pytest.mark.parametrize("num_samples", [1, 3])
def test_ctrl_c_keeps_the_text_so_far(model_dir, num_samples):
    """Ctrl-C during `mtgpt sample`: the text so far is on stdout (with --num-samples N, every
    sample as far as it got: they were written only when all were done, so all was lost), one
    line says it was interrupted, exit 130; not click's "Aborted!" with exit 1."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "mtgpt", "sample", str(model_dir), "--prompt", "thee " * 40,
                             "--num-samples", str(num_samples), "--max-new-tokens", "10000000", "--seed", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "warning: the prompt has" in proc.stderr.readline()  # (said before generating)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip() == "interrupted" and "Aborted" not in err, err
    if num_samples == 1:
        assert out.startswith("thee " * 40) and len(out) > 200 + 20
    else:
        samples = out.split("--- sample ")[1:]
        assert [s.split("\n")[0] for s in samples] == ["1", "2", "3"]
        assert all(len(s) > 200 + 20 and s[2:].startswith("thee " * 40) for s in samples), out
