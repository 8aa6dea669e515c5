"""Run-folder layout, checkpoint naming, ``latest``/``best`` pointers, pruning and resume discovery.

A run folder holds ``checkpoints/step_000100/`` folders (whatever the backend writes, plus the
config and tokenizer) and two small text files, ``checkpoints/latest`` and ``checkpoints/best``,
naming a folder. A checkpoint is written under a temporary name and renamed when complete, and
``latest`` is replaced last, so a crash mid-save never damages the previous checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml
from safetensors.torch import load_file

from seemore_ds.atomic_files import write_atomically
from seemore_ds.config import Config, load_config, set_key
from seemore_ds.errors import UserError
from seemore_ds.manifest import DamagedCheckpoint, verify_checkpoint
from seemore_ds.model import SeemoreVLM
from seemore_ds.tokenizer import CharTokenizer

CHECKPOINTS = "checkpoints"
CONFIG_FILE, TOKENIZER_FILE, MODEL_FILE = "config.yaml", "tokenizer.json", "model.safetensors"
TMP_PREFIX = ".tmp-"
# Keys newer than some checkpoints, with the value those checkpoints were trained with (not today's default).
KEYS_OLDER_CHECKPOINTS_LACK = {"model.patch_embed": "patch", "model.patch_norm": False}


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def write_pointer(path: Path, tag: str) -> None:
    """Atomically replace a pointer file (``latest``/``best``) with a checkpoint tag."""
    write_atomically(path, (tag + "\n").encode("utf-8"))


def read_pointer(path: Path) -> str | None:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run folder (its ``latest``) or a ``checkpoints`` folder -> checkpoint folder,
    verified against its manifest."""
    folder = _locate_checkpoint(Path(path))
    verify_checkpoint(folder)
    return folder


def newest_intact_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint ``latest`` names, else the newest intact one, with a line for each one passed over.

    None when ``root`` holds no checkpoint; a UserError when every one is damaged.
    """
    latest = read_pointer(root / "latest")
    found = list_checkpoints(root)
    candidates = ([root / latest] if latest else []) + [p for p in reversed(found) if p.name != latest]
    notices = []
    for folder in candidates:
        if not folder.is_dir():
            notices.append(f"{root / 'latest'} names {folder.name}, which is missing; looking for an older checkpoint")
            continue
        try:
            verify_checkpoint(folder)
        except DamagedCheckpoint as err:
            notices.append(f"not resuming from {folder.name}: {err}")
            continue
        if notices:
            notices.append(f"resuming from {folder} instead, the newest intact checkpoint")
        return folder, notices
    if notices:
        raise UserError(f"no intact checkpoint in {root} ({notices[0]}); start over with train.resume=none")
    return None, []


def _locate_checkpoint(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"checkpoint path {path} does not exist")
    for root in (path / CHECKPOINTS, path):
        tag = read_pointer(root / "latest")
        if tag:
            if not (root / tag).is_dir():
                raise UserError(f"{root / 'latest'} names {tag}, which is missing; point at a checkpoint folder in {root}")
            return root / tag
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if (path / CONFIG_FILE).is_file():
        return path
    raise UserError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints")


def writes_checkpoint_folder(rank: int, node_local_storage: bool) -> bool:
    """Global rank 0 lays out and publishes checkpoint folders; with node-local storage the first
    rank of every node does, on that node's own disk (LOCAL_RANK is set by the launcher)."""
    return rank == 0 or (node_local_storage and int(os.environ.get("LOCAL_RANK", 0)) == 0)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, always sparing the best one."""
    if keep_last <= 0:
        return
    best = read_pointer(root / "best")
    for old in list_checkpoints(root)[:-keep_last]:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)


def staging_dir(root: Path, tag: str) -> Path:
    """An empty temporary folder to write ``tag`` into before it is published."""
    for leftover in root.glob(f"{TMP_PREFIX}*"):  # a save that was killed; its checkpoint was never published
        shutil.rmtree(leftover, ignore_errors=True)
    staging = root / f"{TMP_PREFIX}{tag}"
    staging.mkdir(parents=True)
    return staging


def publish(root: Path, staging: Path, tag: str) -> Path:
    """Rename a finished staging folder to its tag and point ``latest`` at it."""
    final = root / tag
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    write_pointer(root / "latest", tag)
    return final


def load_checkpoint_config(folder: Path) -> Config:
    """The config a checkpoint was trained with, also for checkpoints older than some of today's keys."""
    path = folder / CONFIG_FILE
    cfg = load_config(str(path))
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for key, value in KEYS_OLDER_CHECKPOINTS_LACK.items():
        section, name = key.split(".")
        if name not in (saved.get(section) or {}):
            set_key(cfg, key, value)
    return cfg


def load_model_for_inference(path: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer, config) from a run folder, checkpoint folder or export.

    Reads only safetensors, YAML and JSON: a checkpoint from elsewhere is never run as code.
    """
    folder = resolve_checkpoint(path)
    weights = folder / MODEL_FILE
    if not weights.is_file():
        raise UserError(
            f"{folder} has no {MODEL_FILE}; a DeepSpeed checkpoint must be exported first: "
            f"python -m seemore_ds export --checkpoint {folder} --out {folder.parent / 'export'}"
        )
    cfg = load_checkpoint_config(folder)
    tokenizer = CharTokenizer.load(folder / TOKENIZER_FILE)
    model = SeemoreVLM(cfg.model, tokenizer.vocab_size)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise UserError(f"{weights} does not fit the model in {folder / CONFIG_FILE}: {first_line}") from None
    return model.to(device).eval(), tokenizer, cfg
