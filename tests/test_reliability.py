"""Runs that are signalled, killed mid-save, fed NaN losses or handed damaged and foreign checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from seemore_ds.__main__ import main
from seemore_ds.launching import free_port
from seemore_ds.manifest import MANIFEST_FILE, verify_checkpoint
from tests.conftest import REPO, read_csv_rows
from tests.test_deepspeed import DEEPSPEED, LAUNCH_TIMEOUT_S, launch, loss_rows
from tests.test_deepspeed import TINY as DS_TINY

LONG = ["train.max_steps=150", "log.every=1", "eval.every=0", "checkpoint.every=0", "train.precision=fp32"]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """``python -m seemore_ds ARGS`` in the background, as a job a scheduler may signal."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "seemore_ds", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout_s: float = 300, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"ended early with {process.returncode}: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll_s)


def logged_steps(run_dir: Path) -> int:
    log = run_dir / "losses_log.csv"
    return max(0, len(log.read_text().splitlines()) - 1) if log.is_file() else 0


def assert_same_losses(ours: list[dict], theirs: list[dict], tolerance: float) -> None:
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        for key in ("train_loss", "lr", "grad_norm"):
            assert abs(float(a[key]) - float(b[key])) <= tolerance, (key, a, b)


# --- preemption --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight_run(cli, tiny, tmp_path_factory) -> Path:
    """150 steps uninterrupted: the losses every signalled-and-resumed run must reproduce."""
    work = tmp_path_factory.mktemp("straight")
    straight = cli.ok(cli("train", *tiny, *LONG, "run.output_dir=straight", cwd=work))
    assert "done: 150 steps" in straight.stdout
    return work / "straight"


def stop_by_signal(name: str, tiny: list[str], tmp_path: Path) -> tuple[str, int]:
    """Train 150 steps into tmp_path/stopped, send ``name`` after step 5; checks the stop, returns (message, step)."""
    signum = getattr(signal, name)
    job = start(["train", *tiny, *LONG, "run.output_dir=stopped"], tmp_path)
    wait_for(lambda: logged_steps(tmp_path / "stopped") >= 5, job)
    job.send_signal(signum)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 128 + signum, (out, err)  # the shell's code for the signal, as if it had ended the job
    (line,) = err.strip().splitlines()
    assert line.startswith(f"stopped by {name} after step "), line
    stopped_at = int(line.split("after step ")[1].split(";")[0])
    assert 5 <= stopped_at < 150, line
    tag = f"step_{stopped_at:06d}"
    assert f"saved {Path('stopped', 'checkpoints', tag)}" in line
    checkpoints = tmp_path / "stopped" / "checkpoints"
    assert [p.name for p in checkpoints.glob("step_*")] == [tag]  # checkpoint.every=0: only the one the signal asked for
    verify_checkpoint(checkpoints / tag)
    assert logged_steps(tmp_path / "stopped") == stopped_at  # it finished the step it was in, and no other
    return line, stopped_at


def test_sigterm_saves_the_step_and_the_printed_command_resumes_to_the_same_losses(cli, tiny, straight_run, tmp_path):
    line, stopped_at = stop_by_signal("SIGTERM", tiny, tmp_path)
    resume = line.split("resume with: ")[1]
    assert resume.startswith("python -m seemore_ds train ") and resume.endswith(" train.resume=auto")
    resumed = cli.ok(cli(*shlex.split(resume)[3:], cwd=tmp_path))
    assert f"at step {stopped_at}" in resumed.stdout and "done: 150 steps" in resumed.stdout
    assert_same_losses(read_csv_rows(tmp_path / "stopped" / "losses_log.csv"),
                       read_csv_rows(straight_run / "losses_log.csv"), tolerance=1e-6)


@pytest.mark.parametrize("name", ["SIGINT", "SIGUSR1"])
def test_ctrl_c_and_slurms_early_warning_save_and_stop_alike(tiny, tmp_path, name):
    """SIGINT (Ctrl-C) and SIGUSR1 (``sbatch --signal=USR1@T``, ahead of the time limit) do what SIGTERM does."""
    stop_by_signal(name, tiny, tmp_path)


SIGNAL_SCRIPT = """
import os, signal, sys, time
from seemore_ds.preemption import REPEAT_WINDOW_S, StopSignals
with StopSignals() as signals:
    os.kill(os.getpid(), signal.SIG)
    os.kill(os.getpid(), signal.SIG)  # the same request by a second route, e.g. the launcher
    print("requested" if signals.requested else "missed", flush=True)
    time.sleep(REPEAT_WINDOW_S + 0.2)
    os.kill(os.getpid(), signal.SIG)
    time.sleep(5)
    print("still running", flush=True)
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_second_signal_ends_the_process_at_once(name):
    result = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT.replace("SIG)", f"{name})")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout == "requested\n", result.stderr
    assert result.returncode == -getattr(signal, name)


# --- the end of a rank ---------------------------------------------------------------------------

# Rank 0 leaves a collective to gloo's worker thread and drops its tensor, so that the thread must take the
# GIL to free the tensor's Python object once the collective ends. Its peer joins the collective during rank 0's
# last exit handler, which keeps the GIL (a long C call) until Python would begin finalizing.
ENDING_RANK_SCRIPT = """
import atexit, os, sys
exiting = os.path.join(sys.argv[3], "exiting")
# Registered before any library registers its own, so these are rank 0's last exit handlers, run last first.
atexit.register(print, "exit handlers ran")  # C code, as the next: left unflushed, for the process to flush
atexit.register(sum, range(10**8))  # one long C call that keeps the GIL until finalization begins
atexit.register(lambda: open(exiting, "w").close())  # the peer joins the collective now
import time, torch, torch.distributed as dist
from seemore_ds.launching import end_process
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
if rank == 1:
    while not os.path.exists(exiting):
        time.sleep(0.01)
    dist.all_reduce(torch.ones(4))
    time.sleep(600)  # ended by the test
class RunsPythonInFinalization:
    def __del__(self):  # where the waiting worker thread gets the GIL
        pass
keeper = RunsPythonInFinalization()
tensor = torch.ones(4)
dist.all_reduce(tensor, async_op=True)
del tensor
print("rank 0 done", flush=True)
end_process(0)
"""


def test_a_rank_whose_collective_ends_late_still_exits_cleanly(tmp_path):
    """A gloo worker thread that frees a collective's tensor during Python's finalization aborts the process
    (exit -6, "terminate called without an active exception"); a rank that ends through end_process runs its
    exit handlers and ends before finalization, with its own exit code."""
    port = str(free_port())
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # output left to flush
    ranks = [subprocess.Popen([sys.executable, "-c", ENDING_RANK_SCRIPT, str(rank), port, str(tmp_path)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        out, err = ranks[0].communicate(timeout=120)
    finally:
        ranks[1].kill()
        ranks[1].wait()
    assert (ranks[0].returncode, out) == (0, "rank 0 done\nexit handlers ran\n"), err[-2000:]
    assert "terminate called" not in err


# --- crash-proof saves -------------------------------------------------------------------------

# Big enough (3.3M parameters, ~40 MB per checkpoint) that a save takes a while on any machine.
SLOW_SAVE = ["model.n_embd=256", "model.n_layer=4", "model.n_head=4", "train.max_steps=12", "checkpoint.every=1",
             "checkpoint.keep_last=2", "eval.every=0", "train.precision=fp32"]


def latest_tag(root: Path) -> str | None:
    return (root / "latest").read_text().strip() if (root / "latest").is_file() else None


def staging_folders(root: Path) -> set[tuple[str, int]]:
    """Unpublished checkpoint folders, told apart from earlier ones of the same name by their change time."""
    found = set()
    for folder in root.glob(".tmp-*"):
        with contextlib.suppress(FileNotFoundError):  # published (renamed) meanwhile
            found.add((folder.name, folder.stat().st_ctime_ns))
    return found


def test_killing_a_save_never_damages_the_previous_checkpoint(tiny, tmp_path):
    """SIGKILL lands at a random moment of a checkpoint's save, until two kills have landed mid-save; each
    restart resumes from the newest published checkpoint, whichever that is, and the run finishes.

    Where a kill lands depends on the machine's speed, so nothing here assumes it: the process is frozen
    (SIGSTOP) before it is killed, which tells for certain whether its save was still unpublished."""
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = ["train", *tiny, *SLOW_SAVE, f"run.output_dir={run_dir}", "train.resume=auto"]
    rng = random.Random(0)
    kills = mid_save_kills = 0
    while mid_save_kills < 2:
        assert kills < 5, f"{kills} kills, {mid_save_kills} of them mid-save"
        resumed_from = latest_tag(root)
        job = start(args, tmp_path)
        wait_for(lambda: latest_tag(root) != resumed_from, job)  # this process published a checkpoint
        leftovers = staging_folders(root)
        wait_for(lambda: staging_folders(root) - leftovers, job, poll_s=0.002)  # and began the next one
        time.sleep(rng.uniform(0, 0.05))
        job.send_signal(signal.SIGSTOP)
        mid_save_kills += bool(staging_folders(root) - leftovers)  # frozen: it cannot publish meanwhile
        job.kill()
        job.communicate()
        assert job.returncode == -signal.SIGKILL
        kills += 1
        published = sorted(root.glob("step_*"))
        for folder in published:
            verify_checkpoint(folder)  # raises if a published checkpoint is damaged
            assert (folder / MANIFEST_FILE).is_file()
        assert latest_tag(root) == published[-1].name
    newest = latest_tag(root)
    final = start(args, tmp_path)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert f"resuming from {root / newest} at step {int(newest.removeprefix('step_'))}\n" in out
    assert "done: 12 steps" in out
    assert not list(root.glob(".tmp-*")), "leftovers of the killed saves are removed"


@pytest.fixture(scope="module")
def three_checkpoints(cli, tiny, tmp_path_factory) -> tuple[Path, list[str]]:
    work = tmp_path_factory.mktemp("three")
    overrides = [*tiny, "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=0", "eval.every=1"]
    cli.ok(cli("train", *overrides, "run.output_dir=run", cwd=work))
    return work / "run", overrides


@pytest.fixture
def damaged_run(three_checkpoints, tmp_path):
    """A copy of a 3-step run whose newest checkpoint has a truncated optimizer state."""
    original, overrides = three_checkpoints
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    latest = run_dir / "checkpoints" / "step_000003"
    state = latest / "universal" / "zero" / "vit.cls_token" / "exp_avg.pt"  # an Adam moment
    state.write_bytes(state.read_bytes()[:100])
    return run_dir, overrides, latest, state


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(cli, damaged_run, tmp_path):
    run_dir, overrides, latest, state = damaged_run
    result = cli.ok(cli("train", *overrides, f"run.output_dir={run_dir}", "train.resume=auto", cwd=tmp_path))
    assert f"not resuming from step_000003: {state} is truncated" in result.stdout
    assert f"resuming from {run_dir / 'checkpoints' / 'step_000002'} instead" in result.stdout
    assert "at step 2" in result.stdout and "done: 3 steps" in result.stdout
    verify_checkpoint(latest)  # written again


@pytest.mark.parametrize("command", ["eval", "export", "train"])
def test_a_damaged_checkpoint_is_named_with_its_file(cli, damaged_run, tmp_path, command):
    run_dir, overrides, latest, state = damaged_run
    args = {"eval": ["eval", "--checkpoint", latest],
            "export": ["export", "--checkpoint", latest, "--out", run_dir / "export"],
            "train": ["train", *overrides, f"run.output_dir={run_dir}", f"train.resume={latest}"]}[command]
    cli.user_error(cli(*args, cwd=tmp_path), f"{state} is truncated or overwritten")


# --- non-finite losses -------------------------------------------------------------------------

def test_nan_losses_skip_their_updates_and_stop_the_run_with_the_last_good_weights(cli, tiny, tmp_path):
    """lr=1e30 (a typo for 1e-3) gives a NaN loss from the second step on."""
    result = cli("train", *tiny, "train.lr=1e30", "train.max_nonfinite_steps=4", "train.max_steps=50", "log.every=1",
                 "eval.every=0", "checkpoint.every=1", "checkpoint.keep_last=0", "run.output_dir=run", cwd=tmp_path)
    line = cli.user_error(result, "NaN or infinite at 4 steps in a row, steps 2 to 5",
                          "train.max_nonfinite_steps=4", "holds the weights after step 1", "lower train.lr")
    assert "step 2: the loss is not finite" in result.stdout
    rows = read_csv_rows(tmp_path / "run" / "losses_log.csv")
    assert [r["train_loss"] for r in rows[1:]] == ["nan"] * 4
    assert [r["skipped_steps"] for r in rows] == ["0", "1", "1", "1", "1"]
    assert len({r["lr"] for r in rows[1:]}) == 1, "a skipped step does not move the LR schedule"
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000005" and str(Path("run", "checkpoints", "step_000005")) in line
    after_step_1, last = (load_file(str(root / f"step_00000{s}" / "model.safetensors")) for s in (1, 5))
    assert all(torch.isfinite(v).all() and torch.equal(v, after_step_1[k]) for k, v in last.items())


def test_between_log_steps_a_run_of_nan_losses_is_noticed_at_the_next_log_step(cli, tiny, tmp_path):
    """The tallies are read at log steps only: the limit, reached at step 4, stops the run at step 5."""
    result = cli("train", *tiny, "train.lr=1e30", "train.max_nonfinite_steps=3", "train.max_steps=50", "log.every=5",
                 "eval.every=0", "checkpoint.every=0", "run.output_dir=run", cwd=tmp_path)
    cli.user_error(result, "NaN or infinite at 3 steps in a row, steps 2 to 4", "went on to step 5",
                   "holds the weights after step 1")
    assert "steps 2 to 5: the loss was not finite at 4 steps" in result.stdout
    rows = read_csv_rows(tmp_path / "run" / "losses_log.csv")
    assert [(r["step"], r["skipped_steps"]) for r in rows] == [("5", "4")]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000005"


# --- checkpoints from elsewhere ----------------------------------------------------------------

class RunsCode:
    def __reduce__(self):
        return os.system, ("touch ran_code",)


def test_export_never_unpickles_code_from_a_deepspeed_checkpoint(cli, tiny_run, tmp_path):
    folder = tmp_path / "step_000001"
    folder.mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        shutil.copyfile(tiny_run.run_dir / name, folder / name)
    (folder / "train_state.json").write_text(json.dumps({"state": {"step": 1}, "written_by": {
        "backend": "deepspeed", "world_size": 1, "zero_stage": 0, "precision": "fp32"}}))
    torch.save({"module": {}, "payload": RunsCode()}, folder / "mp_rank_00_model_states.pt")
    result = cli("export", "--checkpoint", folder, "--out", tmp_path / "export", cwd=tmp_path)
    cli.user_error(result, str(folder / "mp_rank_00_model_states.pt"), "does not unpickle")
    assert not (tmp_path / "ran_code").exists()


# --- the same under the deepspeed launcher, 2 CPU ranks ------------------------------------------

DS_STEPS = 30


def test_deepspeed_ranks_stop_together_on_a_signal_and_resume_to_the_same_losses(tmp_path):
    """SIGTERM to rank 1's process only (as ``kill PID`` or a scheduler signalling one task sends it):
    rank 0 learns of it only through the ranks' agreement after the step, yet both save the same step, one
    checkpoint, and exit; a second launch resumes to the uninterrupted run's losses and then meets a run
    whose loss turns NaN."""
    def train_args(folder: str, *extra: str) -> list[str]:
        return ["train", *DS_TINY, f"train.max_steps={DS_STEPS}", "checkpoint.every=0", f"run.output_dir={tmp_path / folder}",
                "--deepspeed_config", "ds_configs/zero1.json", *extra]

    plan = tmp_path / "first.json"
    plan.write_text(json.dumps([train_args("full"), train_args("stopped")]))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                            "tests.ds_helpers", str(plan)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: logged_steps(tmp_path / "stopped") >= 3, job, timeout_s=LAUNCH_TIMEOUT_S)
        (rank1,) = [p for p in psutil.Process(job.pid).children(recursive=True)
                    if "tests.ds_helpers" in p.cmdline() and "--local_rank=1" in p.cmdline()]
        rank1.send_signal(signal.SIGTERM)
        # A rank that stopped alone would leave the other waiting in a collective: this would time out.
        out, err = job.communicate(timeout=180)  # until the last rank closes its end of the pipes
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 128 + signal.SIGTERM, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]  # rank 0's
    stopped_at = int(line.split("after step ")[1].split(";")[0])
    assert 3 <= stopped_at < DS_STEPS, line
    assert "resume with: deepspeed --num_gpus 2 --module seemore_ds train" in line
    # One checkpoint (checkpoint.every=0), of the step rank 0 stopped at, holding both ranks' generators.
    (checkpoint,) = (tmp_path / "stopped" / "checkpoints").glob("step_*")
    assert checkpoint.name == f"step_{stopped_at:06d}" and logged_steps(tmp_path / "stopped") == stopped_at
    assert sorted(p.name for p in (checkpoint / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
    verify_checkpoint(checkpoint)

    nan_run = tmp_path / "nan"
    second = [train_args("stopped", "train.resume=auto"),
              ["train", *DS_TINY, "train.max_steps=20", "train.lr=1e30", "train.max_nonfinite_steps=3",
               f"run.output_dir={nan_run}", "--deepspeed_config", "ds_configs/zero0.json"]]
    result = launch(second, tmp_path, "second")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    full, resumed = loss_rows(tmp_path / "full"), loss_rows(tmp_path / "stopped")
    assert [r["step"] for r in full] == [r["step"] for r in resumed] == [str(s) for s in range(1, DS_STEPS + 1)]
    for a, b in zip(full, resumed):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= 1e-4 and a["lr"] == b["lr"], (a, b)

    # ZeRO stage 0 in fp32: DeepSpeed itself would step on NaN gradients.
    assert "NaN or infinite at 3 steps in a row, steps 2 to 4" in result.stderr
    assert [r["skipped_steps"] for r in loss_rows(nan_run)] == ["0", "1", "1", "1"]
    assert main(["export", "--checkpoint", str(nan_run), "--out", str(tmp_path / "export")]) == 0
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
