"""After every step, what all ranks must agree on before the next: stop on a signal, stop on a run of NaN losses.

A signal may reach one rank only, and one rank's batch may give a NaN loss while another's does
not; the two flags are combined over the ranks in one small collective, so every rank saves the
same step and stops together.
"""

from __future__ import annotations

import shlex
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from seemore_ds.backends import launched_by_deepspeed, train_arguments
from seemore_ds.backends.base import StepStats
from seemore_ds.config import TrainConfig
from seemore_ds.errors import UserError
from seemore_ds.preemption import Preempted, StopSignals, exit_code


@dataclass
class Halt:
    """Why the run stops after this step; ``error`` turns it into the exception the CLI reports."""

    describe: Callable[[Path], str]  # the message, given the checkpoint just saved
    signum: int | None = None  # a stop signal, or None for a run of non-finite losses

    def error(self, checkpoint: Path, is_main: bool) -> Exception:
        if self.signum is None:
            return UserError(self.describe(checkpoint))
        return Preempted(self.describe(checkpoint) if is_main else "", exit_code(self.signum))


class StepGuard:
    """Counts non-finite losses in a row and watches for stop signals, identically on every rank."""

    def __init__(self, backend, train_cfg: TrainConfig, say):
        self.backend, self.lr, self.max_nonfinite_steps = backend, train_cfg.lr, train_cfg.max_nonfinite_steps
        self.say = say  # prints on rank 0
        self.signals = StopSignals()  # installed by the caller around the training loop
        self.nonfinite_in_a_row = 0

    def _agree(self, nonfinite: bool) -> tuple[int, bool]:
        """(the stop signal any rank received, or 0; whether any rank's loss was non-finite)."""
        signum = self.signals.received or 0
        if self.backend.world_size == 1:
            return signum, nonfinite
        flags = torch.tensor([signum, int(nonfinite)], device=self.backend.device)
        # A plain collective: the backend's all_reduce_sum also gathers the weights under ZeRO-3.
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signum, nonfinite = flags.tolist()
        return signum, bool(nonfinite)

    def after_step(self, step: int, stats: StepStats) -> Halt | None:
        """Count non-finite losses (the backend skipped their updates); the reason to stop now, if any."""
        signum, nonfinite = self._agree(stats.nonfinite)
        if nonfinite:
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row == 1:
                self.say(f"step {step}: the loss is not finite on some rank; the update is skipped "
                         f"(train.max_nonfinite_steps={self.max_nonfinite_steps} in a row stop the run)")
        elif self.nonfinite_in_a_row:
            self.say(f"step {step}: the loss is finite again after {self.nonfinite_in_a_row} skipped step(s)")
            self.nonfinite_in_a_row = 0
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            first, n = step - self.nonfinite_in_a_row + 1, self.nonfinite_in_a_row
            return Halt(lambda checkpoint: (
                f"the loss was NaN or infinite at {n} steps in a row, steps {first} to {step} "
                f"(train.max_nonfinite_steps={self.max_nonfinite_steps}); their updates were skipped, so {checkpoint} "
                f"holds the weights after step {first - 1}; lower train.lr (now {self.lr:g}) or check "
                f"the data, then resume with train.resume=auto"
            ))
        if signum:
            command = resume_command(self.backend.world_size)
            return Halt(lambda checkpoint: (f"stopped by {signal.Signals(signum).name} after step {step}; "
                                            f"saved {checkpoint}; resume with: {command}"), signum)
        return None


def resume_command(world_size: int) -> str:
    """This run's command line again, with ``train.resume=auto``."""
    args = [a for a in train_arguments() if not a.startswith("train.resume=")] + ["train.resume=auto"]
    launcher = (f"deepspeed --num_gpus {world_size} --module seemore_ds" if launched_by_deepspeed()
                else "python -m seemore_ds")
    return f"{launcher} {shlex.join(args)}"
