"""What the trainer needs from a backend: one optimizer step, the full model, collectives, save and load.

A backend owns the model, optimizer, LR schedule, precision handling and process group; the trainer
loop (and evaluation, the checkpoint manager and the step guard) is written once against the
``Backend`` protocol below and holds no backend-specific branches. Every method marked "every rank
calls it" is a collective: a rank that skips it leaves the others waiting.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch.distributed import ReduceOp

from seemore_ds.config import Config
from seemore_ds.data.dataset import Batch
from seemore_ds.errors import UserError

if TYPE_CHECKING:
    from seemore_ds.checkpoint import WrittenBy


def resolve_device(name: str) -> torch.device:
    """train.device -> a torch device; asking for CUDA without a GPU is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def timestamp(device: torch.device, timed: bool) -> float:
    """perf_counter, after waiting for queued GPU work when this step's phases are being timed."""
    if timed and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class StepStats:
    """One optimizer step. Tensors stay on the device until a log step reads them: reading one on a GPU
    waits for all queued work."""

    loss: torch.Tensor  # mean over the step's micro-batches
    grad_norm: torch.Tensor | None  # before clipping; None when the backend cannot tell
    lr: torch.Tensor  # the rate this step used
    skipped: torch.Tensor  # bool: the update was skipped (non-finite loss or gradients, fp16 overflow)
    nonfinite: torch.Tensor  # bool: the loss was NaN or infinite on this rank
    forward_s: float = 0.0
    backward_s: float = 0.0
    optimizer_s: float = 0.0
    backward_allreduce_s: float | None = None  # gradient reduction timed apart from backward_s; None: not timed
    loss_scale: float | None = None  # fp16 dynamic loss scale after the step, at timed steps


@dataclass
class MicroBatchTotals:
    """What the micro-batch loop of one optimizer step measured."""

    loss: torch.Tensor  # mean over the micro-batches, on the device
    forward_s: float
    backward_s: float
    step_s: float  # in the per-micro-batch step (DeepSpeed's engine.step); 0 without one


def run_micro_batches(micro_batches: list[Batch], device: torch.device, timed: bool,
                      forward: Callable[[Batch], torch.Tensor], backward: Callable[[torch.Tensor], None],
                      step: Callable[[bool], None] | None = None) -> MicroBatchTotals:
    """The loop of one optimizer step, the same for every backend: each micro-batch to the device, its
    ``forward`` (-> loss), ``backward`` and, where the engine wants one per micro-batch, ``step(last)``;
    phases timed (after a device sync) only when ``timed``. The loss stays on the device."""
    forward_s = backward_s = step_s = 0.0
    total_loss = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device)
        t0 = timestamp(device, timed)
        loss = forward(batch)
        t1 = timestamp(device, timed)
        backward(loss)
        t2 = timestamp(device, timed)
        if step is not None:
            step(i == len(micro_batches) - 1)
        t3 = timestamp(device, timed) if step is not None else t2
        forward_s, backward_s, step_s = forward_s + t1 - t0, backward_s + t2 - t1, step_s + t3 - t2
        total_loss += loss.detach().float()
    return MicroBatchTotals(total_loss / len(micro_batches), forward_s, backward_s, step_s)


class Backend(Protocol):
    """The interface the trainer, evaluation, the checkpoint manager, the step guard and export use."""

    module: torch.nn.Module  # this rank's SeemoreVLM, for its structure and sizes; under ZeRO-3 its parameters
    # are partitions, so read the weights through ``full_model()``
    device: torch.device
    rank: int
    world_size: int
    precision: str  # the precision this run trains in: fp32 | bf16 | fp16
    # The run's config as this backend settled it (train.precision=auto decided; a DeepSpeed JSON's concrete
    # values adopted for the keys the user left at their defaults): what the run saves and reports. A copy:
    # the config the backend was given stays as loaded.
    config: Config

    def train_step(self, micro_batches: list[Batch], timed: bool) -> StepStats:
        """Forward, backward and one optimizer step over ``grad_accum`` micro-batches; ``timed``: a log step,
        whose phases are timed and whose figures are read. Every rank calls it."""

    def full_model(self) -> AbstractContextManager[torch.nn.Module]:
        """``with backend.full_model() as model:`` the whole SeemoreVLM with the current weights, for
        evaluation and generation. Every rank enters it: under ZeRO-3 entering gathers the partitioned
        parameters (into a copy kept until the next step, so ranks with unequal work then never wait on
        each other)."""

    def eval_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, number of tokens) for one batch, without gradients, at the training
        precision; only inside ``full_model()``."""

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp.RedOpType) -> torch.Tensor:
        """Reduce ``tensor`` in place over the ranks with ``op`` (SUM, MAX, ...) and return it; identity on one
        rank. A host (CPU) tensor travels over a CPU group, so it never waits for queued device work.
        Every rank calls it."""

    def barrier(self) -> None:
        """Wait until every rank has reached this point; every rank calls it."""

    def profiled_forward(self) -> tuple[float, int] | None:
        """(forward FLOPs of one micro-batch, parameters) as an engine's flops profiler counted them; None: no profile."""

    def settle_running_stats(self, images: torch.Tensor, batch_size: int) -> None:
        """Recompute the BatchNorm running statistics for the current weights from ``images`` (the same on
        every rank, so every rank gets the same statistics), before evaluation and checkpoints; every rank
        calls it. The averages kept while training trail the weights and differ between ranks, each rank
        normalising its own micro-batches; evaluation, checkpoints and their export must see one model."""

    def layout(self) -> WrittenBy:
        """``checkpoint.WrittenBy``: backend, rank count, ZeRO stage and precision of this run."""

    def finish(self, run_dir: Path) -> None:
        """At the end of the run, write what the engine recorded over it into ``run_dir``; every rank calls it."""

    def save(self, checkpoint_dir: Path) -> None:
        """Write this rank's part of the engine state (model, optimizer, schedule) into ``checkpoint_dir``;
        every rank calls it. The checkpoint manager writes everything else."""

    def load(self, checkpoint_dir: Path) -> None:
        """Restore the engine state of a checkpoint this backend wrote at this run's layout; every rank calls it."""

    def load_universal(self, folder: Path) -> None:
        """Restore the engine state from a universal folder (``universal.py``), written at any layout; every
        rank calls it."""
