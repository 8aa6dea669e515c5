"""What the trainer needs from a backend: one optimizer step, an eval loss, save and load.

A backend owns the model, optimizer, LR schedule and precision handling; the trainer loop is
written once against this interface and holds no backend-specific branches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from seemore_ds.data.dataset import Batch
from seemore_ds.errors import UserError

# Reduced-precision dtype of each train.precision; fp32 has none.
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


class Backend(Protocol):
    module: torch.nn.Module  # the bare SeemoreVLM (for generate, eval, export)
    device: torch.device
    rank: int
    world_size: int

    def train_step(self, micro_batches: list[Batch], timed: bool) -> StepStats:
        """Forward, backward and one optimizer step over ``grad_accum`` micro-batches; ``timed``: a log step,
        whose phases are timed and whose figures are read."""

    def eval_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, number of tokens) for one batch, without gradients."""

    def profiled_forward(self) -> tuple[float, int] | None:
        """(forward FLOPs of one micro-batch, parameters) as an engine's flops profiler counted them; None: no profile."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity on one rank)."""

    def average_running_stats(self) -> None:
        """Make every rank's BatchNorm running statistics their mean over the ranks; every rank calls it.

        Each rank normalises its own micro-batches, so the statistics drift apart; evaluation, checkpoints
        and their export must see one model (timm's ``distribute_bn`` does the same)."""

    def layout(self):
        """``checkpoint.WrittenBy``: backend, rank count, ZeRO stage and precision of this run."""

    def finish(self, run_dir: Path) -> None:
        """At the end of the run, write what the engine recorded over it into ``run_dir``; every rank calls it."""

    def save(self, checkpoint_dir: Path) -> None:
        """Write this rank's part of the engine state (model, optimizer, schedule) into ``checkpoint_dir``;
        every rank calls it. The checkpoint manager writes everything else."""

    def load(self, checkpoint_dir: Path) -> None:
        """Restore the engine state of a checkpoint this backend wrote at this run's layout."""

    def load_universal(self, folder: Path) -> None:
        """Restore the engine state from a universal folder (``universal.py``), written at any layout."""
