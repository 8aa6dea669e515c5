"""Every adaptation of DeepSpeed and torch (backends/deepspeed_compat.py, backends/torch_compat.py) against the
real library: each test fails when the library stops doing what the adaptation relies on.

One fresh process (no launcher, as ``python -m seemore_ds train`` on a laptop) pays DeepSpeed's start-up
once for the engine-level checks and runs two trainings in a row, as a notebook or a sweep does.
"""

from __future__ import annotations

import fractions
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seemore_ds.backends import deepspeed_compat as compat
from seemore_ds.backends import torch_compat
from seemore_ds.errors import UserError
from tests.conftest import REPO, TINY

ENGINE_CHECKS = r"""
import contextlib, copy, io, json, os, sys
from pathlib import Path

import torch
import yaml

from seemore_ds import launching, step_guard
from seemore_ds.backends import deepspeed_compat as compat, resolve_backend_name
from seemore_ds.config import load_config
from seemore_ds.trainer import train

out, tiny = Path(sys.argv[1]), json.loads(sys.argv[2])
facts = {}
compat.prepare_environment(torch.device("cpu"))
facts["launched_after_stand_in"] = launching.launched_by_deepspeed()
os.environ["LOCAL_SIZE"] = "1"  # as the launcher sets it: shm_comm maps buffers only where all ranks are local
import deepspeed

deepspeed.init_distributed(dist_backend="gloo")
torch.distributed.barrier()  # past it, shm_comm has created (and mapped) this rank's buffer
port = os.environ["MASTER_PORT"]
facts["shm_buffers_before_unlink"] = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
facts["shm_buffer_we_name"] = compat.shared_allreduce_buffer(0).name
compat.unlink_shared_allreduce_buffer(0)
facts["shm_buffers_after_unlink"] = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
facts["deepspeed_logger"] = deepspeed.utils.logger.name
facts["shm_comm_loaded_from"] = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                                 if line.endswith("/deepspeed_shm_comm.so")][:1]
facts["op_build_root"] = str(compat.op_build_root())


def tiny_engine(adapted):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config={"train_batch_size": 1, "wall_clock_breakdown": True})
    if adapted:
        compat.quiet_engine_timers(engine)
        compat.skip_nonfinite_updates(engine.optimizer)
    return engine


def step(engine, value):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        loss = engine(torch.full((1, 2), value)).sum()
        engine.backward(loss)
        engine.step()
    return printed.getvalue()


def weights(engine):
    return [p.detach().clone() for p in engine.module.parameters()]


facts["plain_engine_prints_timers"] = "time (ms)" in step(tiny_engine(False), 1.0)
engine = tiny_engine(True)
before = weights(engine)
facts["adapted_engine_prints_timers"] = "time (ms)" in step(engine, float("nan"))
facts["skipped_after_nan"] = engine.skipped_steps
facts["nan_left_weights"] = all(torch.equal(a, b) for a, b in zip(before, weights(engine)))
step(engine, 1.0)
facts["skipped_after_finite"] = engine.skipped_steps
facts["finite_changed_weights"] = not all(torch.equal(a, b) for a, b in zip(before, weights(engine)))
with compat.loading_universal(engine):
    facts["universal_inside"] = engine.load_universal_checkpoint()
facts["universal_after"] = engine.load_universal_checkpoint()

# Two runs in one process: the first, on the engine, must not make the second look launched.
# A JSON value adopted for a key left at its default lands in the run's saved config, never in the caller's.
(out / "ds.json").write_text(json.dumps({"gradient_clipping": 0.5}))
engine_cfg = load_config(None, [*tiny, "train.backend=deepspeed", "train.max_steps=1", f"run.output_dir={out / 'engine'}",
                                f"train.deepspeed_config={out / 'ds.json'}"])
as_loaded = copy.deepcopy(engine_cfg)
train(engine_cfg)
facts["caller_config_unchanged"] = engine_cfg == as_loaded
facts["saved_grad_clip"] = yaml.safe_load((out / "engine" / "config.yaml").read_text())["train"]["grad_clip"]
facts["launched_after_engine_run"] = launching.launched_by_deepspeed()
second = load_config(None, [*tiny, "train.backend=auto", "train.max_steps=1", f"run.output_dir={out / 'auto'}"])
facts["second_run_backend"] = resolve_backend_name(second)
train(second)
facts["resume_command"] = step_guard.resume_command(1)
print("FACTS " + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def engine_facts(tmp_path_factory) -> dict:
    """What the real engine did with and without the adaptations, in a process no launcher started."""
    out = tmp_path_factory.mktemp("compat")
    env = {name: value for name, value in os.environ.items()
           if name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    tiny = [o for o in TINY if not o.startswith(("train.backend=", "train.device="))]
    result = subprocess.run([sys.executable, "-c", ENGINE_CHECKS, str(out), json.dumps(tiny)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("FACTS ")]
    assert result.returncode == 0 and lines, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("FACTS "))


def test_the_shared_memory_name_we_unlink_is_the_one_deepspeed_creates(engine_facts):
    """Checked by real use: after init_distributed the file exists under the name we build, and only it."""
    assert engine_facts["shm_buffers_before_unlink"] == [engine_facts["shm_buffer_we_name"]]
    assert engine_facts["shm_buffers_after_unlink"] == []


def test_the_op_build_folder_we_name_is_the_one_deepspeed_loads_its_ops_from(engine_facts):
    [shm_comm] = engine_facts["shm_comm_loaded_from"]
    assert Path(shm_comm).parent.parent == Path(engine_facts["op_build_root"])


def test_a_lock_older_than_any_build_is_named_with_its_fix_and_left_in_place(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert compat.op_build_root() == tmp_path
    left_behind, building = tmp_path / "cpu_adam" / "lock", tmp_path / "deepspeed_shm_comm" / "lock"
    for lock in (left_behind, building):
        lock.parent.mkdir()
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(left_behind, (an_hour_ago, an_hour_ago))
    compat.report_stale_op_build_locks()
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{left_behind} is 60 min old: loading DeepSpeed's cpu_adam op waits for it to go")
    assert line.endswith("if no process is building that op, delete the file")
    assert left_behind.exists() and building.exists()


def test_the_engine_prints_timers_unless_quietened(engine_facts):
    assert engine_facts["plain_engine_prints_timers"], "DeepSpeed no longer prints timers: drop quiet_engine_timers"
    assert not engine_facts["adapted_engine_prints_timers"]


def test_the_engine_skips_an_update_its_optimizer_calls_an_overflow(engine_facts):
    assert engine_facts["skipped_after_nan"] == 1 and engine_facts["nan_left_weights"]
    assert engine_facts["skipped_after_finite"] == 1 and engine_facts["finite_changed_weights"]


def test_the_engine_reads_the_universal_flag_we_set_and_clear(engine_facts):
    assert engine_facts["universal_inside"] is True and engine_facts["universal_after"] is False


def test_the_logger_we_quieten_is_deepspeeds(engine_facts):
    assert engine_facts["deepspeed_logger"] == "DeepSpeed"


def test_a_second_run_in_one_process_is_not_taken_for_a_launched_one(engine_facts):
    """The one-rank world written for the engine run reads as no launcher's, in that run and the next."""
    assert engine_facts["launched_after_stand_in"] is False
    assert engine_facts["launched_after_engine_run"] is False
    assert engine_facts["second_run_backend"] == "torch"  # auto: no launcher, no GPU, no DeepSpeed JSON
    assert engine_facts["resume_command"].startswith("python -m seemore_ds ")


def test_the_engine_adopts_json_values_into_its_own_copy_of_the_config(engine_facts):
    assert engine_facts["caller_config_unchanged"]
    assert engine_facts["saved_grad_clip"] == 0.5


def test_a_launcher_started_process_still_reads_as_launched(monkeypatch):
    from seemore_ds import launching

    monkeypatch.setattr(launching, "_written_without_launcher", {})
    # A copy of the environment for this test alone: stand_in_for_launcher writes into os.environ itself,
    # and what it wrote must not reach the later tests' subprocesses (a WORLD_SIZE without a MASTER_PORT
    # sends DeepSpeed looking for MPI).
    monkeypatch.setattr(os, "environ", {name: value for name, value in os.environ.items()
                                        if name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")})
    monkeypatch.setenv("MASTER_PORT", "29611")  # a port set by hand is kept
    launching.stand_in_for_launcher()
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"] == "29611"
    assert not launching.launched_by_deepspeed()
    # What a launcher sets for the processes it starts differs from what was written here.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launching.launched_by_deepspeed()


def test_the_replaced_timer_log_has_the_signature_we_accept():
    from deepspeed.utils.timer import SynchronizedWallClockTimer

    assert list(inspect.signature(SynchronizedWallClockTimer.log).parameters)[1:] == compat.TIMERS_LOG_PARAMETERS


def test_the_installed_deepspeed_is_one_every_adaptation_was_written_for():
    """A new DeepSpeed fails here first: recheck each adaptation against it, then widen its range."""
    version = compat.deepspeed_version()
    ranges = {name: value for name, value in vars(compat).items() if name.endswith("_WRITTEN_FOR")}
    assert ranges and all(version in spec for spec in ranges.values()), (version, ranges)


def test_outside_its_range_an_adaptation_warns_in_one_line_and_still_runs(monkeypatch, tmp_path):
    from packaging.version import Version

    monkeypatch.setattr(compat, "deepspeed_version", lambda: Version("0.25.0"))
    with pytest.warns(compat.DeepSpeedVersionWarning) as warned:
        compat.unlink_shared_allreduce_buffer(rank=987654)
    message = str(warned[0].message)
    assert "\n" not in message and "0.25.0" in message and f"pip install 'deepspeed{compat.SHM_NAME_WRITTEN_FOR}'" in message


def test_deepspeeds_checkpoint_loader_unpickles_only_plain_data_inside_weights_only_loads(tmp_path, monkeypatch):
    """DeepSpeed's loader passes weights_only=False itself; only the compat switch makes it refuse code."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from seemore_ds.safe_pickles import weights_only_loads

    path = tmp_path / "states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": fractions.Fraction(1, 3)}, path)
    assert TorchCheckpointEngine().load(str(path))["extra"] == fractions.Fraction(1, 3)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    with pytest.raises(UserError, match="cannot be loaded as plain data"):
        with weights_only_loads(tmp_path):
            TorchCheckpointEngine().load(str(path))
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is put back


def test_the_fused_adamw_leaves_everything_as_it_was_when_told_to_skip():
    """torch's fused AdamW honours found_inf: weights, moments and step count stay; else it steps."""
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    weight.grad = torch.full((4,), 0.5)
    optimizer.step()
    state = {k: v.clone() for k, v in optimizer.state[weight].items()}
    before = weight.detach().clone()

    torch_compat.fused_step_unless(optimizer, torch.tensor(True))
    assert torch.equal(weight, before) and all(torch.equal(v, optimizer.state[weight][k]) for k, v in state.items())
    assert not hasattr(optimizer, "found_inf")

    torch_compat.fused_step_unless(optimizer, torch.tensor(False))
    assert not torch.equal(weight, before) and optimizer.state[weight]["step"] == state["step"] + 1


def test_the_installed_torch_is_one_the_found_inf_step_was_written_for():
    """A new torch fails here first: rerun the test above against it, then widen the range."""
    from packaging.version import Version

    assert Version(torch.__version__.split("+")[0]) in torch_compat.FOUND_INF_WRITTEN_FOR
