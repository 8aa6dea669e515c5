"""``python -m seemore_ds plan``: the choice it makes, the JSON it writes, and its prediction against a
measurement of what DeepSpeed really holds (2 CPU ranks, bench.plan_accuracy). tests/test_ds_blocks.py
trains a planned JSON under the launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.activation_memory import saved_activation_bytes, tiny_model_and_batch
from seemore_ds.backends.ds_config import resolve_ds_config
from seemore_ds.config import ModelConfig, load_config
from seemore_ds.errors import UserError
from seemore_ds.plan import GIB, Choice, Target, activation_bytes, estimate, plan, run_plan
from tests.test_deepspeed import REPO

NINETY_M = ["model.image_embed_dim=768", "model.n_embd=768", "model.num_blks=6", "model.n_layer=6", "model.n_head=12",
            "model.patch_size=8", "train.precision=bf16"]


def test_activations_from_shapes_match_what_autograd_saves():
    for sizes in (dict(img_size=16, patch_size=8, image_embed_dim=32, num_blks=1, n_embd=32, n_layer=1, n_head=2),
                  dict(img_size=32, patch_size=4, image_embed_dim=64, num_blks=2, n_embd=96, n_layer=3, n_head=4,
                       image_tokens="cls"),
                  dict(img_size=32, patch_size=4, image_embed_dim=64, num_blks=2, n_embd=96, n_layer=2, n_head=4,
                       image_tokens="pooled", token_pool=2)):
        model, batch = tiny_model_and_batch(sizes, batch_size=3)
        measured, _ = saved_activation_bytes(model, batch)
        predicted = activation_bytes(ModelConfig(**sizes), 40, 3, "fp32")
        assert abs(predicted / measured - 1) <= 0.05, (sizes, predicted, measured)


def test_the_choice_is_the_lowest_stage_that_fits_then_offload():
    cfg = load_config(None, NINETY_M)
    big = Target(8, "gpu", 80 * GIB, 64 * GIB)
    _, chosen = plan(cfg, big, global_batch=256)
    assert chosen.choice == Choice(0) and chosen.micro_batch == 32  # 90M fits anywhere: plain data parallelism
    # A 1 GiB device: the activations of 32 samples no longer fit; smaller micro-batches, then higher stages.
    rows, small = plan(cfg, Target(8, "gpu", 1 * GIB, 64 * GIB), global_batch=256)
    assert small.micro_batch < 32 and small.device <= 0.85 * GIB
    assert all(r.device > 0.85 * GIB for r in rows[: rows.index(small)])  # every lower choice did not fit
    # Nothing fits: one line saying so, not a table of impossible choices.
    with pytest.raises(UserError, match="nothing fits"):
        run_plan(cfg, Target(1, "gpu", 0.01 * GIB, 0.01 * GIB), 8, None)


@pytest.mark.parametrize("device, as_precision", [("gpu", "bf16"), ("cpu", "fp32")])
def test_precision_auto_is_planned_as_it_trains_there(device, as_precision):
    """On a GPU auto trains in two-byte bf16 or fp16; on a CPU it measures, and fp32 is the larger."""
    target = Target(8, device, 1 * GIB, 64 * GIB)
    auto = plan(load_config(None, [*NINETY_M[:-1], "train.precision=auto"]), target, 64)
    named = plan(load_config(None, [*NINETY_M[:-1], f"train.precision={as_precision}"]), target, 64)
    assert auto == named
    assert f"auto (planned as {as_precision})" in run_plan(
        load_config(None, [*NINETY_M[:-1], "train.precision=auto"]), Target(8, device, 80 * GIB, 64 * GIB), 64, None)


def test_more_ranks_partition_more():
    psi, per_sample = 90_000_000, 1e6
    for stage in (1, 2, 3):
        one, eight = (estimate(psi, per_sample, Choice(stage), 4, n, "bf16", 768).device for n in (1, 8))
        assert eight < one
    zero0 = [estimate(psi, per_sample, Choice(0), 4, n, "bf16", 768).device for n in (1, 8)]
    assert zero0[0] == zero0[1]


def test_written_json_resolves_with_the_run_config(tmp_path):
    cfg = load_config(None, NINETY_M)
    text = run_plan(cfg, Target(64, "gpu", 80 * GIB, 128 * GIB), 2048, str(tmp_path / "ds.json"))
    assert "choice: ZeRO-0" in text and "wrote" in text
    tree, adopted = resolve_ds_config(json.loads((tmp_path / "ds.json").read_text()), cfg, 64, "ds.json")
    assert tree["train_batch_size"] == 2048 and cfg.train.batch_size * cfg.train.grad_accum * 64 == 2048


def test_the_json_goes_into_a_folder_made_for_it(tmp_path):
    run_plan(load_config(None, NINETY_M), Target(64, "gpu", 80 * GIB, 128 * GIB), 2048, str(tmp_path / "new" / "ds.json"))
    assert json.loads((tmp_path / "new" / "ds.json").read_text())["zero_optimization"]["stage"] == 0


def test_plan_cli_refuses_a_batch_the_ranks_cannot_split(cli, tmp_path):
    result = cli("plan", "--device", "cpu", "--ranks", "3", "--global-batch", "8", cwd=tmp_path)
    cli.user_error(result, "global batch (8) must be a multiple of the 3 rank(s)", "--global-batch 6")


@pytest.mark.parametrize("flag, says", [
    (["--gpu-mem", "0"], "argument --gpu-mem: expected a finite number above 0, got 0"),
    (["--gpu-mem", "-5"], "argument --gpu-mem: expected a finite number above 0, got -5"),
    (["--gpu-mem", "nan"], "argument --gpu-mem: expected a finite number above 0, got nan"),
    (["--cpu-mem", "inf"], "argument --cpu-mem: expected a finite number above 0, got inf"),
])
def test_plan_cli_refuses_memory_that_is_not_a_positive_number(cli, tmp_path, flag, says):
    cli.user_error(cli("plan", *flag, cwd=tmp_path), says)


def test_prediction_matches_deepspeed_at_two_ranks():
    """Predicted vs measured bytes per rank, stages 0-3, a 1.5M model on 2 CPU ranks (one launch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-m", "bench.plan_accuracy", "--sizes", "small"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"bench": "plan_accuracy"')]
    assert [r["stage"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert abs(r["total_error"]) <= 0.10, r
        for key in ("params", "optimizer", "activations"):
            assert abs(r[f"{key}_predicted_bytes"] / r[f"{key}_bytes"] - 1) <= 0.05, (key, r)
