"""Backends execute training steps; ``build_backend`` picks one from ``train.backend``."""

from __future__ import annotations

import importlib.util

import torch

from seemore_ds.config import Config
from seemore_ds.errors import UserError
from seemore_ds.launching import launched_by_deepspeed
from seemore_ds.model import SeemoreVLM


def resolve_backend_name(cfg: Config) -> str:
    """``auto`` -> deepspeed under a distributed launcher, or with CUDA and deepspeed installed; else torch."""
    name = cfg.train.backend
    if name == "auto":
        has_deepspeed = importlib.util.find_spec("deepspeed") is not None
        wants_engine = launched_by_deepspeed() or bool(cfg.train.deepspeed_config) or torch.cuda.is_available()
        name = "deepspeed" if has_deepspeed and wants_engine else "torch"
    return name


def build_backend(model: SeemoreVLM, cfg: Config):
    name = resolve_backend_name(cfg)
    if name == "torch":
        from seemore_ds.backends.torch_backend import TorchBackend

        return TorchBackend(model, cfg)
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("train.backend=deepspeed needs DeepSpeed: pip install deepspeed (or use train.backend=torch)")
    from seemore_ds.backends.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend(model, cfg)
