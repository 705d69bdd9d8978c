"""checkpoint.py in process: which save a run continues from, pruning, and setting a left branch aside."""

from __future__ import annotations

from pathlib import Path

from mtgpt import checkpoint
from mtgpt.config import ModelConfig
from mtgpt.model import GPT
from tests.conftest import SONNETS, TINY


def _save(run: Path, step: int, complete: bool = True, keep_last: int = 10) -> None:
    (run / checkpoint.CKPT_DIR / checkpoint.tag_for(step)).mkdir(parents=True, exist_ok=True)
    if complete:
        checkpoint.mark_complete(run, checkpoint.tag_for(step), {"step": step}, keep_last=keep_last)


def test_auto_follows_latest_not_the_highest_step(tmp_path):
    for step in (5, 10, 20):
        _save(tmp_path, step)
    assert checkpoint.latest_complete(tmp_path).name == "step_00000020"
    checkpoint.point_latest(tmp_path, "step_00000010")
    assert checkpoint.latest_complete(tmp_path).name == "step_00000010"
    checkpoint.point_latest(tmp_path, "step_00000030")  # names no complete save: the newest complete one
    assert checkpoint.latest_complete(tmp_path).name == "step_00000020"
    (tmp_path / checkpoint.CKPT_DIR / "latest").unlink()
    assert checkpoint.latest_complete(tmp_path).name == "step_00000020"
    assert checkpoint.latest_complete(tmp_path / "none") is None


def test_prune_keeps_the_last_and_torn_newer(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=2)
    _save(tmp_path, 4, complete=False)  # a save in progress is not pruned
    assert checkpoint.complete_tags(tmp_path) == ["step_00000002", "step_00000003"]
    assert (tmp_path / checkpoint.CKPT_DIR / "step_00000004").is_dir()
    assert (tmp_path / checkpoint.CKPT_DIR / "latest").read_text() == "step_00000003"


def test_set_aside_after(tmp_path):
    model = GPT(ModelConfig(**TINY))
    weights = dict(model.named_parameters())
    for step in (5, 10, 15, 20):
        _save(tmp_path, step)
    _save(tmp_path, 25, complete=False)
    (tmp_path / checkpoint.CKPT_DIR / "universal" / "step_00000020").mkdir(parents=True)
    checkpoint.save_weights(weights, model.config, tmp_path / "best", {"step": "20"})
    assert checkpoint.saves_after(tmp_path, 10) == ["step_00000015", "step_00000020", "step_00000025"]
    moved, aside = checkpoint.set_aside_after(tmp_path, 10)
    assert moved == ["step_00000015", "step_00000020"]
    assert sorted(p.name for p in aside.iterdir()) == ["best", "step_00000015", "step_00000020"]
    assert (aside / "step_00000020" / checkpoint.COMPLETE).is_file()  # kept whole, only moved
    assert checkpoint.complete_tags(tmp_path) == ["step_00000005", "step_00000010"]
    assert not (tmp_path / checkpoint.CKPT_DIR / "step_00000025").exists()  # torn: deleted
    assert not (tmp_path / checkpoint.CKPT_DIR / "universal" / "step_00000020").exists()
    assert checkpoint.set_aside_after(tmp_path, 10) == ([], None)  # nothing left to move


def test_best_from_before_the_resume_stays(tmp_path):
    model = GPT(ModelConfig(**TINY))
    checkpoint.save_weights(dict(model.named_parameters()), model.config, tmp_path / "best", {"step": "8"})
    assert checkpoint.weights_step(tmp_path / "best") == 8
    assert checkpoint.set_aside_after(tmp_path, 10) == ([], None)
    assert (tmp_path / "best" / checkpoint.WEIGHTS).is_file()
    assert checkpoint.weights_step(tmp_path / "missing") is None


def test_needs_universal(tmp_path):
    """Only optimizer state sharded over another number of ranks needs DeepSpeed's universal form."""
    tag = tmp_path / checkpoint.CKPT_DIR / "step_00000005"
    tag.mkdir(parents=True)
    checkpoint.mark_complete(tmp_path, tag.name, {"step": 5, "world_size": 2}, keep_last=2)
    assert not checkpoint.needs_universal(tag, 1)  # ZeRO-0 fp32: one optimizer file loads anywhere
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert checkpoint.needs_universal(tag, 1) and checkpoint.needs_universal(tag, 4)
    assert not checkpoint.needs_universal(tag, 2)  # the same world size


def test_saved_weights_have_exactly_the_vocabulary_and_load_padded_or_not(tmp_path):
    """model.safetensors holds vocab_size embedding rows whatever the padding; it loads into a
    padded model (as a GPU run builds it) and into an unpadded one (a run saved before the
    padding existed) with the same logits."""
    import json

    import torch
    from safetensors.torch import load_file

    torch.manual_seed(0)
    padded = GPT(ModelConfig(**TINY, vocab_multiple=64))
    checkpoint.save_weights(dict(padded.named_parameters()), padded.config, tmp_path / "m")
    assert load_file(str(tmp_path / "m" / "model.safetensors"))["transformer.wte.weight"].shape[0] == 50257
    idx = torch.randint(0, 50257, (1, 12))
    expected, _ = padded(idx)
    loaded = checkpoint.load_model(tmp_path / "m")
    assert loaded.transformer.wte.weight.shape[0] == 50304 and torch.equal(loaded(idx)[0], expected)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["vocab_multiple"]  # as written before the padding existed
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    old = checkpoint.load_model(tmp_path / "m")
    assert old.transformer.wte.weight.shape[0] == 50257 and torch.equal(old(idx)[0], expected)


def test_a_damaged_weights_file_is_one_line_that_says_what_to_do(tmp_path):
    """model.safetensors cut short (a full disk, a cut copy) or empty: every command that reads it
    says so in one line with a fix, never safetensors' traceback; --init-from refuses it before
    any process starts, and a damaged Hugging Face export says to export it again."""
    import pytest
    from click.testing import CliRunner

    from mtgpt import hf
    from mtgpt.cli import main
    from tests.conftest import SONNETS

    model = GPT(ModelConfig(**TINY))
    weights = {k: v.detach() for k, v in model.named_parameters()}
    checkpoint.save_weights(weights, model.config, tmp_path / "run")
    hf.export(weights, model.config, tmp_path / "hf")
    for size in (1000, 0):
        for folder in (tmp_path / "run", tmp_path / "hf"):
            with (folder / checkpoint.WEIGHTS).open("r+b") as f:
                f.truncate(size)
        with pytest.raises(checkpoint.ModelFileError, match="run/model.safetensors is damaged .*; restore it"):
            checkpoint.load_model(tmp_path / "run")
        with pytest.raises(checkpoint.ModelFileError, match="is damaged"):
            checkpoint.source_config(str(tmp_path / "run"), None)
        with pytest.raises(hf.HFError, match=r"hf/model.safetensors is damaged .*; export it again \(`mtgpt export"):
            checkpoint.source_config(None, str(tmp_path / "hf"))
        for args in (["sample", tmp_path / "run", "--prompt", "hi"], ["eval", tmp_path / "run", SONNETS],
                     ["export", tmp_path / "run", "--hf", tmp_path / "out"], ["serve", tmp_path / "run"]):
            result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert result.exit_code == 1 and len(lines) == 1, result.output
            assert lines[0].startswith(f"Error: {tmp_path / 'run' / 'model.safetensors'} is damaged ("), lines[0]
    assert checkpoint.weights_step(tmp_path / "run") is None


def test_load_tokenizer_of_other_folders_and_load_model_on_a_missing_gpu(tiny_data, tmp_path):
    """The Python API: the tokenizer of a data, tokenizer or Hugging Face folder is its own (each was
    called damaged: "records tokenizer gpt2 but holds ..."); a checkpoint folder is named as one;
    device="cuda" without a GPU is one ValueError (torch's own was a bare AssertionError)."""
    import pytest
    import torch

    from mtgpt import tokenizer

    assert checkpoint.load_tokenizer(tiny_data).identity() == tokenizer.gpt2().identity()
    own = tokenizer.train([SONNETS.read_text()], 300)
    own.save(tmp_path / "tok")
    assert checkpoint.load_tokenizer(tmp_path / "tok").identity() == own.identity()
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    with pytest.raises(checkpoint.ModelFileError, match="is a checkpoint inside the run"):
        checkpoint.load_tokenizer(run / "checkpoints" / "step_00000002")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': no CUDA GPU is visible"):
            checkpoint.load_model(run, device="cuda")
