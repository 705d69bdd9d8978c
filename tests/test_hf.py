"""Hugging Face export and import: the same logits, the same token ids, a lossless round trip,
and no pickle that runs code."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtgpt import checkpoint, hf, tokenizer
from mtgpt.config import ModelConfig
from mtgpt.model import GPT
from tests.conftest import SONNETS, TINY, run_mtgpt

GPT2 = tokenizer.gpt2()

MIXED = ("Shall I compare thee to a summer's day? Café naïve 🎉 中文字符 — tabs\tand  spaces\n\n"
         "numbers 1234567 and they'll've it's; CAPS and snake_case() {code: [1, 2]}  ")


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory) -> Path:
    """A tiny model that has learned the sonnets a little (plain PyTorch, in-process), saved the
    way `mtgpt train` saves its consolidated weights."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    model.fused_loss = True  # as `mtgpt train` trains on a CPU: the same loss, ~40% less time a step
    ids = torch.tensor(GPT2.encode(SONNETS.read_text())[:33 * 90]).view(90, 33)  # all of it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(50):
        batch = ids[step % 3::3]  # a third at a time: fast, and it learns the whole text
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("run")
    checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, folder)
    return folder


@pytest.fixture(scope="module")
def exported(trained_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    done = run_mtgpt("export", trained_folder, "--hf", out, env={"HF_HUB_OFFLINE": "1"})
    assert done.stderr == "" and done.stdout.startswith(f"{out}: GPT2LMHeadModel")  # no transformers bar
    return out


def test_same_logits(trained_folder, exported):
    from transformers import AutoModelForCausalLM

    ours = checkpoint.load_model(trained_folder)
    theirs = AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.randint(0, 50257, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, _ = ours(ids)
        b = theirs(ids).logits
    assert (a - b).abs().max().item() < 1e-4


def test_same_token_ids(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    assert len(tok) == 50257  # some transformers versions silently build an empty GPT-2 tokenizer
    assert tok(MIXED)["input_ids"] == GPT2.encode(MIXED)
    assert tok.decode(GPT2.encode(MIXED)) == MIXED
    assert tok.eos_token_id == GPT2.eot


def test_tokenizer_truncates_to_the_context(exported):
    """A long input with truncation=True fits the exported model (whose context is 32 tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.model_max_length == TINY["block_size"]
    batch = tok(SONNETS.read_text()[:5000], truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape == (1, TINY["block_size"])
    with torch.no_grad():
        assert AutoModelForCausalLM.from_pretrained(exported)(**batch).logits.shape == (1, 32, 50257)


def test_export_import_export_is_identical(exported, tmp_path):
    config, weights = hf.load(exported)
    assert config.shape() == ModelConfig(**TINY).shape()
    model = GPT(config)
    model.load_state_dict(weights, strict=False)
    again = hf.export(dict(model.named_parameters()), config, tmp_path / "again")
    a, b = load_file(exported / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {p.name: p.stat().st_mode & 0o777 for p in again.iterdir()}["model.safetensors"] == 0o644  # (was 0600)


@pytest.mark.slow
def test_train_from_hf_and_from_run(exported, trained_folder, tiny_data, tmp_path):
    """--init-from-hf and --init-from start from those weights: the first loss is the trained
    model's (well below ln 50257 = 10.8), and the model shape comes from the source."""
    for flag, source in (("--init-from-hf", exported), ("--init-from", trained_folder)):
        run = tmp_path / flag.strip("-")
        run_mtgpt("train", "--data", tiny_data, "--out", run, "--nproc", "2", flag, source, "--micro-batch", "2",
                  "--max-steps", "2", "--log-every", "1", "--eval-samples", "4", "--lr", "1e-4")
        first = [line for line in (run / "metrics.jsonl").read_text().splitlines()][0]
        assert __import__("json").loads(first)["train/loss"] < 8.0
    proc = run_mtgpt("train", "--data", tiny_data, "--out", tmp_path / "bad", "--init-from", trained_folder,
                     "--n-layer", "3", check=False)
    assert proc.returncode != 0 and "--n-layer 3 differs from the model you start from" in proc.stderr


def test_pickle_that_runs_code_is_refused(exported, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((exported / "config.json").read_text())
    torch.save({"transformer.wte.weight": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(hf.HFError, match=r"not plain weights .* so it was not loaded \(.*GLOBAL posix.system.*\); "
                                         r"use the model's model.safetensors instead$") as e:
        hf.load(folder)
    assert not marker.exists() and "weights_only" not in str(e.value)  # (torch's advice to load it anyway)


def test_not_a_gpt2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(hf.HFError, match="GPT-2 models only"):
        hf.read_config(tmp_path)
    with pytest.raises(hf.HFError, match="no config.json"):
        hf.read_config(tmp_path / "nothing")


def _hf_gpt2(folder: Path, **config) -> Path:
    """A GPT-2 folder written by transformers itself, with some setting mtgpt's GPT does not have."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = hf.gpt2_config(ModelConfig(**TINY))
    for key, value in config.items():
        setattr(cfg, key, value)
    GPT2LMHeadModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("setting, match", [({"tie_word_embeddings": False}, "lm_head.*not the token embedding"),
                                             ({"scale_attn_weights": False}, "scale_attn_weights = False")])
def test_what_mtgpt_cannot_represent_is_refused(tiny_data, tmp_path, setting, match):
    folder = _hf_gpt2(tmp_path / "hf", **setting)
    with pytest.raises(hf.HFError, match=match):
        hf.load(folder)
    proc = run_mtgpt("train", "--data", tiny_data, "--out", tmp_path / "run", "--init-from-hf", folder, check=False)
    assert proc.returncode != 0 and f"cannot start from --init-from-hf {folder}" in proc.stderr
    assert re.search(match, proc.stderr) and "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_untied_head_in_the_weights_is_refused(exported, tmp_path):
    """A config that says tied, with an lm_head.weight of its own in the file."""
    from safetensors.torch import save_file

    folder = tmp_path / "untied"
    folder.mkdir()
    (folder / "config.json").write_text((exported / "config.json").read_text())
    weights = load_file(exported / "model.safetensors")
    weights["lm_head.weight"] = weights["transformer.wte.weight"] + 1
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(hf.HFError, match="not the token embedding"):
        hf.load(folder)
    weights["lm_head.weight"] = weights["transformer.wte.weight"].clone()  # equal: the same model
    save_file(weights, folder / "model.safetensors")
    assert hf.load(folder)[0].n_embd == TINY["n_embd"]


def test_init_from_with_data_of_another_block_size(trained_folder, tmp_path):
    """One answer whichever way it is asked: the context cannot change on --init-from, so the
    data must be prepared with the model's block size (32)."""
    data = tmp_path / "data16"
    run_mtgpt("prepare", SONNETS, "--out", data, "--block-size", "16", "--val-fraction", "0.1")
    for extra in ([], ["--block-size", "16"]):
        proc = run_mtgpt("train", "--data", data, "--out", tmp_path / "run", "--init-from", trained_folder, *extra,
                         check=False)
        assert proc.returncode != 0 and "--block-size 32" in proc.stderr, proc.stderr
        assert "cannot change" in proc.stderr and "pass --block-size 16" not in proc.stderr


def test_a_padded_model_exports_exactly_the_vocabulary(tmp_path):
    """A model whose embedding is padded (as on a GPU) exports 50257 rows and the same logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, vocab_multiple=64)).eval()
    hf.export(dict(model.named_parameters()), model.config, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.vocab_size == 50257 and theirs.transformer.wte.weight.shape[0] == 50257
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids)[0] - theirs(ids).logits).abs().max().item() < 1e-4


def test_an_hf_folder_where_a_run_is_expected_and_a_run_for_init_from_hf(exported, trained_folder, tiny_data,
                                                                        tmp_path):
    """What `mtgpt export --hf` writes, given where a run is expected, is named as a Hugging Face
    folder with the two ways on (not a dump of config keys mtgpt does not know); `info`
    describes it; a run given to --init-from-hf says to use --init-from."""
    from click.testing import CliRunner

    from mtgpt import folders
    from mtgpt.cli import main

    def error_line(*args):
        result = CliRunner().invoke(main, [str(a) for a in args], input="/quit\n", catch_exceptions=False)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
        return lines[0]

    assert folders.kind(exported) == "hf" and folders.kind(trained_folder) == "model"
    says = (f"{exported} is a Hugging Face model folder (what `mtgpt export --hf` writes); give the run it was "
            f"exported from, or train from it with --init-from-hf {exported}")
    for args in (["sample", exported, "--prompt", "hi"], ["eval", exported, SONNETS], ["chat", exported],
                 ["serve", exported], ["export", exported, "--hf", tmp_path / "again"],
                 ["train", "--data", tiny_data, "--out", tmp_path / "ft", "--init-from", exported, "--nproc", "1"]):
        line = error_line(*args)
        assert says in line and "unknown key" not in line, line
    line = error_line("train", "--data", tiny_data, "--out", tmp_path / "ft", "--init-from-hf", trained_folder,
                      "--nproc", "1")
    assert (f"{trained_folder} is a model folder (model.safetensors, config.json), not a Hugging Face model folder; start from "
            f"it with --init-from {trained_folder}") in line, line
    assert not (tmp_path / "ft").exists()
    result = CliRunner().invoke(main, ["info", str(exported)], catch_exceptions=False)
    assert result.exit_code == 0 and result.output.startswith(f"Hugging Face model folder {exported}"), result.output
    assert "model: 2 layers, 2 heads, 32 wide, context 32" in result.output


def test_info_of_hugging_face_folders_says_what_init_from_hf_would(exported, tmp_path):
    """`mtgpt info HF_DIR` made the checks --init-from-hf makes: an untied model was "trains from
    it" with a parameter count without its lm_head, a relu one "trains from it" then "cannot";
    its dropout was 0.0 whatever config.json said, and its tokenizer was not named."""
    from mtgpt.info import describe_hf

    untied = _hf_gpt2(tmp_path / "untied", tie_word_embeddings=False)
    relu = _hf_gpt2(tmp_path / "relu", activation_function="relu")
    for folder, why in ((untied, "lm_head"), (relu, "activation_function = 'relu'")):
        lines = describe_hf(folder)
        assert len(lines) == 1 and lines[0].startswith(f"Hugging Face model folder {folder}; mtgpt cannot start "
                                                       "from it:") and why in lines[0], lines
    dropped = _hf_gpt2(tmp_path / "dropout", resid_pdrop=0.1)
    lines = describe_hf(dropped)
    assert lines[0] == f"Hugging Face model folder {dropped}, GPT-2-shaped: mtgpt trains from it with --init-from-hf {dropped}"
    assert "dropout 0.1" in lines[1] and lines[-1].startswith("tokenizer: gpt2") and "no tokenizer.json" in lines[-1]
    assert describe_hf(exported)[-1] == f"tokenizer: {tokenizer.describe(tokenizer.gpt2().identity())}"


def test_a_hugging_face_folder_without_its_tokenizer_or_with_a_damaged_config(tmp_path, tiny_data):
    """No tokenizer.json and a vocabulary that is not GPT-2's: said (it was taken as GPT-2's, and the
    fix offered, prepare --tokenizer FOLDER, then failed); a config.json that does not parse is said
    as that (the folder was called an mtgpt model folder, to start with --init-from)."""
    small = _hf_gpt2(tmp_path / "small", vocab_size=512)
    with pytest.raises(hf.HFError, match=r"has no tokenizer.json, and its vocabulary of 512 tokens is not GPT-2's "
                                         r"\(50,257\): copy in the tokenizer.json"):
        checkpoint.source_tokenizer(None, str(small))
    (small / "config.json").write_text((small / "config.json").read_text()[:-10])
    with pytest.raises(hf.HFError, match=r"config.json: not valid JSON .*; export or download the folder again"):
        hf.read_config(small)
