"""``train.compile``: torch.compile for either backend, refused early where it cannot work.

Both backends compile the model in place (``nn.Module.compile``; DeepSpeed's ``engine.compile()``
does the same to the module it wraps), so checkpoints, export and generation see the plain model.
Compilation happens on the first call: the trainer reports that step's time apart from step time.
"""

from __future__ import annotations

import shutil

import torch

from seemore_ds.errors import UserError


def check_can_compile(device: torch.device) -> None:
    """On the CPU the inductor backend builds C++ kernels: without a compiler it would fail mid-step."""
    if device.type != "cpu":
        return
    from torch._inductor import config as inductor_config

    compiler = inductor_config.cpp.cxx[-1]  # $CXX, else g++ (clang++ on macOS), as inductor searches
    if shutil.which(compiler) is None:
        raise UserError(f"train.compile=true on the CPU needs a C++ compiler, and {compiler!r} was not found; "
                        f"install g++ (or set CXX to one) or use train.compile=false")
