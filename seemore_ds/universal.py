"""The rank-independent training state: one folder per parameter, as DeepSpeed's universal checkpoint.

    universal/mp_rank_00_model_states.pt               module (full fp32 weights + buffers), lr_scheduler,
    universal/zero_pp_rank_0_mp_rank_00_model_states.pt  global_steps, skipped_steps, ds_version (ZeRO-3 reads this name)
    universal/zero/optimizer_state.pt                  param_groups (hyperparameters), ds_version
    universal/zero/<parameter name>/fp32.pt            {"param": full tensor in its shape, "cat_dim": 0}
    universal/zero/<parameter name>/exp_avg.pt, exp_avg_sq.pt, step.pt

DeepSpeed's ``"load_universal"`` reads this at ZeRO 1-3 and any rank count; the engine-free backend and
stage 0 read it here. It is written natively by the engine-free backend, and converted from DeepSpeed's
sharded checkpoints: ZeRO 1-3 through ``deepspeed.checkpoint.ds_to_universal`` (whose ZeRO-3 output, bare
1-D tensors without model states, is completed here), stage 0 here (DeepSpeed's converter finds no
optimizer shards). Only this module knows the layout.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch

from seemore_ds import ds_files
from seemore_ds.errors import UserError
from seemore_ds.manifest import verify_checkpoint, write_manifest
from seemore_ds.model import SeemoreVLM
from seemore_ds.optim import param_groups
from seemore_ds.safe_pickles import weights_only_loads

UNIVERSAL_DIR = "universal"
MODEL_STATES = ds_files.MODEL_STATES
ZERO3_MODEL_STATES = ds_files.ZERO3_MODEL_STATES
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
DS_VERSION = "0.19.8"  # the layout DeepSpeed 0.19 writes and reads


@dataclass
class UniversalState:
    """Everything the optimizer and model hold, by parameter name, whatever the ranks or stage were."""

    weights: dict[str, torch.Tensor]  # fp32 parameters
    moments: dict[str, dict[str, torch.Tensor]]  # name -> {"exp_avg", "exp_avg_sq"}
    buffers: dict[str, torch.Tensor]  # BatchNorm statistics
    updates: int  # Adam's step: optimizer updates applied (skipped ones excluded), also the LR schedule's position
    hyperparameters: list[dict]  # one per parameter group, without "params"
    global_steps: int
    skipped_steps: int
    lr_scheduler: dict | None  # the schedule's own state_dict, of whichever backend wrote it (see schedule_position)


def group_names(model: torch.nn.Module, weight_decay: float) -> list[list[str]]:
    """Parameter names of each optimizer group, in the optimizer's order (both backends build them alike)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in param_groups(model, weight_decay)]


def write_universal(folder: Path, state: UniversalState) -> None:
    """Write ``state`` as the universal layout into ``folder`` (which must not exist yet)."""
    zero = folder / "zero"
    zero.mkdir(parents=True)
    for name, weight in state.weights.items():
        (zero / name).mkdir()
        torch.save({"param": weight.detach().float().cpu().contiguous(), "cat_dim": 0}, zero / name / "fp32.pt")
        for key in ADAM_KEYS:
            torch.save({"param": state.moments[name][key].float().cpu().contiguous(), "cat_dim": 0},
                       zero / name / f"{key}.pt")
        torch.save(torch.tensor(float(state.updates)), zero / name / "step.pt")
    groups = [{k: v for k, v in group.items() if k != "params"} for group in state.hyperparameters]
    torch.save({"param_groups": groups, "ds_version": DS_VERSION,
                "optimizer_state_dict": {"state": {0: {"step": torch.tensor(float(state.updates))}},
                                         "param_groups": groups}},
               zero / "optimizer_state.pt")
    module = {**{k: v.detach().float().cpu() for k, v in state.weights.items()}, **state.buffers}
    model_states = {"module": module, "buffer_names": list(state.buffers), "lr_scheduler": state.lr_scheduler,
                    "global_steps": state.global_steps, "skipped_steps": state.skipped_steps,
                    "ds_version": DS_VERSION, "optimizer": None, "param_shapes": None,
                    "dp_world_size": 1, "mp_world_size": 1}  # read by DeepSpeed's loader, which then ignores them
    torch.save(model_states, folder / MODEL_STATES)
    torch.save(model_states, folder / ZERO3_MODEL_STATES)


def read_universal(folder: Path, model: SeemoreVLM) -> UniversalState:
    """The state in a universal folder, each tensor in the shape of ``model``'s parameter of that name.

    Written by ``write_universal``: tensors, numbers and strings only, read without DeepSpeed."""
    weights, moments, updates = _read_parameters(folder / "zero", model)
    model_states = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=True)
    optimizer_state = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=True)
    return UniversalState(weights, moments, _buffers(model_states, model), updates, optimizer_state["param_groups"],
                          int(model_states["global_steps"]), int(model_states["skipped_steps"]), model_states["lr_scheduler"])


def _read_parameters(zero: Path, model: SeemoreVLM):
    """(weights, moments, Adam's step or None) from a ``zero/`` folder of per-parameter files."""
    weights, moments, updates = {}, {}, None
    for name, param in model.named_parameters():
        if not (zero / name).is_dir():
            raise UserError(f"{zero} has no state for parameter {name}: it was written for another model")
        weights[name] = _param_file(zero / name / "fp32.pt", param.shape)
        moments[name] = {key: _param_file(zero / name / f"{key}.pt", param.shape) for key in ADAM_KEYS}
        if updates is None and (zero / name / "step.pt").is_file():
            updates = int(torch.load(zero / name / "step.pt", map_location="cpu", weights_only=True))
    return weights, moments, updates


def _buffers(model_states: dict, model: SeemoreVLM) -> dict[str, torch.Tensor]:
    names = {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model_states["module"].items() if k in names}


def _param_file(path: Path, shape: torch.Size) -> torch.Tensor:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    tensor = saved["param"] if isinstance(saved, dict) else saved  # ZeRO-3's converter writes bare 1-D tensors
    if tensor.numel() != shape.numel():
        raise UserError(f"{path} holds {tensor.numel()} values, the model's parameter has {shape.numel()}: "
                        f"the checkpoint was written for another model")
    return tensor.reshape(shape).float()


def optimizer_state_dict(state: UniversalState, names: list[list[str]], device: torch.device,
                         hyperparameters: list[dict]) -> dict:
    """A torch AdamW ``state_dict`` (parameters numbered group by group) from the universal state, with the
    ``hyperparameters`` of this run's optimizer (its config, not the checkpoint's, decides them)."""
    flat = [name for group in names for name in group]
    step = torch.tensor(float(state.updates))
    per_param = {i: {"step": step.clone(), **{k: state.moments[name][k].to(device) for k in ADAM_KEYS}}
                 for i, name in enumerate(flat)}
    start, groups = 0, []
    for hyper, group in zip(hyperparameters, names):
        groups.append({**hyper, "params": list(range(start, start + len(group)))})
        start += len(group)
    return {"state": per_param, "param_groups": groups}


def from_optimizer(model: torch.nn.Module | dict, optimizer_sd: dict, names: list[list[str]], global_steps: int,
                   skipped_steps: int, lr_scheduler: dict | None) -> UniversalState:
    """The universal state of a whole model and its torch AdamW ``state_dict`` (one process, or ZeRO stage 0)."""
    flat = [name for group in names for name in group]
    module_sd = model if isinstance(model, dict) else model.state_dict()
    weights = {name: module_sd[name].detach().float().cpu() for name in flat}
    buffers = {k: v.detach().cpu() for k, v in module_sd.items() if k not in weights}
    moments, updates = {}, 0
    for i, name in enumerate(flat):
        entry = optimizer_sd["state"].get(i)
        if entry is None:  # no update yet: Adam's moments start at zero
            moments[name] = {k: torch.zeros_like(weights[name]) for k in ADAM_KEYS}
            continue
        moments[name] = {k: entry[k].detach().float().cpu() for k in ADAM_KEYS}
        updates = int(entry["step"])
    return UniversalState(weights, moments, buffers, updates, hyperparameters(optimizer_sd["param_groups"]),
                          global_steps, skipped_steps, lr_scheduler)


def hyperparameters(groups: list[dict]) -> list[dict]:
    """Optimizer groups without their parameters, rates as plain numbers (the engine-free one shares a tensor)."""
    return [{k: float(v) if torch.is_tensor(v) else v for k, v in group.items() if k != "params"} for group in groups]


def schedule_position(lr_scheduler: dict | None, updates: int) -> int:
    """Updates the LR schedule has counted, from a saved schedule of either backend (or Adam's step)."""
    if lr_scheduler and "last_epoch" in lr_scheduler:  # torch's LambdaLR, and the engine-free DeviceLRSchedule
        return int(lr_scheduler["last_epoch"])
    if lr_scheduler and "last_batch_iteration" in lr_scheduler:  # DeepSpeed's WarmupLR, WarmupDecayLR, ...
        return int(lr_scheduler["last_batch_iteration"]) + 1
    return updates



# --- conversion of a DeepSpeed checkpoint -------------------------------------------------------

def convert_deepspeed(folder: Path, out: Path, model: SeemoreVLM, weight_decay: float, meta) -> None:
    """Write the universal form of DeepSpeed checkpoint ``folder`` (any stage, any rank count) into ``out``;
    ``meta``: the checkpoint's ``WrittenBy``."""
    names = group_names(model, weight_decay)
    if meta.zero_stage == 0:
        with weights_only_loads(folder):
            states = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=True)
        optimizer_sd = states["optimizer"]
        if not isinstance(optimizer_sd, dict) or "state" not in optimizer_sd:
            raise UserError(f"{folder}: a ZeRO stage 0 checkpoint in {meta.precision} keeps its optimizer in a form "
                            f"seemore-ds does not convert (only fp32 stage 0 converts); resume it with the same ranks "
                            f"and stage, or export its weights")
        write_universal(out, from_optimizer(states["module"], optimizer_sd, names, int(states["global_steps"]),
                                            int(states.get("skipped_steps") or 0), states.get("lr_scheduler")))
        return
    converted = out.with_name(out.name + ".deepspeed")
    shutil.rmtree(converted, ignore_errors=True)
    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(input_folder=str(folder), output_folder=str(converted), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    # Its progress lines and bars are not the run's output; its pickles hold only DeepSpeed's plain records.
    chatter = io.StringIO()
    with weights_only_loads(folder), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        ds_to_universal.main(args)
    state = read_universal_converted(converted, folder, model)
    if meta.zero_stage == 3:
        # Seen with 0.19.8: for a ZeRO-3 checkpoint of a run that was itself resumed from a universal form, the
        # converter's fp32 weights of the second parameter group are off by one update (its moments are right);
        # DeepSpeed's zero_to_fp32 reads the same shards correctly, so the weights come from there.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads(folder), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            full = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        state.weights = {name: full[name].float().reshape(weight.shape) for name, weight in state.weights.items()}
    write_universal(out, state)
    shutil.rmtree(converted, ignore_errors=True)


def read_universal_converted(converted: Path, folder: Path, model: SeemoreVLM) -> UniversalState:
    """ds_to_universal's output, completed with what its ZeRO-3 form leaves out (model states, shapes, step)."""
    with weights_only_loads(folder):
        source = torch.load(ds_files.model_states_file(folder), map_location="cpu", weights_only=True)
        optimizer_state = torch.load(converted / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=True)
        weights, moments, updates = _read_parameters(converted / "zero", model)
    if updates is None:  # ZeRO-3's converter keeps the step in the optimizer state only
        updates = int(optimizer_state["optimizer_state_dict"]["state"][0]["step"])
    hyper = optimizer_state.get("param_groups") or optimizer_state["optimizer_state_dict"]["param_groups"]
    return UniversalState(weights, moments, _buffers(source, model), updates, hyper, int(source["global_steps"]),
                          int(source.get("skipped_steps") or 0), source.get("lr_scheduler"))


def publish_universal(folder: Path, write) -> Path:
    """Run ``write(staging)`` and rename the staging folder to ``folder/universal`` with its manifest.

    A conversion killed halfway leaves only a ``.tmp-universal-*`` folder, never trusted and removed by
    the next one, so a half-written universal form is never read.
    """
    final = folder / UNIVERSAL_DIR
    for leftover in folder.glob(".tmp-universal-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = folder / f".tmp-universal-{os.getpid()}"
    try:
        write(staging)
        write_manifest(staging)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(staging.name + ".deepspeed"), ignore_errors=True)
        raise
    return final


def intact_universal(folder: Path) -> Path | None:
    """``folder/universal`` if a finished conversion (or the engine-free backend) wrote it there and it is intact."""
    universal = folder / UNIVERSAL_DIR
    if not (universal / "zero").is_dir():
        return None
    verify_checkpoint(universal)
    return universal
