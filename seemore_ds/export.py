"""Export: any checkpoint (DeepSpeed ZeRO 0-3 or torch backend) -> one fp32 model.safetensors folder.

The folder holds ``model.safetensors``, ``config.yaml`` and ``tokenizer.json``, which is what
``checkpoint.load_model_for_inference`` (and so ``generate`` and ``eval``) reads. DeepSpeed's own
files are pickles; they are loaded weights-only (see ``safe_pickles``), so they cannot run code.
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from seemore_ds import ds_files
from seemore_ds.checkpoint import (CHECKPOINTS, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, TRAIN_STATE_FILE,
                                   list_checkpoints, load_checkpoint_config, read_pointer, resolve_checkpoint)
from seemore_ds.errors import UserError
from seemore_ds.manifest import MANIFEST_FILE
from seemore_ds.model import SeemoreVLM
from seemore_ds.output_paths import file_in_the_way
from seemore_ds.safe_pickles import refused, weights_only_loads
from seemore_ds.tokenizer import CharTokenizer


def fp32_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint folder, whatever wrote it."""
    if (folder / MODEL_FILE).is_file():  # the engine-free backend, and converted checkpoints, write safetensors
        return load_file(str(folder / MODEL_FILE))
    if not ds_files.is_deepspeed_checkpoint(folder):
        raise UserError(f"{folder} is not a seemore-ds checkpoint: it has neither {MODEL_FILE} nor "
                        f"DeepSpeed's {ds_files.MODEL_STATES}")
    if not any(folder.glob(ds_files.OPTIMIZER_SHARDS_GLOB)):  # stage 0, also of checkpoints older than train_state.json
        return _stage0_weights(folder)
    # ZeRO 1-3 keep the fp32 master weights flattened and partitioned in the optimizer shards.
    # Its progress chatter is not the command's output.
    with weights_only_loads(folder), contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    return {name: tensor.float() for name, tensor in state.items()}


def _stage0_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Stage 0 has no partitioned master copy; its weights are the ``module`` entry of rank 0's model states.

    Under bf16 at stage 0 these are the bf16 working weights (upcast here); under fp32 they are exact.
    """
    path = folder / ds_files.MODEL_STATES
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise refused(path, err) from None
    return {name: tensor.float() for name, tensor in states["module"].items()}


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the consolidated fp32 weights plus config and tokenizer; returns the weights file."""
    folder = resolve_checkpoint(checkpoint)
    out = Path(out)
    weights = out if out.suffix == ".safetensors" else out / MODEL_FILE
    blocker = file_in_the_way(weights.parent)
    if blocker:
        raise UserError(f"--out {weights.parent} cannot be a folder: {blocker} is a file")
    _check_not_into_a_checkpoint(weights.parent, folder)
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        if not (folder / name).is_file():
            raise UserError(f"{folder} has no {name}; point --checkpoint at a checkpoint folder of a seemore-ds run")
    state = fp32_state_dict(folder)
    cfg = load_checkpoint_config(folder)
    model = SeemoreVLM(cfg.model, CharTokenizer.load(folder / TOKENIZER_FILE).vocab_size)
    try:  # refuse to write weights that the inference path could not load
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{folder}: consolidated weights do not fit {folder / CONFIG_FILE}: {str(err).splitlines()[0]}") from None
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        shutil.copyfile(folder / name, weights.parent / name)
    return weights


def _check_not_into_a_checkpoint(out_folder: Path, source: Path) -> None:
    """Refuse an ``--out`` folder that is the source, a checkpoint, inside one or inside a run's checkpoints
    folder, or a run folder: files added to a checkpoint are not in its manifest (eval would read them
    unchecked, or the checkpoint fails its check and resume passes over it), and a run folder's own
    checkpoints would shadow the export when eval or generate is pointed at it."""
    target = out_folder.resolve()
    for part in (target, *target.parents):
        if part == source.resolve() or _is_checkpoint(part):
            what = "the checkpoint being exported" if part == source.resolve() else f"checkpoint {part}"
        elif _holds_checkpoints(part):
            what = f"the checkpoints folder {part} of a run"
        elif part == target and _holds_checkpoints(part / CHECKPOINTS):
            what = f"the run folder {part}"
        else:
            continue
        where = "is" if part == target else "lies inside"
        raise UserError(f"--out {out_folder} {where} {what}, which an export must leave as it is; "
                        "export to a folder of its own, e.g. RUN/export beside RUN/checkpoints")


def _is_checkpoint(folder: Path) -> bool:
    """A checkpoint folder of any backend (DeepSpeed's own files, or what the manager adds to every one)."""
    return (folder / TRAIN_STATE_FILE).is_file() or (folder / MANIFEST_FILE).is_file() or ds_files.is_deepspeed_checkpoint(folder)


def _holds_checkpoints(folder: Path) -> bool:
    """A run's ``checkpoints`` folder: one named so with a ``latest`` pointer or checkpoint folders."""
    return folder.name == CHECKPOINTS and (read_pointer(folder / "latest") is not None or bool(list_checkpoints(folder)))
