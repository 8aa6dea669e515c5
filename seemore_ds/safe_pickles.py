"""DeepSpeed's checkpoint files are pickles: load them so that they may hold data but never run code.

Inspected in DeepSpeed 0.19 checkpoints of ZeRO 0-3 (fp32, bf16, offload): model states hold only
tensors, containers and strings; optimizer states add three plain records, allow-listed below.
DeepSpeed itself (``load_checkpoint``, ``zero_to_fp32``) calls ``torch.load(weights_only=False)``;
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` makes torch refuse everything else in those calls too.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import torch

from seemore_ds.errors import UserError


def refused(where: Path, err: Exception) -> UserError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"{where} holds a pickle with Python objects other than tensors and DeepSpeed's plain records "
                     f"({first_line}); seemore-ds does not load such files, as unpickling them can run code")


@contextlib.contextmanager
def weights_only_loads(where: Path):
    """Every ``torch.load`` inside unpickles only tensors, containers and DeepSpeed's three plain records;
    a file with anything else ends in a UserError naming ``where``."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([fragment_address, LossScaler, ZeroStageEnum]):
            yield
    except pickle.UnpicklingError as err:
        raise refused(where, err) from None
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
