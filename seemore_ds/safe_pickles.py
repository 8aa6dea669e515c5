"""DeepSpeed's checkpoint files are pickles: load them so that they may hold data but never run code.

Inspected in DeepSpeed 0.19 checkpoints of ZeRO 0-3 (fp32, bf16, offload): model states hold only
tensors, containers and strings; optimizer states add three plain records, allow-listed below.
DeepSpeed itself (``load_checkpoint``, ``zero_to_fp32``) calls ``torch.load(weights_only=False)``;
``deepspeed_compat.torch_loads_weights_only`` makes torch refuse everything else in those calls too.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch

from seemore_ds.errors import UserError


def _reason(err: Exception) -> str:
    """torch's weights-only message is mostly advice; keep the line that names what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))]
    return specific[0] if specific else lines[0] if lines else type(err).__name__


def refused(where: Path, err: Exception) -> UserError:
    return UserError(f"{where} cannot be loaded as plain data ({_reason(err)}): it is damaged, or holds Python "
                     f"objects other than tensors and DeepSpeed's plain records, which seemore-ds does not unpickle "
                     f"because unpickling can run code")


@contextlib.contextmanager
def weights_only_loads(where: Path):
    """Every ``torch.load`` inside unpickles only tensors, containers and DeepSpeed's three plain records;
    a file with anything else ends in a UserError naming ``where``.

    Imports DeepSpeed (for its record types), with its CPU accelerator where there is no GPU."""
    from seemore_ds.backends import deepspeed_compat
    from seemore_ds.backends.base import resolve_device

    deepspeed_compat.select_accelerator(resolve_device("auto"))  # before deepspeed is first imported
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with deepspeed_compat.torch_loads_weights_only(), \
                torch.serialization.safe_globals([fragment_address, LossScaler, ZeroStageEnum]):
            yield
    except pickle.UnpicklingError as err:
        raise refused(where, err) from None
