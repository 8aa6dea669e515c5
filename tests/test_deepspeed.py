"""The DeepSpeed backend with the real engine and the real launcher: 2 CPU ranks over gloo.

Two launches carry most of the suite (start-up and the one-time JIT builds are paid once):
the first trains every scenario uninterrupted and, beside it, halfway with a checkpoint; the
second resumes the halfway runs with train.resume=auto. The tests then compare losses_log.csv,
export every resumed run and evaluate the exports with the CLI, as a user would.
"""

from __future__ import annotations

import csv
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
from seemore_ds.backends.ds_config import resolve_ds_config
from seemore_ds.config import load_config
from seemore_ds.errors import UserError
from seemore_ds.launching import free_port
from tests.conftest import settled_running_stats, trained_text_len

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
TINY = ["model.img_size=16", "model.patch_size=8", "model.image_embed_dim=32", "model.n_embd=32", "model.n_layer=1",
        "model.num_blks=1", "model.n_head=2", "data.synth_n=64", "train.batch_size=4", "log.every=1",
        "log.progress=false", "eval.every=0", "checkpoint.every=2", "train.precision=fp32"]
HALF, FULL = 2, 4
LAUNCH_TIMEOUT_S = 600  # generous: the first launch on a fresh machine JIT-builds shm_comm and cpu_adam (~5 min here)

# Configs as the Hugging Face Trainer (and LLaVA's scripts/) ship them, unchanged.
HF_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto"},
}
HF_ZERO3 = {
    **{k: v for k, v in HF_ZERO2.items() if k != "zero_optimization"},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
}
HF_ZERO3_OFFLOAD = {
    "fp16": HF_ZERO2["fp16"],
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "offload_param": {"device": "cpu", "pin_memory": False}, "overlap_comm": True, "contiguous_gradients": True,
        "sub_group_size": 1e9, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "steps_per_print": 1e5,
    "wall_clock_breakdown": False,
}
HF_WARMUP_DECAY = {**HF_ZERO2, "scheduler": {"type": "WarmupDecayLR", "params": {
    "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto"}}}

# name -> (DeepSpeed config, extra overrides); every one trains 2 ranks, checkpoints, resumes, exports.
SCENARIOS = {
    "zero0": ("ds_configs/zero0.json", []),
    "zero1": ("ds_configs/zero1.json", []),
    "zero2_accum": ("ds_configs/zero2.json", ["train.grad_accum=2"]),
    "zero3": ("ds_configs/zero3.json", []),
    "zero2_offload": ("ds_configs/zero2_offload.json", []),
    "hf_zero3_offload": ("HF_ZERO3_OFFLOAD", []),
    "zero1_bf16": ("ds_configs/zero1.json", ["train.precision=bf16"]),
}


def launch(plan: list[list[str]], tmp: Path, name: str, timeout_s: int = LAUNCH_TIMEOUT_S, ranks: int = 2,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the plan's commands under ``deepspeed --num_gpus RANKS`` (CPU ranks), with ``env`` added to the
    environment; never hangs past the timeout."""
    plan_file = tmp / f"{name}.json"
    plan_file.write_text(json.dumps(plan))
    # One thread per rank: two ranks share two cores.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    port = free_port()
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), "--module", "tests.ds_helpers", str(plan_file)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    # DeepSpeed's shm_comm names a 66 MB buffer per rank in /dev/shm after the port and never removes it;
    # the backend unlinks them once mapped, so none outlives its launch, even one whose ranks were killed.
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"shared memory left behind by the launch: {left}"
    return result


def cli(args: list[str], timeout_s: int = 300) -> subprocess.CompletedProcess:
    """``python -m seemore_ds ARGS`` in a fresh process, as a user runs it."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "seemore_ds", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def loss_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "losses_log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def runs():
    """Every scenario trained uninterrupted (full/) and halfway-then-resumed (resumed/), in two launches."""
    # Not under pytest's basetemp: a concurrent pytest session may prune it while these launches run.
    tmp = Path(tempfile.mkdtemp(prefix="seemore-ds-test-"))
    try:
        yield from _train_scenarios(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train_scenarios(tmp: Path):
    (tmp / "HF_ZERO3_OFFLOAD").write_text(json.dumps(HF_ZERO3_OFFLOAD, indent=2))

    def train_args(name, steps, folder, *extra):
        ds_config, overrides = SCENARIOS[name]
        ds_config = str(tmp / ds_config) if ds_config.startswith("HF_") else ds_config
        # Dropout draws from every rank's generators at every step: a resume that lost their states differs.
        return ["train", *TINY, "model.dropout=0.05", *overrides, *extra, f"train.max_steps={steps}",
                f"run.output_dir={tmp / name / folder}", "--deepspeed_config", ds_config]

    first = [train_args(n, FULL, "full") for n in SCENARIOS] + [train_args(n, HALF, "resumed") for n in SCENARIOS]
    result = launch(first, tmp, "first")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    second = [train_args(n, FULL, "resumed", "train.resume=auto") for n in SCENARIOS]
    result = launch(second, tmp, "second")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from {tmp / 'zero3' / 'resumed' / 'checkpoints' / 'step_000002'} at step 2" in result.stdout
    yield tmp


@pytest.mark.parametrize("name", SCENARIOS)
def test_resumed_run_matches_uninterrupted(runs, name):
    full, resumed = loss_rows(runs / name / "full"), loss_rows(runs / name / "resumed")
    assert [int(r["step"]) for r in full] == [int(r["step"]) for r in resumed] == list(range(1, FULL + 1))
    tolerance = 1e-4
    for a, b in zip(full, resumed):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= tolerance, (name, a, b)
        assert float(a["grad_norm"]) > 0 and a["lr"] == b["lr"]
    assert float(full[-1]["lr"]) > 0  # DeepSpeed's WarmupLR starts at warmup_min_lr=0
    assert abs(float(full[-1]["val_loss"]) - float(resumed[-1]["val_loss"])) <= tolerance
    assert all(r["skipped_steps"] == "0" and r["loss_scale"] == "" for r in full)  # no fp16: no scale, no skips


@pytest.mark.parametrize("name", SCENARIOS)
def test_checkpoint_is_sharded_per_rank_and_export_matches_engine(runs, name, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_dir = runs / name / "resumed"
    checkpoint = run_dir / "checkpoints" / f"step_{FULL:06d}"
    assert sorted(p.name for p in (checkpoint / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]  # each rank's generators
    stage = int(name[4]) if name.startswith("zero") else 3
    if stage > 0:  # each rank's optimizer shard
        assert len(list(checkpoint.glob("*zero_pp_rank_1_*optim_states.pt"))) == 1
    out = runs / name / "export"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    assert {"model.safetensors", "config.yaml", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    engine_val = float(loss_rows(run_dir)[-1]["val_loss"])
    # bf16: the engine evaluates its bf16 weights, the export holds the fp32 master weights.
    tolerance = 2e-2 if name.endswith("bf16") else 1e-5
    assert abs(exported["val_loss"] - engine_val) <= tolerance, (exported, engine_val)
    # Every rank settled BatchNorm's statistics on the same images; the export holds them.
    saved, settled = settled_running_stats(out / "config.yaml", out / "model.safetensors")
    torch.testing.assert_close(saved, settled, atol=tolerance, rtol=tolerance)


def test_hf_style_config_in_one_process_matches_the_engine_free_backend(tmp_path):
    """No launcher: the backend makes its own one-rank world; an all-"auto" HF ZeRO-2 config trains
    with gradient accumulation exactly as the engine-free backend does (same AdamW, schedule, clipping).

    Where the optimizer's settings show: past warm-up into the cosine decay, at an lr large enough to move,
    with a gradient clip that binds at every step and a weight decay large enough to count, so that one
    backend dropping the no-decay groups, the clip or the schedule changes the losses. Adam divides out
    the scale of the gradients, clipped or not, unless eps is comparable to them: eps=1e-3 lets the clip show."""
    config = tmp_path / "zero2.json"
    config.write_text(json.dumps(HF_ZERO2, indent=4))
    same = [*TINY, "train.max_steps=6", "train.warmup_steps=2", "train.lr=0.02", "train.grad_clip=0.1",
            "train.weight_decay=0.5", "train.eps=1e-3", "train.grad_accum=2", "train.device=cpu", "train.precision=fp32"]
    result = cli(["train", *same, "train.backend=deepspeed", f"run.output_dir={tmp_path / 'engine'}",
                  "--deepspeed_config", str(config)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DeepSpeedBackend on cpu x 1" in result.stdout
    assert main(["train", *same, "train.backend=torch", f"run.output_dir={tmp_path / 'torch'}"]) == 0
    engine, plain = loss_rows(tmp_path / "engine"), loss_rows(tmp_path / "torch")
    assert len(engine) == len(plain) == 6
    for a, b in zip(engine, plain):
        for key in ("train_loss", "grad_norm", "lr"):
            assert abs(float(a[key]) - float(b[key])) <= 1e-5, (key, a, b)
    rates = [float(r["lr"]) for r in plain]
    assert rates.index(max(rates)) == 2 and rates[-1] < rates[2]  # warm-up over at step 3, then the decay
    assert all(float(r["grad_norm"]) > 0.1 for r in plain)  # the clip binds at every step


def test_a_process_keeps_its_process_group_across_runs_and_leaves_it_at_exit(tmp_path):
    """Torch asks every rank to destroy its process group before it exits; a process that holds several runs
    shares one."""
    script = (
        "import atexit, sys, torch\n"
        "from seemore_ds.__main__ import main\n"
        "from seemore_ds.launching import end_process\n"
        # registered before the backend's own exit handler (which destroys the group), so it runs after it
        "atexit.register(lambda: print('at exit, group left:', not torch.distributed.is_initialized(), flush=True))\n"
        "codes = [main([*sys.argv[1:], f'run.output_dir=run-{i}']) for i in range(2)]\n"
        "print('between runs, group kept:', torch.distributed.is_initialized(), codes, flush=True)\n"
        "end_process(0)\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script, "train", *TINY, "train.max_steps=1", "train.backend=deepspeed"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "between runs, group kept: True [0, 0]" in result.stdout
    assert result.stdout.splitlines()[-1] == "at exit, group left: True"


def test_error_on_one_rank_ends_every_rank(runs, tmp_path):
    """Rank 1 cannot read its optimizer shard while rank 0 loads on: the launcher ends both, no hang."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "zero1" / "resumed", run_dir)
    (shard,) = (run_dir / "checkpoints" / f"step_{FULL:06d}").glob("zero_pp_rank_1_*optim_states.pt")
    shard.write_bytes(b"not a checkpoint")
    # Without its manifest the checkpoint loads unverified (as one of an older seemore-ds would), so the
    # damage is met by rank 1 alone instead of being caught by every rank before loading.
    (shard.parent / "manifest.json").unlink()
    plan = [["train", *TINY, "train.resume=auto", f"train.max_steps={FULL + 2}", f"run.output_dir={run_dir}",
             "--deepspeed_config", "ds_configs/zero1.json"]]
    result = launch(plan, tmp_path, "one_rank_fails", timeout_s=180)
    assert result.returncode != 0
    assert "Killing subprocess" in result.stdout + result.stderr


def test_fp16_on_cpu_ends_both_ranks_with_one_line(tmp_path):
    plan = [["train", *TINY, "train.max_steps=2", "train.precision=fp16", f"run.output_dir={tmp_path / 'run'}",
             "--deepspeed_config", "ds_configs/zero2.json"]]
    result = launch(plan, tmp_path, "fp16", timeout_s=180)
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert lines and all("use train.precision=bf16" in line for line in lines)


def write_json(tmp_path: Path, tree) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(tree) if not isinstance(tree, str) else tree)
    return str(path)


def run_cli_in_process(tmp_path, capsys, ds_config: str, *overrides) -> tuple[int, list[str]]:
    code = main(["train", *TINY, "train.max_steps=1", "train.backend=deepspeed", f"run.output_dir={tmp_path / 'run'}",
                 *overrides, "--deepspeed_config", ds_config])
    return code, error_lines(capsys.readouterr().err)


def test_contradicting_json_is_refused_naming_both(tmp_path, capsys):
    ds = write_json(tmp_path, {**HF_ZERO2, "bf16": {"enabled": True}})
    code, (line,) = run_cli_in_process(tmp_path, capsys, ds, "train.precision=fp32")
    assert code == 2 and "bf16.enabled=true contradicts train.precision=fp32" in line


def test_impossible_batch_triple_is_refused_with_the_fix(tmp_path, capsys):
    ds = write_json(tmp_path, {**HF_ZERO2, "train_batch_size": 32})
    code, (line,) = run_cli_in_process(tmp_path, capsys, ds, "train.grad_accum=1")
    assert code == 2 and "train_batch_size=32 cannot hold" in line and "train.grad_accum=8" in line


def test_bad_json_names_file_and_line(tmp_path, capsys):
    ds = write_json(tmp_path, '{\n  "zero_optimization": {"stage": 2,}\n}\n')
    code, (line,) = run_cli_in_process(tmp_path, capsys, ds)
    assert code == 2 and ds in line and "line 2" in line


def test_hf_configs_resolve_every_auto_from_the_yaml():
    cfg = load_config(None, ["model.n_embd=64", "train.batch_size=8", "train.grad_accum=2", "train.precision=bf16",
                             "train.lr=3e-4", "train.max_steps=100", "train.warmup_steps=10"])
    z3, _ = resolve_ds_config(HF_ZERO3, cfg, world_size=4)
    assert (z3["train_micro_batch_size_per_gpu"], z3["gradient_accumulation_steps"], z3["train_batch_size"]) == (8, 2, 64)
    assert z3["bf16"]["enabled"] is True and z3["fp16"]["enabled"] is False
    zero = z3["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) \
        == (4096, 3686, 640)
    offload, _ = resolve_ds_config(HF_ZERO3_OFFLOAD, cfg, world_size=1)
    assert offload["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05}
    assert offload["gradient_clipping"] == 1.0
    decay = resolve_ds_config(HF_WARMUP_DECAY, cfg, world_size=1)[0]["scheduler"]["params"]
    assert decay == {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-4, "warmup_num_steps": 10, "total_num_steps": 100}
    for name in ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"):
        with open(REPO / "ds_configs" / f"{name}.json") as handle:
            resolved, _ = resolve_ds_config(json.load(handle), cfg, world_size=2)
        assert resolved["zero_optimization"]["stage"] == int(name[4])
        assert "auto" not in json.dumps(resolved)


@pytest.mark.parametrize("tree, message", [
    ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu=16 contradicts train.batch_size=8"),
    ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 contradicts train.grad_clip=1.0"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, "optimizer.params.lr=0.1 contradicts train.lr=0.001"),
    ({"fp16": {"enabled": True}}, "fp16.enabled=true contradicts train.precision=fp32"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}, "zero_optimization.allgather_bucket_size is \"auto\""),
])
def test_contradictions_and_unknown_autos_are_refused(tree, message):
    # Set by the user: a concrete JSON value must agree with each (keys left at their defaults adopt it).
    cfg = load_config(None, ["train.batch_size=8", "train.grad_clip=1.0", "train.lr=0.001", "train.precision=fp32"])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        resolve_ds_config(tree, cfg, world_size=2, source="x.json")


def test_flops_profiler_timers_and_mfu_under_two_rank_zero2(tmp_path, monkeypatch):
    """profile.flops_step under ZeRO-2 with accumulation: DeepSpeed's report agrees with the model's own
    FLOP count, the engine's timers fill timing_logs.csv without printing, MFU counts both ranks, and
    only rank 0 writes to W&B."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    run_dir = tmp_path / "run"
    plan = [["train", *TINY, "train.max_steps=3", "train.grad_accum=2", "profile.flops_step=2", "wandb.enabled=true",
             f"run.output_dir={run_dir}", "--deepspeed_config", "ds_configs/zero2.json"]]
    result = launch(plan, tmp_path, "flops")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("flops (DeepSpeed flops profiler") == 1 and "time (ms)" not in result.stdout

    report = (run_dir / "flops_profile.txt").read_text()
    units = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}

    def figure(label: str) -> float:
        value, *unit = next(line for line in report.splitlines() if line.startswith(label)).split(":", 1)[1].split()
        return float(value) * units[unit[0][0] if unit else ""]

    assert "Profile Summary at step 2" in report and figure("params per GPU") > 0
    cfg = load_config(str(run_dir / "config.yaml"))
    from seemore_ds.model import SeemoreVLM
    from seemore_ds.tokenizer import CharTokenizer

    model = SeemoreVLM(cfg.model, CharTokenizer.load(run_dir / "tokenizer.json").vocab_size)
    flops_per_sample = model.flops_per_sample(trained_text_len(run_dir))
    profiled_per_sample = 3 * figure("fwd flops per GPU") / cfg.train.batch_size  # one micro-batch's forward, x3
    assert abs(profiled_per_sample / flops_per_sample - 1) <= 0.10, (profiled_per_sample, flops_per_sample)

    timings = list(csv.DictReader(open(run_dir / "timing_logs.csv", newline="")))
    for row in timings:
        assert all(float(row[k]) > 0 for k in ("forward_s", "backward_s", "backward_allreduce_s", "optimizer_s")), row
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["samples"] == 3 * 4 * 2 * 2  # steps x batch_size x grad_accum x ranks
    # samples/s (which MFU is checked against below) is the step's samples over rank 0's logged step time.
    for row, timing in zip(loss_rows(run_dir), timings, strict=True):
        assert float(row["samples_per_s"]) == pytest.approx(4 * 2 * 2 / float(timing["step_s"]), rel=1e-4)
    for row in loss_rows(run_dir):
        expected = float(row["samples_per_s"]) * flops_per_sample / (summary["peak_tflops_per_device"] * 1e12 * 2)
        assert 0 < float(row["mfu"]) < 1 and float(row["mfu"]) == pytest.approx(expected, rel=1e-4)
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
