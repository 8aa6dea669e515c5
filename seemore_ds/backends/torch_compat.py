"""The one adaptation of torch's behaviour that seemore-ds makes: a fused AdamW step skipped on the device.

Written for the torch versions in ``FOUND_INF_WRITTEN_FOR`` (checked on 2.13.0) and pinned by
tests/test_compat.py, which fails when torch stops honouring it. Imports no DeepSpeed.
"""

from __future__ import annotations

import functools
import warnings

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

FOUND_INF_WRITTEN_FOR = SpecifierSet(">=2.13,<2.14")


class TorchVersionWarning(UserWarning):
    """An adaptation runs on a torch version it was not written for."""


@functools.cache
def _check_found_inf_version() -> None:
    version = Version(torch.__version__.split("+")[0])
    if version not in FOUND_INF_WRITTEN_FOR:
        warnings.warn(f"seemore-ds skips non-finite updates through the fused AdamW's found_inf, written for "
                      f"torch{FOUND_INF_WRITTEN_FOR}, not {version}: if a NaN loss now changes the weights "
                      f"(tests/test_compat.py says so), pip install 'torch{FOUND_INF_WRITTEN_FOR}'",
                      TorchVersionWarning, stacklevel=3)


def fused_step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, except where the device tensor ``skip`` is true: then nothing changes.

    A fused AdamW reads ``found_inf`` from itself (as ``GradScaler`` sets it) and hands it to its kernel,
    which then leaves weights, moments and step counts as they were: the decision stays on the device, no
    host sync per step. ``found_inf`` is torch's private attribute, set for this one step only."""
    _check_found_inf_version()
    optimizer.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
