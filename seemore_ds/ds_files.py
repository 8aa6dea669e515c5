"""DeepSpeed's checkpoint file names and how to tell its checkpoints apart, without importing DeepSpeed.

Used by the backend, the universal conversion and export alike; their pickles are read with
``safe_pickles.weights_only_loads``.
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
    """Whether DeepSpeed wrote ``folder``: it holds rank 0's model states of some ZeRO stage."""
    return (folder / MODEL_STATES).is_file() or (folder / ZERO3_MODEL_STATES).is_file()
