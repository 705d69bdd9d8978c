"""The DeepSpeed JSON: every bundled config passes DeepSpeed's own parser; batch size, lr and
schedule come from mtgpt; conflicts are refused with a message naming the fix."""

from __future__ import annotations

import json

import pytest
import torch

from mtgpt import ds_config
from mtgpt.config import ConfigError, ModelConfig, TrainConfig
from tests.conftest import TINY


def cfg(**kw) -> TrainConfig:
    """A config as make_plan hands it to resolve: micro-batch chosen (CPU's default, 8)."""
    return TrainConfig(data="d", out="o", model=ModelConfig(**TINY), **{"micro_batch": 8, **kw})


def test_twelve_bundled_configs():
    names = ds_config.bundled_names()
    assert names == sorted(f"zero{s}_{p}" for s in range(4) for p in ("bf16", "fp16", "fp32"))


@pytest.mark.parametrize("name", ds_config.bundled_names())
def test_bundled_configs_parse(name):
    """Resolved and validated by DeepSpeed's config parser (fp16 included: it parses on CPU; it
    only cannot run here)."""
    path, raw = ds_config.find(name)
    ds = ds_config.resolve(cfg(micro_batch=4, grad_accum=2), raw, world_size=2, schedule_steps=100,
                           name=path, cuda=True)
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 6e-4
    assert ds["scheduler"]["params"]["total_num_steps"] == 100
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 5  # 5% of the schedule
    assert ds["scheduler"]["params"]["warmup_min_ratio"] == pytest.approx(1 / 6)  # step 1 at lr/6, step 5 at 5/6
    assert ds["zero_optimization"]["stage"] == int(name[4])
    assert ds_config.precision(ds) == name.split("_")[1]
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig({k: v for k, v in ds.items() if k != "train_batch_size"})
    assert parsed.zero_optimization_stage == int(name[4])
    autocast = name in ("zero0_bf16", "zero0_fp16")  # PyTorch's recipe: fp32 weights, autocast matmuls
    assert parsed.torch_autocast_enabled == autocast and ds_config.autocast(ds) == autocast
    assert parsed.float16_config.enabled == (name.endswith("fp16") and not autocast)
    assert parsed.bfloat16_config.enabled == (name.endswith("bf16") and not autocast)
    assert ds_config.weights_dtype(ds) == ("fp32" if autocast else name.split("_")[1])
    if autocast:
        assert parsed.torch_autocast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[name[-4:]]
        assert parsed.torch_autocast_lower_precision_safe_modules == []  # gradients all-reduced in fp32
    elif name.endswith("fp16"):
        assert parsed.float16_config.loss_scale == 0  # dynamic loss scaling
    assert parsed.timers_config.enabled is False  # no device sync per micro-step


def test_throughput_timer_off_unless_the_json_asks():
    """DeepSpeed's throughput timer synchronizes the device twice per micro-step: off in a JSON
    of the user's that does not mention it, kept on where it asks for it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    _, raw = ds_config.find("zero1_fp32")
    mine = {k: v for k, v in raw.items() if k != "timers"}
    parse = lambda ds: DeepSpeedConfig({k: v for k, v in ds.items() if k != "train_batch_size"})  # noqa: E731
    filled = {k: v for k, v in ds_config.resolve(cfg(), raw, 1, 10).items() if k != "timers"}
    assert parse(filled).timers_config.enabled is True  # DeepSpeed's own default
    assert parse(ds_config.resolve(cfg(), mine, 1, 10)).timers_config.enabled is False
    asked = {**mine, "timers": {"throughput": {"enabled": True, "synchronized": False}}}
    assert parse(ds_config.resolve(cfg(), asked, 1, 10)).timers_config.enabled is True


def test_fp16_refused_on_cpu():
    """DeepSpeed's fp16 optimizers need a GPU; fp16 through torch.autocast (zero0_fp16) runs on CPU."""
    _, raw = ds_config.find("zero1_fp16")
    with pytest.raises(ConfigError, match="fp16 needs a GPU.*zero0_fp16"):
        ds_config.resolve(cfg(), raw, 2, 100, cuda=False)
    assert ds_config.precision(ds_config.resolve(cfg(), ds_config.find("zero0_fp16")[1], 2, 100, cuda=False)) == "fp16"


def test_autocast_and_a_bf16_or_fp16_block_are_not_both_enabled():
    _, raw = ds_config.find("zero0_bf16")
    for block in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=f"torch_autocast and DeepSpeed's {block} block are both enabled"):
            ds_config.resolve(cfg(), {**raw, block: {"enabled": True}}, 1, 100, cuda=True)
    assert ds_config.precision({"torch_autocast": {"enabled": True, "dtype": "torch.float16"}}) == "fp16"
    with pytest.raises(ConfigError, match="torch_autocast needs a \"dtype\""):
        ds_config.resolve(cfg(), {**raw, "torch_autocast": {"enabled": True}}, 1, 100, cuda=True)
    assert ds_config.precision({"torch_autocast": {"enabled": False, "dtype": "float16"}}) == "fp32"


def test_batch_disagreement_refused():
    _, raw = ds_config.find("zero1_fp32")
    raw = {**raw, "train_batch_size": 32}
    with pytest.raises(ConfigError, match=r"train_batch_size is 32 .* --grad-accum 2"):
        ds_config.resolve(cfg(micro_batch=8), raw, 2, 100)
    raw = {**raw, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ConfigError, match="--micro-batch 4"):
        ds_config.resolve(cfg(micro_batch=8), raw, 2, 100)
    ds = ds_config.resolve(cfg(micro_batch=4), raw, 2, 100)  # agreeing numbers are fine
    assert ds["train_batch_size"] == 8


def test_lr_disagreement_refused():
    _, raw = ds_config.find("zero1_fp32")
    raw["optimizer"]["params"]["lr"] = 5e-5
    with pytest.raises(ConfigError, match="--lr"):
        ds_config.resolve(cfg(lr=1e-3), raw, 1, 100)


def test_unknown_key_refused():
    _, raw = ds_config.find("zero1_fp32")
    with pytest.raises(ConfigError, match="zero_optimisation .*did you mean zero_optimization"):
        ds_config.resolve(cfg(), {**raw, "zero_optimisation": {"stage": 2}}, 1, 100)


def test_deepspeed_rejects_bad_value():
    _, raw = ds_config.find("zero1_fp32")
    with pytest.raises(ConfigError, match="DeepSpeed rejects"):
        ds_config.resolve(cfg(), {**raw, "zero_optimization": {"stage": 2, "no_such_option": 1}}, 1, 100)
    # pydantic's four lines and a URL, in one line, with the key it is close to
    with pytest.raises(ConfigError, match=r"DeepSpeed rejects this config: zero_optimization.overlap_com: Extra "
                                          r"inputs are not permitted \(did you mean overlap_comm\?\)$"):
        ds_config.resolve(cfg(), {**raw, "zero_optimization": {"stage": 2, "overlap_com": True}}, 1, 100)


def test_missing_file_and_optimizer(tmp_path):
    with pytest.raises(ConfigError, match="not one of the bundled"):
        ds_config.find("zero9_fp8")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    _, raw = ds_config.find(str(path))
    with pytest.raises(ConfigError, match="optimizer"):
        ds_config.resolve(cfg(), raw, 1, 100)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ds_config.find(str(path))


def test_another_scheduler_keeps_its_own_numbers():
    """mtgpt fills warmup/length/lr into DeepSpeed's Warmup* schedulers only: OneCycle (which has
    no warmup_num_steps, and raised TypeError on one) passes through as the JSON gives it."""
    _, raw = ds_config.find("zero1_fp32")
    cycle = {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "cycle_first_step_size": 10}}
    ds = ds_config.resolve(cfg(), {**raw, "scheduler": cycle}, 1, 100)
    assert ds["scheduler"] == cycle
    from deepspeed.runtime.lr_schedules import OneCycle

    OneCycle(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3), **ds["scheduler"]["params"])


@pytest.mark.parametrize("optimizer", ["Adagrad", "SGD", "Lamb"])
def test_an_optimizer_other_than_adam_is_refused(optimizer):
    """Adagrad fails at the first backward of ZeRO-1 (IndexError), SGD at initialize ("untested
    ZeRO optimizer"), Lamb has no CPU op: one line before anything starts."""
    _, raw = ds_config.find("zero1_fp32")
    with pytest.raises(ConfigError, match=rf"optimizer '{optimizer}': mtgpt trains with DeepSpeed's AdamW or Adam"):
        ds_config.resolve(cfg(), {**raw, "optimizer": {"type": optimizer, "params": {"lr": "auto"}}}, 1, 100)
    adam = {**raw, "optimizer": {"type": "adam", "params": {"lr": "auto"}}}  # DeepSpeed reads types case-insensitively
    assert ds_config.resolve(cfg(), adam, 1, 100)["optimizer"]["type"] == "adam"


def test_a_typo_in_the_optimizer_params_is_one_line_before_any_process_starts():
    """"weight_decya" reached AdamW.__init__ inside every rank (a TypeError traceback each)."""
    _, raw = ds_config.find("zero1_fp32")
    raw["optimizer"]["params"]["weight_decya"] = 0.1
    with pytest.raises(ConfigError, match=r"unknown optimizer.params key\(s\): weight_decya \(did you mean "
                                          r"weight_decay\?\); the optimizer takes .*betas"):
        ds_config.resolve(cfg(), raw, 1, 100)
    del raw["optimizer"]["params"]["weight_decya"]
    raw["optimizer"]["params"]["max_grad_norm"] = 1.0
    with pytest.raises(ConfigError, match="max_grad_norm.*top-level \"gradient_clipping\""):
        ds_config.resolve(cfg(), raw, 1, 100)
    fused = {"lr": "auto", "betas": [0.9, 0.95], "bias_correction": True, "set_grad_none": True}  # FusedAdam's own
    assert ds_config.resolve(cfg(), {**raw, "optimizer": {"type": "AdamW", "params": fused}}, 1, 100)


def test_a_number_the_user_never_gave_is_named_as_a_default_and_a_batch_fix_that_works_is_offered():
    _, raw = ds_config.find("zero1_fp32")
    raw["optimizer"]["params"]["lr"] = 1e-3
    with pytest.raises(ConfigError, match=r"lr is 0.001 but mtgpt's --lr is 0.0006 \(as given, or its default\)"):
        ds_config.resolve(cfg(), raw, 1, 100)
    _, raw = ds_config.find("zero1_fp32")
    with pytest.raises(ConfigError, match=r"train_batch_size is 24 .* pass --batch-size 24 --micro-batch 6"):
        ds_config.resolve(cfg(micro_batch=8), {**raw, "train_batch_size": 24}, 2, 100)
    fixed = cfg(micro_batch=6, batch_size=24).for_world(2)  # the fix it gives works
    assert ds_config.resolve(fixed, {**raw, "train_batch_size": 24}, 2, 100)["train_batch_size"] == 24


@pytest.mark.parametrize("name", ds_config.bundled_names())
def test_a_resolved_config_unresolves_to_one_that_resolves_again_for_another_plan(name):
    """A run's ds_config.json (mtgpt's numbers filled in) is resolved again on resume for another
    schedule, batch or number of ranks: `unresolved` puts mtgpt's numbers back to "auto" and drops
    the universal-checkpoint flag of a resume on another number of ranks; the rest is the run's."""
    _, raw = ds_config.find(name)
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    cuda = ds_config.precision(raw) == "fp16" and not ds_config.autocast(raw)
    first = ds_config.resolve(cfg(lr=1e-3, micro_batch=4), {**raw, "gradient_clipping": 0.5}, 2, 100, cuda=cuda)
    first["checkpoint"] = {"load_universal": True}
    again = ds_config.resolve(cfg(lr=1e-3, micro_batch=2, grad_accum=3), ds_config.unresolved(first), 1, 300,
                              cuda=cuda)
    assert again["gradient_clipping"] == 0.5 and "checkpoint" not in again
    assert (again["train_batch_size"], again["gradient_accumulation_steps"]) == (6, 3)
    assert again["scheduler"]["params"]["total_num_steps"] == 300
    assert {k: v for k, v in again.items() if k not in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                        "gradient_accumulation_steps", "scheduler")} == \
        {k: v for k, v in first.items() if k not in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                     "gradient_accumulation_steps", "scheduler", "checkpoint")}


def test_a_deepspeed_users_json_is_checked_before_any_process_starts():
    """What a DeepSpeed user writes by hand, refused in one line before any rank starts (each
    was a traceback in every rank, a silent no-op or one fix at a time)."""
    _, raw = ds_config.find("zero1_fp32")
    opt, sched = raw["optimizer"], raw["scheduler"]

    def refused(match: str, ds: dict, **kw) -> None:
        with pytest.raises(ConfigError, match=match):
            ds_config.resolve(cfg(**kw), ds, 2, 100)

    refused(r"train_batch_size is '16'; write it without quotes \(16, not \"16\"\)",
            {**raw, "train_batch_size": "16"})  # (a TypeError traceback)
    refused(r"optimizer.params.lr is '1e-3'; write it without quotes",  # (said "pass --lr 1e-3", given already)
            {**raw, "optimizer": {**opt, "params": {**opt["params"], "lr": "1e-3"}}}, lr=1e-3)
    refused(r"train_batch_size is True; it must be a number", {**raw, "train_batch_size": True})
    # numbers in quotes anywhere: a constant lr at 10% of --lr with exit 0, a TypeError in every
    # rank at the first step, or (true/false) the opposite of what was written
    refused(r"scheduler.params.warmup_min_ratio is '0'; write it without quotes \(0, not \"0\"\)$",
            {**raw, "scheduler": {**sched, "params": {**sched["params"], "warmup_min_ratio": "0"}}})
    refused(r"gradient_clipping is '1.0'; write it without quotes", {**raw, "gradient_clipping": "1.0"})
    refused(r"optimizer.params.eps is ' 1e-8'; write it without quotes \(1e-8, not",
            {**raw, "optimizer": {**opt, "params": {**opt["params"], "eps": " 1e-8"}}})
    refused(r"bf16.enabled is 'False'; write it without quotes \(false, not \"False\"\)",
            {**raw, "bf16": {"enabled": "False"}})
    ds_config.resolve(cfg(), {**raw, "tensorboard": {"enabled": False, "job_name": "2024"}}, 2, 100)  # (a name)
    refused(r"train_batch_size 24 is not train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2 x 2 "
            r"rank\(s\) = 16; give at most two of the three",  # (each fix it gave pointed at the other)
            {**raw, "train_batch_size": 24, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})
    decay = {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2, "total_num_steps": 20, "warmup_max_lr": "auto"}}
    refused(r"pass --micro-batch 4 --grad-accum 2\.$",  # every number that differs, in one error (was one per try)
            {**raw, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})
    refused(r"lr is 0.001 .*; scheduler.params.warmup_num_steps is 2 .*; scheduler.params.total_num_steps is 20 .* "
            r"Set them to \"auto\" .* or pass --lr 0.001 --warmup-steps 2 --max-steps 20\.$",
            {**raw, "optimizer": {**opt, "params": {**opt["params"], "lr": 1e-3}}, "scheduler": decay})
    refused(r"train_batch_size is 24 but micro_batch 8 x grad_accum 1 x 2 rank\(s\) = 16; optimizer.params.lr is 0.001 "
            r".*; scheduler.params.total_num_steps is 20 .* or pass --batch-size 24 --micro-batch 6 --lr 0.001 "
            r".*--max-steps 20\.$",
            {**raw, "train_batch_size": 24, "optimizer": {**opt, "params": {**opt["params"], "lr": 1e-3}},
             "scheduler": decay})  # (the batch was refused alone, hiding the others)
    refused(r"optimizer.params.betas is \[0.9\]; it takes two numbers",  # (an IndexError in every rank)
            {**raw, "optimizer": {**opt, "params": {**opt["params"], "betas": [0.9]}}})
    refused(r"scheduler 'CosineAnnealing' is not one of DeepSpeed's \(LRRangeTest, OneCycle, WarmupCosineLR",
            {**raw, "scheduler": {"type": "CosineAnnealing", "params": {}}})  # (an AssertionError in every rank)
    # schedule options the JSON's schedule has no place for (were ignored silently)
    no_schedule = {k: v for k, v in raw.items() if k != "scheduler"}
    refused(r"--warmup-steps sets what its lack of a scheduler \(a constant --lr\) does not have", no_schedule,
            warmup_steps=3)
    assert "scheduler" not in ds_config.resolve(cfg(), no_schedule, 2, 100)  # a constant --lr, as asked
    cycle = {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "cycle_first_step_size": 5}}
    refused(r"--warmup-steps and --min-lr-ratio set what its scheduler OneCycle does not have",
            {**raw, "scheduler": cycle}, warmup_steps=3, min_lr_ratio=0.5)
    refused(r"--min-lr-ratio sets what its scheduler WarmupLR does not have",
            {**raw, "scheduler": {"type": "WarmupLR", "params": {}}}, min_lr_ratio=0.5)
    assert ds_config.resolve(cfg(warmup_steps=3), {**raw, "scheduler": sched}, 2, 100)  # WarmupCosineLR takes both
    # the warmup's start: "auto" or absent, where step 1 trains at lr/(W + 1) (W >= 2, DeepSpeed's); a number stays
    start = {**sched, "params": {k: v for k, v in sched["params"].items() if k != "warmup_min_ratio"}}
    assert ds_config.resolve(cfg(warmup_steps=1), {**raw, "scheduler": start}, 2, 100)["scheduler"]["params"][
        "warmup_min_ratio"] == pytest.approx(1 / 3)
    zero = {**sched, "params": {**sched["params"], "warmup_min_ratio": 0.0}}
    assert ds_config.resolve(cfg(), {**raw, "scheduler": zero}, 2, 100)["scheduler"]["params"]["warmup_min_ratio"] == 0
    warm = ds_config.resolve(cfg(warmup_steps=4, lr=1e-3), {**raw, "scheduler": {"type": "WarmupLR", "params": {}}}, 2, 100)
    assert warm["scheduler"]["params"]["warmup_min_lr"] == pytest.approx(1e-3 / 5)
    # sections that would crash every rank, or do nothing
    import importlib.util

    wandb = {**raw, "wandb": {"enabled": True, "project": "x"}}
    if importlib.util.find_spec("wandb") is None:  # (ModuleNotFoundError in every rank)
        refused(r"its wandb block needs the wandb package, which is not installed: pip install wandb", wandb)
    else:
        assert ds_config.resolve(cfg(), wandb, 2, 100)["wandb"]["enabled"]
    refused(r"does not use DeepSpeed's activation checkpointing, so its activation_checkpointing block would do "
            r"nothing", {**raw, "activation_checkpointing": {"partition_activations": True}})
