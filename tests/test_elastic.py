"""Checkpoints resumed on another rank count, ZeRO stage or backend: the real engine, 2 CPU ranks, 3 launches.

Every source trains 4 steps uninterrupted with a checkpoint at step 2; each resume starts from that
step-2 checkpoint (``train.resume=PATH``) in a folder of its own and trains steps 3 and 4. The sampler
keeps the epoch's global order, so rank 0 of a resumed run draws, at step 3, the very samples rank 0
of the uninterrupted run drew: its step-3 loss is the saved weights' loss on them, whatever the rank
count. The learning rate is high and has no warm-up, so that a lost Adam moment or step changes the
step-4 loss far beyond the tolerances.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from seemore_ds.__main__ import main
from seemore_ds.ds_files import OPTIMIZER_SHARDS_GLOB
from tests.test_deepspeed import LAUNCH_TIMEOUT_S, REPO, TINY, launch, loss_rows

FAST = [*TINY, "train.lr=1e-2", "train.warmup_steps=0", "train.max_steps=4"]
STAGES = {"zero0": "ds_configs/zero0.json", "zero1": "ds_configs/zero1.json", "zero2": "ds_configs/zero2.json",
          "zero3": "ds_configs/zero3.json", "zero2_offload": "ds_configs/zero2_offload.json"}
BF16 = ("zero1", "train.precision=bf16")  # written at 2 ranks, resumed at 1, against its own uninterrupted run
FROM_TORCH = ("zero0", "zero2", "zero3")  # torch -> deepspeed at 2 ranks
STAGE_CHANGES = {"zero2_to_zero3": ("zero2", "zero3"), "zero3_to_zero1": ("zero3", "zero1")}  # at 2 ranks
SAME = 1e-5  # one engine against another on the same weights, moments and samples (reduction order apart)


def step2(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_000002"


def run_in_one_process(plan: list[list[str]], tmp: Path, name: str) -> subprocess.CompletedProcess:
    """The plan's commands in one process without a launcher: a one-rank world, as on a laptop."""
    plan_file = tmp / f"{name}.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "tests.ds_helpers", str(plan_file)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def train(out: Path, stage: str | None, *extra: str) -> list[str]:
    """``train`` as a user types it: DeepSpeed with a stage's JSON, or the engine-free backend (stage None)."""
    backend = ["train.backend=torch"] if stage is None else ["train.backend=deepspeed", "--deepspeed_config", STAGES[stage]]
    return ["train", *FAST, f"run.output_dir={out}", *extra, *backend]


@pytest.fixture(scope="module")
def elastic():
    tmp = Path(tempfile.mkdtemp(prefix="seemore-ds-elastic-"))
    try:
        yield from _write_and_resume(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_and_resume(tmp: Path):
    assert main(train(tmp / "w1" / "torch", None)) == 0  # the engine-free backend, this process
    first = [train(tmp / "w2" / s, s) for s in STAGES] + [train(tmp / "w2" / "bf16", BF16[0], BF16[1])]
    first += [train(tmp / "torch_to" / s, s, f"train.resume={step2(tmp / 'w1' / 'torch')}") for s in FROM_TORCH]
    a = launch(first, tmp, "write_at_2")
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]

    one = [train(tmp / "w1" / s, s) for s in STAGES]
    one += [train(tmp / "to1" / s, s, f"train.resume={step2(tmp / 'w2' / s)}") for s in STAGES]
    one += [train(tmp / "to_torch" / s, None, f"train.resume={step2(tmp / 'w2' / s)}") for s in STAGES]
    one += [train(tmp / "to1" / "bf16", BF16[0], BF16[1], f"train.resume={step2(tmp / 'w2' / 'bf16')}")]
    b = run_in_one_process(one, tmp, "at_1")
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]

    second = [train(tmp / "to2" / s, s, f"train.resume={step2(tmp / 'w1' / s)}") for s in STAGES]
    second += [train(tmp / "stage" / name, target, f"train.resume={step2(tmp / 'w2' / source)}")
               for name, (source, target) in STAGE_CHANGES.items()]
    c = launch(second, tmp, "resume_at_2")
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-3000:]
    yield tmp, a.stdout + b.stdout + c.stdout


def losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train_loss"]) for r in loss_rows(run_dir)}


def assert_resumed(out: str, resumed: Path, source: Path) -> None:
    """It said it resumed through the universal form, and went on training from step 2 to 4."""
    checkpoint = step2(source)
    assert f"converting {checkpoint} (" in out or f"resuming {checkpoint} (" in out, checkpoint
    assert f"resuming from {checkpoint} at step 2" in out
    assert sorted(losses(resumed)) == [3, 4]


@pytest.mark.parametrize("stage", STAGES)
def test_written_at_2_ranks_resumes_at_1_from_the_saved_weights_and_moments(elastic, stage):
    tmp, out = elastic
    source, resumed, on_torch = tmp / "w2" / stage, tmp / "to1" / stage, tmp / "to_torch" / stage
    assert_resumed(out, resumed, source)
    assert_resumed(out, on_torch, source)
    # Step 3: rank 0's samples of the uninterrupted run, on the saved weights.
    assert abs(losses(resumed)[3] - losses(source)[3]) <= SAME
    # Step 4 follows one update from the loaded moments: the engine and the engine-free backend agree.
    for step in (3, 4):
        assert abs(losses(resumed)[step] - losses(on_torch)[step]) <= SAME, (step, losses(resumed), losses(on_torch))


def test_bf16_written_at_2_ranks_resumes_at_1_from_its_fp32_master_weights(elastic):
    tmp, out = elastic
    source, resumed = tmp / "w2" / "bf16", tmp / "to1" / "bf16"
    assert_resumed(out, resumed, source)
    assert abs(losses(resumed)[3] - losses(source)[3]) <= SAME  # the bf16 copy of the same fp32 master weights


@pytest.mark.parametrize("stage", STAGES)
def test_written_at_1_rank_resumes_at_2_from_the_saved_weights(elastic, stage):
    tmp, out = elastic
    source, resumed = tmp / "w1" / stage, tmp / "to2" / stage
    assert_resumed(out, resumed, source)
    assert abs(losses(resumed)[3] - losses(source)[3]) <= SAME
    assert "rng: rank 1 new" in out


def test_torch_checkpoint_resumes_under_every_stage_alike(elastic):
    """Stage 0 loads by plain ``load_state_dict``, stages 2-3 through DeepSpeed's universal loader: same losses."""
    tmp, out = elastic
    source = tmp / "w1" / "torch"
    runs = {s: losses(tmp / "torch_to" / s) for s in FROM_TORCH}
    for stage in FROM_TORCH:
        assert_resumed(out, tmp / "torch_to" / stage, source)
        assert abs(runs[stage][3] - losses(source)[3]) <= SAME
        assert abs(runs[stage][4] - runs["zero0"][4]) <= SAME, runs


@pytest.mark.parametrize("name", STAGE_CHANGES)
def test_stage_change_at_the_same_rank_count_matches_the_uninterrupted_run(elastic, name):
    tmp, out = elastic
    source = tmp / "w2" / STAGE_CHANGES[name][0]
    assert_resumed(out, tmp / "stage" / name, source)
    for step in (3, 4):
        assert abs(losses(tmp / "stage" / name)[step] - losses(source)[step]) <= 1e-4


@pytest.mark.parametrize("stage", ["zero0", "zero1", "zero2", "zero2_offload", "bf16"])
def test_conversion_keeps_every_weight_and_moment_bit_for_bit(elastic, stage):
    """The universal form against DeepSpeed's own shards, read here independently of its converter."""
    tmp, _ = elastic
    folder = step2(tmp / "w2" / stage)
    saved = shard_moments(folder)
    assert saved, "nothing compared"
    for name, moments in saved.items():
        for key, expected in moments.items():
            converted = torch.load(folder / "universal" / "zero" / name / f"{key}.pt", weights_only=True)["param"]
            assert torch.equal(converted.flatten(), expected), (stage, name, key)
    some = next(iter(saved.values()))
    assert some["exp_avg"].abs().sum() > 0 and some["exp_avg_sq"].abs().sum() > 0


def shard_moments(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {fp32, exp_avg, exp_avg_sq} as 1-D tensors, from the files DeepSpeed wrote at stages 0-2."""
    from seemore_ds.safe_pickles import weights_only_loads

    with weights_only_loads(folder):
        states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu")
        shards = [torch.load(p, map_location="cpu") for p in sorted(folder.glob(OPTIMIZER_SHARDS_GLOB))]
    if not shards:  # stage 0: a whole torch AdamW; parameters numbered as its groups list them
        order = [name for group in states["param_shapes"] or [] for name in group] or _stage0_order(folder, states)
        return {name: {k: states["optimizer"]["state"][i][k].flatten() for k in ("exp_avg", "exp_avg_sq")}
                for i, name in enumerate(order)}
    found: dict[str, dict[str, list]] = {}
    for shard in shards:  # ranks in order; each holds a fragment of every group's flat state
        sd = shard["optimizer_state_dict"]
        for group, mapping in enumerate(sd["param_slice_mappings"]):
            state = sd["base_optimizer_state"]["state"][group]
            flat = {"fp32": sd["single_partition_of_fp32_groups"][group], **{k: state[k] for k in ("exp_avg", "exp_avg_sq")}}
            for name, fragment in mapping.items():
                for key, tensor in flat.items():
                    found.setdefault(name, {}).setdefault(key, []).append(tensor.narrow(0, fragment.start, fragment.numel))
    return {name: {key: torch.cat(parts) for key, parts in moments.items()} for name, moments in found.items()}


def _stage0_order(folder: Path, states: dict) -> list[str]:
    from seemore_ds.checkpoint import load_checkpoint_config
    from seemore_ds.model import SeemoreVLM
    from seemore_ds.tokenizer import CharTokenizer
    from seemore_ds.universal import group_names

    cfg = load_checkpoint_config(folder)
    model = SeemoreVLM(cfg.model, CharTokenizer.load(folder / "tokenizer.json").vocab_size)
    return [name for group in group_names(model, cfg.train.weight_decay) for name in group]


@pytest.mark.parametrize("stage", STAGES)
def test_generate_and_eval_on_a_deepspeed_checkpoint_match_its_export(elastic, stage, capsys, tmp_path):
    """No export step needed: the checkpoint is consolidated on read, to the very weights export writes."""
    tmp, _ = elastic
    checkpoint, export, pngs = step2(tmp / "w2" / stage), tmp_path / "export", tmp_path / "pngs"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(export)]) == 0
    assert main(["data", "synth", "--out", str(tmp_path / "s.csv"), "--n", "3", "--size", "16", "--png-dir", str(pngs)]) == 0
    images = sorted(str(p) for p in pngs.iterdir())
    outputs = []
    for source in (checkpoint, export):
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(source), "--image", *images]) == 0
        assert main(["eval", "--checkpoint", str(source), "--json"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == len(images) + 1
