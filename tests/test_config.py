import json

import pytest

from mtgpt.config import LAUNCHER_RANKS, ConfigError, ModelConfig, TrainConfig, dump_json, load_json, parse_duration


def test_roundtrip(tmp_path):
    cfg = TrainConfig(data="d", out="o", model=ModelConfig(n_layer=2), micro_batch=3, max_time="2h")
    dump_json(cfg.to_dict(), tmp_path / "c.json")
    again = TrainConfig.from_dict(load_json(tmp_path / "c.json"))
    assert again == cfg and again.model.n_layer == 2


@pytest.mark.parametrize("bad, match", [
    ({"micro_batch": 0}, "micro_batch must be a positive integer"),
    ({"lr": -1.0}, "lr must be positive"),
    # inf and nan passed a comparison (--lr inf trained to an inf val loss and recorded "lr": Infinity,
    # --max-epochs inf was a traceback, --min-delta nan stopped early while the val loss improved)
    ({"lr": float("inf")}, "lr must be a finite number, got inf"),
    ({"max_epochs": float("inf")}, "max_epochs must be a finite number"),
    ({"min_delta": float("nan")}, "min_delta must be a finite number, got nan"),
    ({"min_lr_ratio": float("nan")}, "min_lr_ratio must be a finite number"),
    ({"max_time": "soon"}, "not a duration"),
    ({"max_time": "nan"}, "max_time must be a positive, finite duration"),
    ({"max_time": "infh"}, "max_time must be a positive, finite duration"),
    ({"max_time": "0"}, "max_time must be a positive, finite duration"),
    ({"max_time": "1:99"}, "not a duration"),  # (was 159 s)
    ({"max_time": "1:60:00"}, "not a duration"),
    ({"patience": 0}, "patience"),
    ({"seed": -1}, "seed must be between 0 and 4294967295 .*, got -1"),  # (was a traceback in every rank)
    ({"seed": 2**32}, "seed must be between 0 and 4294967295"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
    ({"warmup_steps": 0}, "warmup_steps must be >= 1"),
    ({"min_delta": 0.1}, "--min-delta is early stopping's and needs --patience N"),  # (it did nothing, silently)
    ({"learning_rate": 1e-3}, "unknown key.*learning_rate"),
    ({"model": {"n_head": 5, "n_embd": 64}}, "does not divide"),
])
def test_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({"data": "d", "out": "o", **bad})


@pytest.mark.parametrize("bad, match", [
    # a --config file's wrong JSON types: tracebacks in every rank, or taken as true ("compile": "false"
    # compiled; "bias": "no" trained biases) and recorded so in the run's train_config.json
    ({"lr": "1e-3"}, 'lr must be a number, got "1e-3"; write it without the quotes'),
    ({"max_steps": "3"}, 'max_steps must be a whole number, or null, got "3"; write it without the quotes'),
    ({"max_steps": 3.5}, "max_steps must be a whole number, or null, got 3.5"),
    ({"compile": "false"}, 'compile must be true or false, or null, got "false"; write it without the quotes'),
    ({"tf32": 1}, "tf32 must be true or false, got 1"),
    ({"seed": True}, "seed must be a whole number, got true"),
    ({"lr": None}, "lr must be a number, got null"),
    ({"data": 5}, "data must be a list of strings, got 5"),
    ({"data": ["d", 7]}, r'data must be a list of strings, got \["d", 7\]'),
    ({"model": [1]}, r"model must be an object, got \[1\]"),
    ({"model": {"bias": "no"}}, 'model config: bias must be true or false, got "no"$'),
    ({"model": {"n_layer": "2"}}, 'n_layer must be a whole number, got "2"; write it without the quotes'),
])
def test_wrong_json_types_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({"data": "d", "out": "o", **bad})


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200),
                                           ("1d", 86400), ("1:30:00", 5400), ("05:00", 300)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_load_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_json(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_json(tmp_path / "list.json")
    # a key twice (at any depth) took the last silently: ZeRO stage 1 then 3 trained at stage 3
    (tmp_path / "dup.json").write_text('{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 3}}')
    with pytest.raises(ConfigError, match=r"dup.json: the key 'zero_optimization' is given twice in one object"):
        load_json(tmp_path / "dup.json")
    (tmp_path / "dup2.json").write_text('{"optimizer": {"params": {"lr": 1, "lr": 2}}}')
    with pytest.raises(ConfigError, match="the key 'lr' is given twice"):
        load_json(tmp_path / "dup2.json")
    (tmp_path / "comment.json").write_text('{"a": 1, // no\n}')
    with pytest.raises(ConfigError, match="not valid JSON .*mtgpt reads strict JSON"):
        load_json(tmp_path / "comment.json")
    with pytest.raises(ConfigError, match="is a folder, not a JSON file"):
        load_json(tmp_path)
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"a": 1}')  # (Windows editors write a byte-order mark)
    assert load_json(tmp_path / "bom.json") == {"a": 1}
    (tmp_path / "wide.json").write_bytes('{"a": 1}'.encode("utf-16"))  # was a UnicodeDecodeError traceback
    with pytest.raises(ConfigError, match=r"wide.json: not UTF-8 text \(invalid start byte at byte 0\); save it as UTF-8"):
        load_json(tmp_path / "wide.json")


def test_batch_size_derives_grad_accum_for_any_number_of_ranks():
    cfg = TrainConfig(data="d", out="o", batch_size=16, micro_batch=2)
    assert [(cfg.for_world(n).grad_accum, cfg.for_world(n).batch_size) for n in (1, 2, 4, 8)] == \
        [(8, 16), (4, 16), (2, 16), (1, 16)]
    assert {cfg.for_world(n).tokens_per_step(n) for n in (1, 2, 4, 8)} == {16 * cfg.model.block_size}
    # without --batch-size the batch is micro x accum x ranks, and is recorded
    assert TrainConfig(data="d", out="o", micro_batch=2, grad_accum=3).for_world(2).batch_size == 12
    with pytest.raises(ConfigError, match=r"--batch-size 20 is not a multiple of micro-batch 2 x 4 rank\(s\) = 8: "
                                          r"use --batch-size 16 or 24"):
        TrainConfig(data="d", out="o", batch_size=20, micro_batch=2).for_world(4)
    with pytest.raises(ConfigError, match=r"use --batch-size 8, or --micro-batch 2 \(or run on 1 "
                                          r"rank\(s\): --nproc 1\)"):  # (a one-rank run's train_config.json as --config)
        TrainConfig(data="d", out="o", batch_size=4, micro_batch=4).for_world(2)
    # a batch only fewer ranks can make: the fix says how (it named a --micro-batch that could not)
    with pytest.raises(ConfigError, match=r"use --batch-size 8 \(or run on 1 rank with --micro-batch 1: --nproc 1\)$"):
        TrainConfig(data="d", out="o", batch_size=1, micro_batch=4).for_world(2)
    # under torchrun or deepspeed, whose ranks are the launcher's option (mtgpt's --nproc was "No such option")
    with pytest.raises(ConfigError, match=r"--micro-batch 2 \(or run on 1 rank\(s\): the launcher's --nproc_per_node 1 "
                                          r"\(torchrun\) or --num_gpus 1 \(deepspeed\)\)$"):
        TrainConfig(data="d", out="o", batch_size=4, micro_batch=4).for_world(2, ranks=LAUNCHER_RANKS)
    assert TrainConfig(data="d", out="o", batch_size=1, micro_batch=1).for_world(1).grad_accum == 1  # (it works)
    assert TrainConfig(data="d", out="o", batch_size=4, micro_batch=2).for_world(2).grad_accum == 1
    with pytest.raises(ConfigError, match="--grad-accum 3 disagrees with --batch-size 16"):
        TrainConfig(data="d", out="o", batch_size=16, micro_batch=2, grad_accum=3).for_world(2)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        TrainConfig(data="d", out="o", batch_size=0)
