"""DeepSpeed's checkpoint file names and how to read them, without importing the engine backend.

Used by the backend, the universal conversion and export alike; DeepSpeed itself is imported only to
read its pickles safely (``safe_pickles``), never to build an engine.
"""

from __future__ import annotations

from pathlib import Path

MODEL_STATES = "mp_rank_00_model_states.pt"  # stages 0-2: the module (stage 0: also the optimizer)
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # stage 3: one per rank, rank 0's named here
OPTIMIZER_SHARDS_GLOB = "*zero_pp_rank_*_optim_states.pt"  # stages 1-3, one per rank (bf16_ prefixed under bf16)


def model_states_file(folder: Path) -> Path:
    """The file holding the module's buffers, global_steps and the LR schedule: rank 0's under ZeRO-3."""
    return folder / MODEL_STATES if (folder / MODEL_STATES).is_file() else folder / ZERO3_MODEL_STATES


def is_deepspeed_checkpoint(folder: Path) -> bool:
    return (folder / MODEL_STATES).is_file() or (folder / ZERO3_MODEL_STATES).is_file()


def plain_loads(folder: Path):
    """``torch.load`` inside reads DeepSpeed's files as plain data only (see ``safe_pickles``).

    Imports DeepSpeed (for its record types), with its CPU accelerator where there is no GPU."""
    from seemore_ds.backends.base import resolve_device
    from seemore_ds.backends.deepspeed_backend import select_accelerator
    from seemore_ds.safe_pickles import weights_only_loads

    select_accelerator(resolve_device("auto"))
    return weights_only_loads(folder)
