"""Run a bench module under the deepspeed launcher: one CPU (or GPU) process per rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch_module(ranks: int, module: str, args: list[str], stdout=None) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus RANKS --module MODULE ARGS`` from the repository root, on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(port), "--module", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=stdout, text=True)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
