"""After every step, what all ranks must agree on before the next: stop on a signal, stop on a run of NaN losses.

A signal may reach one rank only, and one rank's batch may give a NaN loss while another's does
not; both are combined over the ranks, so every rank saves the same step and stops together.

Non-finite losses are tallied on the device and read on the host only at the steps whose figures the
trainer reads anyway (log, eval and checkpoint steps): reading a GPU tensor waits for all queued work.
So a run of ``train.max_nonfinite_steps`` is noticed up to ``log.every - 1`` steps after it reached the
limit; the weights do not mind, since the backends skip those updates themselves.
"""

from __future__ import annotations

import shlex
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.distributed import ReduceOp

from seemore_ds.backends.base import Backend, StepStats
from seemore_ds.config import TrainConfig
from seemore_ds.errors import UserError
from seemore_ds.launching import launched_by_deepspeed, train_arguments
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

    def __init__(self, backend: Backend, train_cfg: TrainConfig, say, start_step: int = 0, skipped_steps: int = 0):
        self.backend, self.lr, self.max_nonfinite_steps = backend, train_cfg.lr, train_cfg.max_nonfinite_steps
        self.say = say  # prints on rank 0
        self.signals = StopSignals()  # installed by the caller around the training loop
        self.skipped_steps = skipped_steps  # skipped updates of the whole run, as of the last read
        self.nonfinite_halt: Halt | None = None

        def tally(value: int = 0) -> torch.Tensor:
            return torch.tensor(value, dtype=torch.long, device=backend.device)

        self.in_a_row = tally()  # non-finite losses in a row, up to the last step
        self.limit_step = tally()  # the step at which in_a_row reached max_nonfinite_steps; 0: not yet
        self.last_applied = tally(start_step)  # the last step whose update was applied
        # Since the last read: non-finite losses, the first and last step with one, skipped updates.
        self.nonfinite, self.first_nonfinite, self.last_nonfinite, self.skipped = tally(), tally(), tally(), tally()

    def count(self, step: int, stats: StepStats) -> None:
        """Tally ``step`` on the device, without a host sync."""
        # A NaN on any rank counts; queued on the device like the step itself.
        nonfinite = self.backend.all_reduce(stats.nonfinite.long(), ReduceOp.MAX)
        self.in_a_row.mul_(nonfinite).add_(nonfinite)
        reached = (self.limit_step == 0) & (self.in_a_row >= self.max_nonfinite_steps)
        self.limit_step.copy_(torch.where(reached, step, self.limit_step))
        self.first_nonfinite.copy_(torch.where((self.nonfinite == 0) & (nonfinite > 0), step, self.first_nonfinite))
        self.last_nonfinite.copy_(torch.where(nonfinite > 0, step, self.last_nonfinite))
        self.nonfinite += nonfinite
        self.skipped += stats.skipped
        self.last_applied.copy_(torch.where(stats.skipped, self.last_applied, step))

    def read(self, step: int) -> int:
        """Read the tallies (one host sync): report non-finite losses, note a run that reached the limit.
        Returns the updates skipped since the last read."""
        tallies = torch.stack([self.nonfinite, self.first_nonfinite, self.last_nonfinite, self.skipped,
                               self.limit_step, self.last_applied])
        n, first, last, skipped, limit_step, last_applied = tallies.tolist()
        self.nonfinite.zero_()
        self.skipped.zero_()
        self.skipped_steps += skipped
        limit = self.max_nonfinite_steps
        if n == 1:
            self.say(f"step {first}: the loss is not finite on some rank; the update is skipped "
                     f"(train.max_nonfinite_steps={limit} in a row stop the run)")
        elif n:
            self.say(f"steps {first} to {last}: the loss was not finite at {n} steps on some rank; their updates "
                     f"were skipped (train.max_nonfinite_steps={limit} in a row stop the run)")
        if limit_step and self.nonfinite_halt is None:
            first_in_row = limit_step - limit + 1
            went_on = f"; the limit is checked at log steps, so the run went on to step {step}" if step > limit_step else ""
            self.nonfinite_halt = Halt(lambda checkpoint: (
                f"the loss was NaN or infinite at {limit} steps in a row, steps {first_in_row} to {limit_step} "
                f"(train.max_nonfinite_steps={limit}){went_on}; their updates were skipped, so {checkpoint} "
                f"holds the weights after step {last_applied}; lower train.lr (now {self.lr:g}) or check "
                f"the data, then resume with train.resume=auto"
            ))
        return skipped

    def _agreed_signal(self) -> int:
        """The stop signal any rank received, or 0. A host flag: agreeing on it reads no device tensor."""
        signum = self.signals.received or 0
        if self.backend.world_size == 1:  # nothing to agree on, and no tensor to build at every step
            return signum
        return int(self.backend.all_reduce(torch.tensor([signum]), ReduceOp.MAX)[0])

    def after_step(self, step: int) -> Halt | None:
        """The reason to stop now, if any: a run of non-finite losses found by the last read, or a signal."""
        signum = self._agreed_signal()
        if self.nonfinite_halt:
            return self.nonfinite_halt
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
