"""The dtypes of ``train.precision``: one table that the backends and the MFU measurement both read."""

from __future__ import annotations

import torch

# Reduced-precision dtype of each train.precision; fp32 has none.
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a matmul of this precision runs in: bf16, fp16, or float32 for fp32."""
    return PRECISION_DTYPES.get(precision, torch.float32)
