"""JSONs users already own, trained unchanged by the real engine under the real launcher (CPU ranks).

One 2-rank launch trains four runs: a DeepSpeed-Chat style JSON (concrete bf16 without an fp16
block, concrete batch, AdamW + WarmupDecayLR, ZeRO-Offload, flops_profiler, wandb and csv_monitor
blocks), a ZeRO-3 JSON with activation_checkpointing, comms_logger and tensorboard blocks, and the same without
those two, to compare, and the JSON ``python -m seemore_ds plan`` wrote for 2 CPU ranks. One 1-rank launch checks that /dev/shm is left as found at one rank too.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from seemore_ds.__main__ import main
from seemore_ds.backends.ds_config import COMMS_SUMMARY_FILE
from tests.test_deepspeed import TINY, launch, loss_rows

# The tiny model without train.batch_size and train.precision: the JSON's batch keys and bf16 block govern them.
TINY_MODEL = [arg for arg in TINY if not arg.startswith(("train.batch_size", "train.precision"))]

CHAT_STYLE = {  # as DeepSpeed-Chat's get_train_ds_config writes it, with offload and monitors
    "train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10,
    "zero_optimization": {"stage": 2, "offload_param": {"device": "none"}, "offload_optimizer": {"device": "cpu"},
                          "stage3_param_persistence_threshold": 1e4, "stage3_max_live_parameters": 3e7,
                          "stage3_prefetch_bucket_size": 3e7, "memory_efficient_linear": False},
    "bf16": {"enabled": True}, "gradient_clipping": 1.0, "prescale_gradients": False, "wall_clock_breakdown": False,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 2e-3, "warmup_num_steps": 2,
                                                      "total_num_steps": 4}},
    "flops_profiler": {"enabled": True, "profile_step": 1, "module_depth": -1, "top_modules": 1, "detailed": True},
    "wandb": {"enabled": True, "project": "seemore-json", "group": "chat-style"},
    "csv_monitor": {"enabled": True, "output_path": "ds_csv", "job_name": "chat"},
}
ZERO3 = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "bf16": {"enabled": False}, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
}
ZERO3_CHECKPOINTED = {
    **ZERO3,
    "activation_checkpointing": {"partition_activations": False, "contiguous_memory_optimization": False,
                                 "cpu_checkpointing": False},
    "comms_logger": {"enabled": True, "verbose": False, "prof_all": True},
    "tensorboard": {"enabled": True, "output_path": "tb", "job_name": "ckpt"},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The runs of one 2-rank launch: (folder, launch stdout)."""
    tmp = Path(tempfile.mkdtemp(prefix="seemore-ds-blocks-"))
    try:
        plan = []
        for name, tree, extra in (("chat", CHAT_STYLE, []), ("ckpt", ZERO3_CHECKPOINTED, ["train.batch_size=4"]),
                                  ("plain", ZERO3, ["train.batch_size=4"])):
            (tmp / f"{name}.json").write_text(json.dumps(tree, indent=2))
            plan.append(["train", *TINY_MODEL, *extra, "train.max_steps=3" if name != "chat" else "eval.every=0",
                         f"run.output_dir={tmp / name}", "--deepspeed_config", str(tmp / f"{name}.json")])
        # The plan's JSON for this machine's 2 CPU ranks, then trained unchanged in the same launch.
        assert main(["plan", "--device", "cpu", "--ranks", "2", "--cpu-mem", "8", "--global-batch", "8", *TINY_MODEL,
                     "--out", str(tmp / "plan.json")]) == 0
        plan.append(["train", *TINY_MODEL, "train.max_steps=2", f"run.output_dir={tmp / 'plan'}",
                     "--deepspeed_config", str(tmp / "plan.json")])
        env = {"WANDB_MODE": "offline", **{key: str(tmp / key.lower()) for key in
                                          ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}}
        result = launch(plan, tmp, "blocks", env=env)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        yield tmp, result.stdout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_chat_style_json_trains_as_given_and_says_where_values_came_from(trained):
    tmp, stdout = trained
    source = tmp / "chat.json"
    for line in ("precision: auto -> bf16 ({} bf16.enabled=true)",
                 "train.batch_size=2 from {} train_micro_batch_size_per_gpu",
                 "train.grad_accum=4 from {} train_batch_size (16 / (train.batch_size 2 x 2 rank(s)))",
                 "train.lr=0.002 from {} optimizer.params.lr", "train.max_steps=4 from {} scheduler.params.total_num_steps",
                 "wandb.enabled=true from {} wandb.enabled", "wandb.group=chat-style from {} wandb.group"):
        assert stdout.count(line.format(source)) == 1, (line, stdout[-3000:])  # rank 0 alone says it
    saved = yaml.safe_load((tmp / "chat" / "config.yaml").read_text())["train"]
    assert (saved["precision"], saved["batch_size"], saved["grad_accum"], saved["lr"], saved["max_steps"]) == ("bf16", 2, 4, 0.002, 4)
    rows = loss_rows(tmp / "chat")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert json.loads((tmp / "chat" / "summary.json").read_text())["samples"] == 4 * 16
    # DeepSpeed's WarmupDecayLR from the JSON (warm-up from warmup_min_lr 0 to warmup_max_lr), not the YAML's cosine
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(2e-3)


def test_flops_profiler_block_gives_the_profile_step_output(trained):
    tmp, stdout = trained
    assert "profile.flops_step=2 from" in stdout  # DeepSpeed's profile_step 1, counted from 0
    assert stdout.count("flops (DeepSpeed flops profiler") == 1
    assert "Profile Summary at step 2" in (tmp / "chat" / "flops_profile.txt").read_text()


def test_wandb_block_turns_on_the_trainers_sink_only(trained):
    tmp, _ = trained
    runs = list((tmp / "chat" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # DeepSpeed's own W&B writer would have started a second run elsewhere
    assert not list(tmp.glob("wandb_dir/wandb/*run-*"))  # where DeepSpeed's writer (no dir of its own) would log
    (record,) = runs[0].glob("run-*.wandb")
    assert b"seemore-json" in record.read_bytes() and b"chat-style" in record.read_bytes()  # project and group


def test_csv_monitor_writes_under_the_run_folder(trained):
    tmp, _ = trained
    written = list((tmp / "chat" / "ds_csv" / "chat").glob("*.csv"))
    assert written, list((tmp / "chat").rglob("*"))
    with open(written[0], newline="") as handle:
        assert len(list(csv.reader(handle))) >= 2  # a header and at least one logged row


def test_tensorboard_monitor_writes_under_the_run_folder(trained):
    tmp, _ = trained
    (events,) = (tmp / "ckpt" / "tb" / "ckpt").glob("events.out.tfevents.*")
    assert events.stat().st_size > 100  # more than the header: DeepSpeed's monitor logged its scalars


def test_comms_logger_summary_is_printed_and_saved(trained):
    tmp, stdout = trained
    table = (tmp / "ckpt" / COMMS_SUMMARY_FILE).read_text()
    rows = [line.split() for line in table.splitlines()[2:]]
    operations = {row[0] for row in rows}
    assert "all_gather_into_tensor" in operations or "all_gather" in operations, table  # ZeRO-3 gathers parameters
    assert rows and all(int(row[1]) > 0 and int(row[2]) >= 0 and float(row[3]) >= 0 for row in rows)
    assert sum(int(row[1]) * int(row[2]) for row in rows) > 0
    assert f"comms ({tmp / 'ckpt' / COMMS_SUMMARY_FILE})" in stdout and table.splitlines()[1] in stdout
    assert not (tmp / "plain" / COMMS_SUMMARY_FILE).exists()


def test_activation_checkpointing_block_recomputes_and_trains_alike(trained):
    tmp, stdout = trained
    assert stdout.count(f"activation checkpointing ({tmp / 'ckpt.json'}): 2 ViT and decoder blocks") == 1
    for a, b in zip(loss_rows(tmp / "ckpt"), loss_rows(tmp / "plain"), strict=True):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= 1e-5 and a["lr"] == b["lr"]


def test_deepspeed_checkpoint_function_saves_activation_memory():
    """The model's hook with DeepSpeed's checkpoint function: the same gradients, fewer saved bytes."""
    from seemore_ds.backends.deepspeed_compat import select_accelerator
    from bench.activation_memory import saved_activation_bytes, tiny_model_and_batch

    select_accelerator(torch.device("cpu"))
    import deepspeed  # checkpoint() with its module defaults, as an empty block gives: configure() needs a process group

    model, batch = tiny_model_and_batch()
    plain_bytes, plain_grads = saved_activation_bytes(model, batch)
    model.checkpoint_blocks(deepspeed.checkpointing.checkpoint)
    checkpointed_bytes, grads = saved_activation_bytes(model, batch)
    assert checkpointed_bytes < 0.6 * plain_bytes, (checkpointed_bytes, plain_bytes)
    for a, b in zip(plain_grads, grads, strict=True):
        torch.testing.assert_close(a, b)


def test_the_planned_json_trains_unchanged(trained):
    tmp, stdout = trained
    planned = json.loads((tmp / "plan.json").read_text())
    assert planned["train_micro_batch_size_per_gpu"] * planned["gradient_accumulation_steps"] * 2 == 8
    assert f"train.batch_size={planned['train_micro_batch_size_per_gpu']} from {tmp / 'plan.json'}" in stdout
    assert json.loads((tmp / "plan" / "summary.json").read_text())["samples"] == 2 * 8


def test_one_rank_launch_leaves_dev_shm_as_found(tmp_path):
    # launch() asserts that no deepspeed_allreduce_buffer_* of its port is left in /dev/shm.
    plan = [["train", *TINY, "train.max_steps=1", f"run.output_dir={tmp_path / 'run'}",
             "--deepspeed_config", "ds_configs/zero1.json"]]
    result = launch(plan, tmp_path, "one_rank", ranks=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x 1, fp32" in result.stdout
