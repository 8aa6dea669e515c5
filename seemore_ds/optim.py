"""Optimizer parameter groups and the learning-rate schedule, shared by both backends."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from seemore_ds.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and convolutions only; biases, norms and embeddings of rank < 2 are left alone."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``; step counts from 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DeviceLRSchedule:
    """``lr_multiplier`` indexed on the device by the number of updates applied, so that a skipped update
    holds the schedule (as a LambdaLR stepped only after applied updates) without asking the host.

    Shares one rate tensor with every parameter group of a fused AdamW, which reads it on the device.
    The table of rates covers the steps reached so far, not all of ``max_steps``: it grows (doubling) as
    ``step`` is called, so a run of 10^8 steps does not build 10^8 rates before its first one.
    """

    FIRST_RATES = 1024  # a short run's whole table

    def __init__(self, optimizer, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        # Computed in Python floats, as LambdaLR does: the same rates to the last bit. CUDA's fused kernel
        # reads the rate as float32; the CPU kernel takes the double a Python float gave.
        self.dtype = torch.float64 if device.type == "cpu" else torch.float32
        self.rates = self._rates(0, min(self.FIRST_RATES, cfg.max_steps + 1))
        self.applied = torch.zeros((), dtype=torch.long, device=device)
        self.reachable = 0  # the most updates ``applied`` can hold: steps called since the last load
        self.optimizer, self.lr = optimizer, self.rates[0].clone()
        self._share_rate()

    def _rates(self, first: int, end: int) -> torch.Tensor:
        return torch.tensor([self.cfg.lr * lr_multiplier(step, self.cfg) for step in range(first, end)],
                            dtype=self.dtype, device=self.device)

    def _cover(self, step: int) -> None:
        """Extend the table to hold ``step``'s rate (after max_steps the rate stays at the last one)."""
        end = min(step, self.cfg.max_steps) + 1
        if end > len(self.rates):
            end = min(max(end, 2 * len(self.rates)), self.cfg.max_steps + 1)
            self.rates = torch.cat([self.rates, self._rates(len(self.rates), end)])

    def _share_rate(self) -> None:
        for group in self.optimizer.param_groups:  # also after optimizer.load_state_dict replaced them
            group["lr"] = self.lr

    def step(self, applied: torch.Tensor | int = 1) -> None:
        """After an optimizer step; ``applied``: 0 (or a false tensor) when its update was skipped."""
        self.reachable += 1
        self._cover(self.reachable)
        self.applied += applied
        self._set_rate()

    def state_dict(self) -> dict:
        return {"last_epoch": int(self.applied)}  # LambdaLR's key, so that checkpoints written before load

    def load_state_dict(self, state: dict) -> None:
        self.reachable = state["last_epoch"]
        self._cover(self.reachable)
        self.applied.fill_(state["last_epoch"])
        self._set_rate()
        self._share_rate()

    def _set_rate(self) -> None:
        """The rate for the updates applied so far, on the device."""
        self.lr.copy_(self.rates[self.applied.clamp(max=len(self.rates) - 1)])
