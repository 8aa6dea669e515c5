"""Every adaptation of DeepSpeed's behaviour that seemore-ds makes, in one place.

Each is written for the DeepSpeed versions in its ``*_WRITTEN_FOR`` range (checked on 0.19.8) and pinned
by tests/test_compat.py, which fails when DeepSpeed changes what the adaptation relies on. Outside its
range an adaptation still runs where what it relies on is still there, with a one-line
``DeepSpeedVersionWarning`` saying what to watch for. Importing this module imports no DeepSpeed: the
accelerator is chosen by environment before ``deepspeed`` is first imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from seemore_ds import launching

ENVIRONMENT_WRITTEN_FOR = SpecifierSet(">=0.19,<0.20")
SHM_NAME_WRITTEN_FOR = SpecifierSet(">=0.19,<0.20")
TIMERS_WRITTEN_FOR = SpecifierSet(">=0.19,<0.20")
OVERFLOW_WRITTEN_FOR = SpecifierSet(">=0.19,<0.20")
QUIET_WRITTEN_FOR = SpecifierSet(">=0.19,<0.20")
WEIGHTS_ONLY_WRITTEN_FOR = SpecifierSet(">=0.19,<0.20")
UNIVERSAL_LOAD_WRITTEN_FOR = SpecifierSet(">=0.19,<0.20")
# Longer than any op build takes, even on 2 cores (cpu_adam: ~3 min): an older lock file is one a killed
# build left behind.
STALE_OP_BUILD_LOCK_S = 600

# SynchronizedWallClockTimer.log's parameters, which the replacement must accept.
TIMERS_LOG_PARAMETERS = ["names", "normalizer", "reset", "memory_breakdown", "ranks"]


class DeepSpeedVersionWarning(UserWarning):
    """An adaptation runs on a DeepSpeed version it was not written for."""


def deepspeed_version() -> Version:
    """The installed DeepSpeed's version, read from its metadata: deepspeed is not imported."""
    return Version(importlib.metadata.version("deepspeed"))


def _guard(written_for: SpecifierSet, adaptation: str, watch_for: str) -> bool:
    """True when the installed DeepSpeed is in ``written_for``; else a one-line warning, and False."""
    version = deepspeed_version()
    if version in written_for:
        return True
    warnings.warn(f"seemore-ds {adaptation} was written for deepspeed{written_for}, not {version}: {watch_for}; "
                  f"pip install 'deepspeed{written_for}' if it does", DeepSpeedVersionWarning, stacklevel=3)
    return False


def select_accelerator(device: torch.device) -> None:
    """DeepSpeed picks its accelerator when first imported: choose the CPU one unless told otherwise or on CUDA."""
    if "DS_ACCELERATOR" not in os.environ and device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"


def prepare_environment(device: torch.device) -> None:
    """The environment DeepSpeed reads: its accelerator, and a one-rank world where no launcher started us.

    Must run before ``deepspeed`` is imported: the accelerator is chosen at import time."""
    _guard(ENVIRONMENT_WRITTEN_FOR, "chooses DeepSpeed's accelerator through DS_ACCELERATOR and a one-rank world "
           "through RANK/WORLD_SIZE", "an engine that looks for MPI or a GPU on a CPU machine")
    select_accelerator(device)
    launching.stand_in_for_launcher()


def op_build_root() -> Path:
    """The folder torch JIT-builds DeepSpeed's ops in for this process, one subfolder per op: TORCH_EXTENSIONS_DIR,
    else a folder per Python and torch build under the default root (torch's own rule, asked of torch)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("", verbose=False))


def stale_op_build_locks() -> list[tuple[Path, float]]:
    """The op build locks older than any build, with their ages in seconds: ones a killed build left behind.

    torch builds an op under a ``lock`` file in its folder and removes it when done; every process that
    loads the op (each rank, each launch) first waits, silently and with no end, for that file to go. A
    build killed midway leaves it, and every later launch hangs before its first line."""
    now, stale = time.time(), []
    for lock in sorted(op_build_root().glob("*/lock")):
        with contextlib.suppress(FileNotFoundError):  # a build that just ended removed it
            age_s = now - lock.stat().st_mtime
            if age_s > STALE_OP_BUILD_LOCK_S:
                stale.append((lock, age_s))
    return stale


def report_stale_op_build_locks() -> None:
    """Name each stale op build lock on stderr, with the fix. None is removed: a build might still own it."""
    for lock, age_s in stale_op_build_locks():
        print(f"{lock} is {age_s / 60:.0f} min old: loading DeepSpeed's {lock.parent.name} op waits for it to go, "
              f"and no build takes that long; if no process is building that op, delete the file",
              file=sys.stderr, flush=True)


def shared_allreduce_buffer(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's shm_comm creates for ``rank`` (csrc/cpu/comm/shm.cpp, SHM_BUFFER_NAME)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def unlink_shared_allreduce_buffer(rank: int) -> None:
    """Remove the name of this rank's shared-memory all-reduce buffer once every rank has mapped it.

    On CPU ranks that share one machine, DeepSpeed's shm_comm creates one 66 MB buffer per rank in
    /dev/shm and never unlinks it: each launch would leave its RAM taken until a reboot (the files
    are named by MASTER_PORT, so every new port adds 132 MB at 2 ranks). Once all ranks have
    opened each other's buffers, the names are no longer needed; the mappings live on, and the
    kernel frees the memory when the last rank exits, even a killed one. Call after a barrier.
    """
    _guard(SHM_NAME_WRITTEN_FOR, "removes DeepSpeed's shared-memory all-reduce buffers by name",
           "deepspeed_allreduce_buffer_* files left in /dev/shm after a run (delete them by hand)")
    # Not created where the ranks span machines, without a launcher (no LOCAL_SIZE), or without shm_comm.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shared_allreduce_buffer(rank))


def _reset_timers(timers, names, normalizer=1.0, reset=True, memory_breakdown=False, ranks=None) -> None:
    """DeepSpeed's ``SynchronizedWallClockTimer.log`` without the printing."""
    for name in names:
        if reset and name in timers.timers:
            timers.timers[name].reset()


def quiet_engine_timers(engine) -> None:
    """With wall_clock_breakdown (or the flops profiler) the engine prints its timers at every step; the
    trainer writes them to timing_logs.csv instead, so the engine's log call only resets them."""
    _guard(TIMERS_WRITTEN_FOR, "replaces the engine's timer printing",
           "timer lines printed at every step with wall_clock_breakdown")
    parameters = list(inspect.signature(engine.timers.log).parameters)
    if parameters != TIMERS_LOG_PARAMETERS:
        warnings.warn(f"DeepSpeed's engine.timers.log takes ({', '.join(parameters)}), not "
                      f"({', '.join(TIMERS_LOG_PARAMETERS)}): its timers are left to print at every step",
                      DeepSpeedVersionWarning, stacklevel=2)
        return
    engine.timers.log = functools.partial(_reset_timers, engine.timers)


def skip_nonfinite_updates(optimizer) -> None:
    """Make a step on NaN/Inf gradients a skipped one, as ZeRO and fp16 already do.

    Without them DeepSpeed steps a plain optimizer on whatever the gradients hold. The engine reads
    ``optimizer.overflow`` after the step: it then counts a skipped step and holds the LR schedule.
    That is a Python bool, so deciding it costs a host sync per step, as DeepSpeed's own overflow checks
    (fp16, ZeRO) do: the engine's interface allows no skip decided on the device. An optimizer that
    has ``overflow`` already (ZeRO's, fp16's) decides for itself and is left alone.
    """
    if hasattr(optimizer, "overflow"):
        return
    _guard(OVERFLOW_WRITTEN_FOR, "skips non-finite updates through optimizer.overflow",
           "a NaN gradient applied to the weights at ZeRO stage 0 in fp32/bf16")
    step = optimizer.step

    @functools.wraps(step)  # keeps the LR scheduler's mark on the step it wrapped, which it checks for
    def step_unless_nonfinite(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        optimizer.overflow = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if not optimizer.overflow:
            step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = step_unless_nonfinite


def quiet_deepspeed() -> None:
    """DeepSpeed's INFO chatter off and its use of deprecated torch collectives unwarned, for the run.

    Process-wide, because DeepSpeed logs and calls those collectives from every engine method, for the
    whole run; so called once, at backend construction, never at import."""
    _guard(QUIET_WRITTEN_FOR, "silences DeepSpeed's INFO log and torch's deprecation warnings about it",
           "DeepSpeed's INFO lines or FutureWarnings on the console")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # the trainer does the talking
    # DeepSpeed 0.19 still calls collectives that torch 2.13 deprecates, once per rank and name.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")


@contextlib.contextmanager
def torch_loads_weights_only():
    """Every ``torch.load`` inside runs weights-only, DeepSpeed's own included.

    DeepSpeed's checkpoint loaders (``load_checkpoint``, ``zero_to_fp32``) call
    ``torch.load(weights_only=False)`` themselves and take no argument to change it; torch's
    TORCH_FORCE_WEIGHTS_ONLY_LOAD, read at every call, is the one switch that reaches them. So it is
    set here, for the duration of the block only, and put back as it was."""
    _guard(WEIGHTS_ONLY_WRITTEN_FOR, "loads DeepSpeed checkpoints weights-only",
           "a checkpoint load that ends in a weights-only error naming a new DeepSpeed type")
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


@contextlib.contextmanager
def loading_universal(engine):
    """``engine.load_checkpoint`` inside reads a universal checkpoint.

    DeepSpeed reads ``"checkpoint": {"load_universal": true}`` from its config only when loading, and
    has no argument for it: the flag is set on the built engine's config for the load and cleared after."""
    _guard(UNIVERSAL_LOAD_WRITTEN_FOR, "loads universal checkpoints into a built engine",
           "a universal checkpoint loaded as a plain one (world-size errors)")
    engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = False


def after_universal_load(engine, gradient_clipping: float) -> None:
    """Undo what DeepSpeed's universal loaders change beside the weights and moments."""
    if hasattr(engine.optimizer, "clip_grad"):  # the ZeRO 1-2 loader takes the checkpoint's over the config
        engine.optimizer.clip_grad = gradient_clipping
    # The ZeRO-3 loader hands every group one and the same step tensor, which a fused or foreach
    # AdamW then advances in place once per group: the second group's bias correction would run ahead.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for param_state in inner.state.values():
        if torch.is_tensor(param_state.get("step")):
            param_state["step"] = param_state["step"].clone()
