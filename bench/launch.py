"""Run a bench module under the deepspeed launcher: one CPU (or GPU) process per rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from seemore_ds.launching import free_port

REPO = Path(__file__).resolve().parents[1]


def launch_module(ranks: int, module: str, args: list[str], stdout=None) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus RANKS --module MODULE ARGS`` from the repository root, on a free port."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=stdout, text=True)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
