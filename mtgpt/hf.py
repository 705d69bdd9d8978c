"""Hugging Face GPT-2 folders: export a run (`mtgpt export RUN --hf OUT`) and import one
(`mtgpt train --init-from-hf DIR`).

mtgpt's parameter names are GPT-2's, so the mapping is one to one; the only change is that HF's
GPT-2 keeps its attention and MLP weights in `Conv1D` layers, stored transposed (in, out) where
nn.Linear stores (out, in). The exported folder is a `GPT2LMHeadModel` written by transformers'
own save_pretrained (config.json, model.safetensors) plus the run's tokenizer as tokenizer.json
(GPT-2's built from the vocabulary files mtgpt ships; an own one as mtgpt.tokenizer writes it), so
`AutoTokenizer` gives mtgpt's ids. Weights are read only from safetensors or with
`torch.load(weights_only=True)`: a pickle that would run code is refused.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch

from mtgpt import folders, tokenizer
from mtgpt.config import ModelConfig
from mtgpt.model import unpadded

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class HFError(ValueError):
    """A folder that is not a GPT-2 mtgpt can use; the message says why."""


def _transpose_conv1d(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.t().contiguous() if k.endswith(CONV1D) else v) for k, v in weights.items()}


def gpt2_config(config: ModelConfig):
    from transformers import GPT2Config

    eot = config.vocab_size - 1  # <|endoftext|> is the last id of every mtgpt tokenizer
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, n_inner=None,
                      activation_function="gelu_new", resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                      attn_pdrop=config.dropout, layer_norm_epsilon=1e-5, bos_token_id=eot,
                      eos_token_id=eot, tie_word_embeddings=True)


def hf_tokenizer(tok: tokenizer.Tokenizer | None = None, model_max_length: int | None = None):
    """transformers' fast tokenizer for `tok` (GPT-2's when None), that truncates to
    `model_max_length` (the model's context) when asked to. GPT-2's is GPT2TokenizerFast built from
    mtgpt's vocabulary files (GPT2TokenizerFast(vocab_file=..., merges_file=...) builds an empty
    tokenizer in some transformers versions, so the `tokenizers` BPE model is assembled directly);
    an own one is PreTrainedTokenizerFast over `tokenizer.hf_tokenizer(tok)`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    eot = tokenizer.EOT_TEXT
    if tok is not None and not tok.is_gpt2:
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf_tokenizer(tok), bos_token=eot, eos_token=eot,
                                       unk_token=eot, model_max_length=model_max_length)
        if len(fast) != tok.vocab_size:
            raise RuntimeError(f"the Hugging Face tokenizer has {len(fast)} tokens, not {tok.vocab_size}")
        return fast

    vocab = json.loads(tokenizer.ENCODER_JSON.read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in tokenizer.VOCAB_BPE.read_text(encoding="utf-8").split("\n")[1:] if line]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex, then bytes
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=eot, eos_token=eot, unk_token=eot,
                             model_max_length=model_max_length)
    if len(fast) != tokenizer.GPT2_VOCAB_SIZE:
        raise RuntimeError(f"the Hugging Face tokenizer has {len(fast)} tokens, not {tokenizer.GPT2_VOCAB_SIZE}")
    return fast


def export(weights: dict[str, torch.Tensor], config: ModelConfig, out: str | Path,
           tok: tokenizer.Tokenizer | None = None, overwrite: bool = False) -> Path:
    """Write a GPT2LMHeadModel folder from mtgpt weights (names as GPT.named_parameters()) and
    `tok` (GPT-2's when None), whole (mtgpt.folders): a non-empty `out` is refused, or with
    overwrite replaced once the new folder is complete."""
    out = folders.check_out(out, overwrite, "--hf", HFError, writes=("hf",))
    tok = tok or tokenizer.gpt2()
    if tok.vocab_size != config.vocab_size:
        raise HFError(f"the tokenizer has {tok.vocab_size} tokens but the model {config.vocab_size}")
    from transformers import GPT2LMHeadModel

    if not config.bias:
        raise HFError("Hugging Face's GPT-2 has biases everywhere; a model trained with bias=False cannot be exported")
    model = GPT2LMHeadModel(gpt2_config(config))
    missing, unexpected = model.load_state_dict(_transpose_conv1d(unpadded(weights, config)), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise HFError(f"weights do not map onto GPT-2: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = folders.temporary(out)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar: one shard, written in a moment
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "model.safetensors").chmod(folders.FILE_MODE)  # (transformers writes it 0600, the others as the umask says)
        hf_tokenizer(tok, model_max_length=config.block_size).save_pretrained(tmp)
        _loadable_by_transformers_4(tmp / "tokenizer_config.json")
        folders.replace_folder(tmp, out, overwrite, HFError, "--hf")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # (a full disk: safetensors' own error)
            raise HFError(f"export to {out} failed: {e}; nothing was written (if the disk is full, free some space "
                          "or choose another --hf)") from None
        raise
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return out


def _loadable_by_transformers_4(path: Path) -> None:
    """transformers 5 saves a PreTrainedTokenizerFast as "tokenizer_class": "TokenizersBackend", a
    class transformers 4 (which setup.py allows) does not have: its AutoTokenizer then refuses the
    folder. PreTrainedTokenizerFast is that class's name in both."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        path.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2,
                                   ensure_ascii=False) + "\n", encoding="utf-8")


def _damaged(path: Path, reason: str) -> HFError:
    return HFError(f"{path} is damaged ({reason}); export it again (`mtgpt export RUN --hf {path.parent}`) or "
                   "download it again")


def open_safetensors(path: Path, damaged=None):
    """safetensors' safe_open of `path` (the header read and checked against the file's size); a
    file that is not whole (cut short by a full disk or a copy, empty) raises damaged(reason)
    (default: an HFError that says to export or download it again)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), "pt")
    except SafetensorError as e:
        reason = f"{path.stat().st_size:,} bytes; {str(e).replace('Error while deserializing ', '')}"
        raise (damaged or (lambda r: _damaged(path, r)))(reason) from None


def read_safetensors(path: Path, damaged=None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (no code runs on load); a damaged one as open_safetensors."""
    with open_safetensors(path, damaged) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # (torch's text suggests weights_only=False, which mtgpt never does)
            why = next((line.strip().rstrip(".") for line in str(e).splitlines()
                        if "Unpickler error" in line or "unsupported GLOBAL" in line), "")
            raise HFError(f"{folder / 'pytorch_model.bin'} is a pickle that is not plain weights (it could run "
                          "code when loaded), so it was not loaded" + (f" ({why})" if why else "")
                          + "; use the model's model.safetensors instead") from None
    raise HFError(f"{folder}: no model.safetensors or pytorch_model.bin")


def read_config(folder: str | Path) -> ModelConfig:
    """The mtgpt ModelConfig of a GPT-2-shaped Hugging Face folder (refuses other shapes)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():  # (one that does not parse made the folder look like an mtgpt model's)
        try:
            json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except ValueError as e:
            raise HFError(f"{folder / 'config.json'}: not valid JSON ({e}); export or download the folder again") \
                from None
    kind = folders.kind(folder)
    if kind in ("run", "model", "checkpoint"):
        run = folders.run_holding(folder) or folder
        raise HFError(f"{folder} is {folders.what(folder)}, not a Hugging Face model folder; start from it with --init-from {run}")
    try:
        hf = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise HFError(f"{folder}: no config.json; give a Hugging Face model folder") from None
    if hf.get("model_type") != "gpt2":
        raise HFError(f"{folder} holds a {hf.get('model_type')!r} model; mtgpt imports GPT-2 models only")
    checks = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
              "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
              "add_cross_attention": False}
    for key, want in checks.items():
        if hf.get(key, want) != want:
            raise HFError(f"{folder}: {key} = {hf[key]!r}; mtgpt's GPT computes {key} = {want!r}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise HFError(f"{folder}: n_inner = {hf['n_inner']}; mtgpt's MLP is 4 x n_embd wide")
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0)


def check(folder: str | Path) -> ModelConfig:
    """read_config, and refuse an output layer that is not the token embedding (mtgpt's GPT ties
    them): `tie_word_embeddings: false` with no lm_head of the same values, or an lm_head.weight
    that differs. Reads only those two tensors from a model.safetensors."""
    folder = Path(folder)
    config = read_config(folder)
    path = folder / "model.safetensors"
    if path.is_file():
        with open_safetensors(path) as f:
            keys = set(f.keys())
            head = f.get_tensor("lm_head.weight") if "lm_head.weight" in keys else None
            wte = next((f.get_tensor(k) for k in ("transformer.wte.weight", "wte.weight") if k in keys), None)
    else:
        weights = _read_weights(folder)
        head, wte = weights.get("lm_head.weight"), weights.get("transformer.wte.weight", weights.get("wte.weight"))
    tied = json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", True) is not False
    if (head is not None and wte is not None and not torch.equal(head, wte)) or (head is None and not tied):
        raise HFError(f"{folder}: its output layer (lm_head) is not the token embedding (tie_word_embeddings "
                      "false, or different lm_head weights); mtgpt's GPT ties them, so it cannot represent "
                      "this model")
    return config


def load(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, mtgpt weights) from a GPT-2-shaped Hugging Face folder (see `check`)."""
    folder = Path(folder)
    config = check(folder)
    weights = {k: v for k, v in _read_weights(folder).items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    weights = {("transformer." + k if not k.startswith(("transformer.", "lm_head")) else k): v for k, v in weights.items()}
    weights.pop("lm_head.weight", None)  # the same values as transformer.wte.weight (checked)
    return config, _transpose_conv1d(weights)
