"""DeepSpeed JSONs as users bring them, settled with the YAML: no traceback, ever; the precedence rule.

No engine here: resolution is a pure function of (JSON, YAML, world size), checked against
DeepSpeed's own config class. tests/test_ds_blocks.py trains such JSONs under the real launcher.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seemore_ds.backends.base import resolve_device
from seemore_ds.backends.deepspeed_compat import select_accelerator
from seemore_ds.backends.ds_config import SCHEDULER_PARAMS, check_with_deepspeed, precision_of, resolve_ds_config
from seemore_ds.config import load_config
from seemore_ds.errors import UserError

AUTO = "auto"


@pytest.fixture(scope="module")
def deepspeed_config_class():
    select_accelerator(resolve_device("auto"))  # before deepspeed is imported
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig


def maybe(strategy):
    """A key absent (None: left out), "auto", or a value drawn from ``strategy``."""
    return st.one_of(st.none(), st.just(AUTO), strategy)


small_ints = st.integers(min_value=-1, max_value=64)
rates = st.one_of(st.floats(min_value=-0.1, max_value=1.0, allow_nan=False), st.integers(0, 2))
enabled = maybe(st.booleans())


def params_for(names: list[str]):
    return st.fixed_dictionaries({}, optional={name: st.one_of(st.just(AUTO), rates, small_ints) for name in names})


optimizers = st.fixed_dictionaries({
    "type": st.sampled_from(["AdamW", "Adam", "adamw", "Lamb", "SGD"]),
    "params": st.fixed_dictionaries({}, optional={
        "lr": maybe(rates), "eps": maybe(st.sampled_from([1e-8, 1e-6])), "weight_decay": maybe(rates),
        "betas": st.one_of(st.just(AUTO), st.lists(st.floats(0, 0.9999), min_size=2, max_size=2), st.just([0.9])),
    }),
})
schedulers = st.sampled_from(sorted(SCHEDULER_PARAMS)).flatmap(lambda kind: st.fixed_dictionaries({
    "type": st.just(kind),
    "params": params_for([*SCHEDULER_PARAMS[kind], "warmup_min_lr", "warmup_min_ratio", "cycle_min_lr"]),
}))
offload = st.fixed_dictionaries({"device": st.sampled_from(["none", "cpu"]), "pin_memory": st.booleans()})
zero = st.fixed_dictionaries({}, optional={
    "stage": st.sampled_from([0, 1, 2, 3, 4, AUTO]), "offload_optimizer": offload, "offload_param": offload,
    "overlap_comm": st.booleans(), "contiguous_gradients": st.booleans(), "reduce_bucket_size": maybe(st.integers(1, 10**8)),
    "stage3_prefetch_bucket_size": maybe(st.integers(1, 10**8)), "stage3_param_persistence_threshold": maybe(st.integers(1, 10**5)),
    "stage3_gather_16bit_weights_on_model_save": st.booleans(), "sub_group_size": st.just(1e9),
})
ds_jsons = st.fixed_dictionaries({}, optional={
    "train_batch_size": maybe(st.sampled_from([0, 4, 8, 12, 16, 32, 64, 96, 7])),
    "train_micro_batch_size_per_gpu": maybe(st.sampled_from([1, 2, 4, 8, 0, 2.5])),
    "gradient_accumulation_steps": maybe(st.sampled_from([1, 2, 3, 4])),
    "gradient_clipping": maybe(rates),
    "fp16": st.fixed_dictionaries({}, optional={"enabled": enabled, "loss_scale": st.just(0), "initial_scale_power": st.just(16)}),
    "bf16": st.fixed_dictionaries({}, optional={"enabled": enabled}),
    "optimizer": optimizers,
    "scheduler": schedulers,
    "zero_optimization": zero,
    "steps_per_print": st.sampled_from([1, 10, 1e5]),
    "zero_allow_untested_optimizer": st.booleans(),
    "prescale_gradients": st.booleans(),
    "memory_efficient_linear": st.booleans(),
    "wall_clock_breakdown": maybe(st.booleans()),
    "comms_logger": st.fixed_dictionaries({"enabled": st.booleans()}),
    "flops_profiler": st.fixed_dictionaries({}, optional={"enabled": enabled, "profile_step": maybe(st.integers(0, 5))}),
    "wandb": st.fixed_dictionaries({}, optional={"enabled": enabled, "project": st.just("p"), "team": st.just("t")}),
    "csv_monitor": st.fixed_dictionaries({"enabled": st.booleans(), "output_path": st.sampled_from(["", "csv", "/tmp/abs"])}),
    "an_unknown_key": st.one_of(st.integers(), st.just(AUTO)),
})
# What the user may have written in the YAML or on the command line.
overrides = st.lists(st.sampled_from([
    "train.precision=fp32", "train.precision=bf16", "train.batch_size=4", "train.batch_size=8", "train.grad_accum=2",
    "train.lr=0.0003", "train.grad_clip=0.5", "train.warmup_steps=3", "train.max_steps=20", "profile.flops_step=2",
    "wandb.enabled=false", "train.beta2=0.999",
]), max_size=4)


def strip_absent(tree):
    """Drop the keys the strategies drew as None: absent."""
    if isinstance(tree, dict):
        return {k: strip_absent(v) for k, v in tree.items() if v is not None}
    return tree


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=ds_jsons.map(strip_absent), chosen=overrides, world_size=st.sampled_from([1, 2, 4]))
def test_every_json_resolves_to_a_config_deepspeed_accepts_or_one_line_error(deepspeed_config_class, raw, chosen, world_size):
    cfg = load_config(None, ["run.output_dir=runs/p", *chosen])
    before = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in cfg.explicit_keys}
    original = copy.deepcopy(raw)
    try:
        tree, adopted = resolve_ds_config(raw, cfg, world_size, "ds.json")
    except UserError as err:
        message = str(err)
        assert message.startswith("ds.json: "), message
        assert "\n" not in message
        return
    assert raw == original  # the user's tree is never modified
    assert AUTO not in json.dumps(tree)
    # DeepSpeed's own config class accepts the result; without a process group it counts one rank.
    one_rank = {**tree, "train_batch_size": tree["train_micro_batch_size_per_gpu"] * tree["gradient_accumulation_steps"]}
    assert deepspeed_config_class(copy.deepcopy(one_rank)).world_size == 1
    check_with_deepspeed(tree, "ds.json")
    t = cfg.train
    assert (tree["train_micro_batch_size_per_gpu"], tree["gradient_accumulation_steps"]) == (t.batch_size, t.grad_accum)
    assert tree["train_batch_size"] == t.batch_size * t.grad_accum * world_size
    # An explicit precision is the tree's; auto (the default) is whatever the JSON's concrete values leave
    # (no picker here: fp32 where the JSON leaves it open).
    said = next((k for k in ("bf16", "fp16") if raw.get(k, {}).get("enabled") is True), "fp32")
    assert precision_of(tree) == (said if t.precision == AUTO else t.precision)
    assert tree["fp16"]["enabled"] is (precision_of(tree) == "fp16") and tree["bf16"]["enabled"] is (precision_of(tree) == "bf16")
    assert tree["gradient_clipping"] == t.grad_clip
    if "optimizer" in tree:
        p = tree["optimizer"]["params"]
        assert (p["lr"], p["betas"], p["eps"], p["weight_decay"]) == (t.lr, [t.beta1, t.beta2], t.eps, t.weight_decay)
    assert "wandb" not in tree  # the trainer's sink writes W&B, never DeepSpeed's monitor
    assert all(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) == v for k, v in before.items())  # explicit keys kept
    assert len(adopted) == len(set(line.split("=")[0] for line in adopted))  # one line per adopted YAML key


def settle(tree, *overrides, world_size=2):
    cfg = load_config(None, ["run.output_dir=runs/x", *overrides])
    resolved, adopted = resolve_ds_config(tree, cfg, world_size, "ds.json")
    return resolved, adopted, cfg


def test_bf16_block_without_fp16_block_trains_in_bf16():
    resolved, adopted, cfg = settle({"bf16": {"enabled": True}})
    assert precision_of(resolved) == "bf16" and resolved["fp16"] == {"enabled": False}
    assert cfg.train.precision == "auto"  # the run config stays as loaded; the backend trains in the tree's
    assert adopted == ["precision: auto -> bf16 (ds.json bf16.enabled=true)"]


def test_concrete_json_values_govern_keys_left_at_default():
    tree = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999]}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 7}}}
    resolved, adopted, cfg = settle(tree, "train.grad_clip=0.5")
    t = cfg.train
    assert (t.batch_size, t.grad_accum, t.grad_clip, t.lr, t.beta2, t.warmup_steps) == (4, 4, 0.5, 3e-4, 0.999, 7)
    assert adopted == [
        "train.batch_size=4 from ds.json train_micro_batch_size_per_gpu",
        "train.grad_accum=4 from ds.json train_batch_size (32 / (train.batch_size 4 x 2 rank(s)))",
        "train.lr=0.0003 from ds.json optimizer.params.lr",
        "train.beta2=0.999 from ds.json optimizer.params.betas[1]",
        "train.warmup_steps=7 from ds.json scheduler.params.warmup_num_steps",
    ]  # grad_clip: set by the user and agreeing, so nothing adopted
    assert resolved["train_batch_size"] == 32


@pytest.mark.parametrize("tree, overrides, message", [
    ({"bf16": {"enabled": True}}, ["train.precision=fp32"],
     'bf16.enabled=true contradicts train.precision=fp32; set bf16.enabled to "auto" or train.precision=bf16'),
    ({"train_micro_batch_size_per_gpu": 16}, ["train.batch_size=8"],
     "train_micro_batch_size_per_gpu=16 contradicts train.batch_size=8"),
    ({"train_batch_size": 30}, ["train.batch_size=4"], "train_batch_size=30 cannot hold"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}, "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.2}}},
     [], "scheduler.params.warmup_max_lr=0.2 contradicts optimizer.params.lr in the same file, which set train.lr=0.1"),
    ({"optimizer": {"type": "Lamb"}}, [], 'optimizer.type="Lamb" is not one seemore-ds trains with'),
    ({"scheduler": {"type": "Cosine"}}, [], 'scheduler.type="Cosine" is not one of DeepSpeed'),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, [], "both true"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, [], "offload_optimizer needs ZeRO stage 1"),
    ({"flops_profiler": {"enabled": False}}, ["profile.flops_step=1"], "flops_profiler.enabled=false contradicts profile.flops_step=1"),
    ({"flops_profiler": {"enabled": True, "profile_step": 9}}, ["train.max_steps=5"], "profile.flops_step starts at step 10"),
    ({"wandb": {"enabled": True}}, ["wandb.enabled=false"], "wandb.enabled=true contradicts wandb.enabled=false"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": AUTO}}, [], 'zero_optimization.allgather_bucket_size is "auto"'),
])
def test_what_cannot_hold_is_one_line_naming_key_and_fix(tree, overrides, message):
    with pytest.raises(UserError) as err:
        settle(tree, *overrides)
    assert message in str(err.value) and str(err.value).startswith("ds.json: ")


def test_deepspeed_blocks_are_taken_over_or_placed_in_the_run_folder():
    tree = {"flops_profiler": {"enabled": True, "profile_step": 2, "module_depth": 1},
            "wandb": {"enabled": True, "project": "vlm", "team": "lab", "group": "sweep"},
            "csv_monitor": {"enabled": True, "output_path": "monitor", "job_name": "j"},
            "comms_logger": {"enabled": True, "prof_all": True}, "activation_checkpointing": {"partition_activations": False},
            "prescale_gradients": True, "zero_allow_untested_optimizer": True, "memory_efficient_linear": False}
    resolved, adopted, cfg = settle(tree)
    assert cfg.profile.flops_step == 3 and resolved["flops_profiler"]["output_file"] == "runs/x/flops_profile.txt"
    assert resolved["flops_profiler"]["module_depth"] == 1
    assert (cfg.wandb.enabled, cfg.wandb.project, cfg.wandb.entity, cfg.wandb.group) == (True, "vlm", "lab", "sweep")
    assert "wandb" not in resolved  # one W&B writer: the trainer's
    assert resolved["csv_monitor"]["output_path"] == "runs/x/monitor"
    for key in ("comms_logger", "activation_checkpointing", "prescale_gradients", "zero_allow_untested_optimizer",
                "memory_efficient_linear"):
        assert resolved[key] == tree[key]  # passed through untouched
    assert "profile.flops_step=3 from ds.json flops_profiler.profile_step (2 counted from 0)" in adopted


def test_the_run_config_saved_holds_the_adopted_values(tmp_path):
    from seemore_ds.config import save_config

    _, _, cfg = settle({"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 4})
    save_config(cfg, tmp_path / "config.yaml")
    saved = load_config(str(tmp_path / "config.yaml"))
    assert saved.train.batch_size == 4  # the precision: test_precision.py, the trainer records the backend's
    # Resumed with the same JSON, the saved run config (every key now set) agrees with it.
    resolve_ds_config({"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 4}, saved, 2, "ds.json")


def test_tensorboard_block_without_the_package_says_how_to_install(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.raises(UserError, match="needs the tensorboard package: pip install tensorboard"):
        settle({"tensorboard": {"enabled": True, "output_path": "tb"}})
    resolved, _, _ = settle({"tensorboard": {"enabled": False}})  # a disabled block needs nothing
    assert resolved["tensorboard"] == {"enabled": False}
