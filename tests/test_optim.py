"""The learning-rate schedule of the engine-free backend: LambdaLR's rates to the last bit, held by skipped
updates, and no table of every step's rate built up front."""

from __future__ import annotations

import time

import torch

from seemore_ds.config import load_config
from seemore_ds.optim import DeviceLRSchedule, lr_multiplier


def optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_rates_equal_lambdalr_stepped_on_applied_updates_through_growth_skips_and_a_restore():
    cfg = load_config(None, ["train.max_steps=2500", "train.warmup_steps=40", "train.lr=0.003"]).train
    schedule = DeviceLRSchedule(optimizer(), cfg, torch.device("cpu"))
    reference_optimizer = optimizer(cfg.lr)
    reference = torch.optim.lr_scheduler.LambdaLR(reference_optimizer, lambda step: lr_multiplier(step, cfg))
    for call in range(2600):  # past max_steps, where the rate stays at the last one
        assert schedule.lr.item() == reference_optimizer.param_groups[0]["lr"], call
        applied = call % 7 != 3  # some updates skipped: the schedule holds
        schedule.step(torch.tensor(applied))
        if applied:
            reference_optimizer.step()  # no gradients, nothing moves: LambdaLR only wants it called first
            reference.step()
    restored = DeviceLRSchedule(optimizer(), cfg, torch.device("cpu"))
    restored.load_state_dict({"last_epoch": 2000})  # beyond the first table: it grows to hold the step
    assert restored.lr.item() == cfg.lr * lr_multiplier(2000, cfg)


def test_a_schedule_of_a_hundred_million_steps_costs_nothing_up_front():
    cfg = load_config(None, ["train.max_steps=100000000"]).train
    start = time.perf_counter()
    schedule = DeviceLRSchedule(optimizer(), cfg, torch.device("cpu"))
    assert time.perf_counter() - start < 1 and schedule.rates.numel() <= DeviceLRSchedule.FIRST_RATES
