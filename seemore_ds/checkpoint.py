"""Checkpoints: run-folder layout, the training state and the one manager that saves and restores them.

A run folder holds ``checkpoints/step_000100/`` folders and two small text files, ``checkpoints/latest``
and ``checkpoints/best``, naming a folder. A checkpoint folder holds what the backend writes (engine
state only), ``train_state.json`` (step, samples seen, best val loss, data position, who wrote it),
one ``rng/rank<N>.pt`` per rank, the config, the tokenizer and a manifest. It is written under a
temporary name and renamed when complete, and ``latest`` is replaced last, so a crash mid-save never
damages the previous checkpoint. A checkpoint resumed with another rank count, ZeRO stage or backend
goes through its universal form (``universal.py``), converted once beside it.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from seemore_ds.atomic_files import write_atomically
from seemore_ds.config import Config, load_config, save_config, set_key
from seemore_ds.errors import UserError
from seemore_ds.manifest import DamagedCheckpoint, verify_checkpoint, write_manifest
from seemore_ds.model import SeemoreVLM
from seemore_ds.output_paths import file_in_the_way
from seemore_ds.tokenizer import CharTokenizer

CHECKPOINTS = "checkpoints"
CONFIG_FILE, TOKENIZER_FILE, MODEL_FILE = "config.yaml", "tokenizer.json", "model.safetensors"
TRAIN_STATE_FILE, RNG_FILE = "train_state.json", "rng/rank{rank}.pt"
TMP_PREFIX = ".tmp-"
# Keys newer than some checkpoints, with the value those checkpoints were trained with (not today's default).
KEYS_OLDER_CHECKPOINTS_LACK = {"model.patch_embed": "patch", "model.patch_norm": False, "model.stem_full_res_width": 0,
                              "model.decoder_updates_images": True, "model.stem_max_width": 0}


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
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit())


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
    """(model in eval mode, tokenizer, config) from a run folder, checkpoint folder (either backend, any
    ZeRO stage: consolidated here) or export.

    Reads only safetensors, YAML, JSON and, for DeepSpeed's files, plain data: a checkpoint from
    elsewhere is never run as code.
    """
    from seemore_ds.export import fp32_state_dict

    folder = resolve_checkpoint(path)
    cfg = load_checkpoint_config(folder)
    tokenizer = CharTokenizer.load(folder / TOKENIZER_FILE)
    model = SeemoreVLM(cfg.model, tokenizer.vocab_size)
    try:
        model.load_state_dict(fp32_state_dict(folder))
    except (RuntimeError, OSError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise UserError(f"the weights in {folder} do not fit the model in {folder / CONFIG_FILE}: {first_line}") from None
    return model.to(device).eval(), tokenizer, cfg


# --- the training state ------------------------------------------------------------------------

@dataclass
class WrittenBy:
    """What wrote a checkpoint's engine state: whether this run can read it natively or via its universal form."""

    backend: str  # torch | deepspeed | universal (a converted checkpoint: `checkpoint convert`)
    world_size: int
    zero_stage: int | None  # None: the engine-free backend
    precision: str

    def describe(self) -> str:
        stage = f", ZeRO {self.zero_stage}" if self.zero_stage is not None else ""
        return f"{self.backend}, {self.world_size} rank(s){stage}, {self.precision}"


@dataclass
class TrainState:
    """What the loop itself must carry over a restart, the same for every rank (RNG apart, see ``rng_state``)."""

    step: int = 0
    samples_seen: int = 0
    best_val_loss: float = math.inf
    skipped_steps: int = 0
    wandb_run_id: str | None = None
    sampler: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        state = asdict(self)
        state["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss  # JSON has no inf
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        if self.best_val_loss is None:
            self.best_val_loss = math.inf


def rng_state() -> dict:
    """This rank's random number generators."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]  # a checkpoint gives lists where getstate() had tuples
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rng_for(seed: int, step: int, rank: int) -> None:
    """Generators for a rank the checkpoint has no state of: derived from the seed, the step and the rank."""
    derived = seed + 1_000_003 * step + 7_919 * rank
    torch.manual_seed(derived)
    random.seed(derived)


def read_checkpoint_record(folder: Path) -> dict:
    """``train_state.json`` of a checkpoint folder: the TrainState, its val loss and ``written_by``."""
    path = folder / TRAIN_STATE_FILE
    if is_export(folder):
        raise UserError(f"{folder} is an export (weights, config and tokenizer, no training state): eval and generate "
                        f"read it, checkpoint info describes it; resume or convert the checkpoint it was exported from")
    if not path.is_file():
        raise UserError(f"{folder} has no {TRAIN_STATE_FILE}: it is a checkpoint of an older seemore-ds, whose weights "
                        f"eval, generate and export read but whose training cannot be resumed; train.resume=none starts over")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path} is damaged (not JSON); use another checkpoint") from None


def written_by(folder: Path) -> WrittenBy:
    return WrittenBy(**read_checkpoint_record(folder)["written_by"])


def is_export(folder: Path) -> bool:
    """What ``export`` writes: a folder with consolidated weights and config but no training state."""
    return (folder / MODEL_FILE).is_file() and (folder / CONFIG_FILE).is_file() and not (folder / TRAIN_STATE_FILE).is_file()


def checkpoint_summary(path: str | Path) -> str:
    """``checkpoint info``: step, world size, stage, precision, backend, samples seen and size, one per line;
    for an export, its weights and size."""
    folder = resolve_checkpoint(path)
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = f"{sum(p.stat().st_size for p in files) / 2**20:.1f} MiB in {len(files)} files"
    if is_export(folder):
        return _export_summary(folder, size)
    record = read_checkpoint_record(folder)
    meta = WrittenBy(**record["written_by"])
    universal = folder / "universal"
    val_loss = record.get("val_loss")
    lines = [
        f"checkpoint     {folder}",
        f"step           {record['state']['step']}",
        f"samples seen   {record['state']['samples_seen']}",
        f"backend        {meta.backend}",
        f"world size     {meta.world_size}",
        f"zero stage     {'-' if meta.zero_stage is None else meta.zero_stage}",
        f"precision      {meta.precision}",
        f"val loss       {'-' if val_loss is None else f'{val_loss:.4f}'}",
        f"universal form {'yes' if (universal / 'zero').is_dir() else 'no (converted on the first resume that needs it)'}",
        f"size           {size}",
    ]
    return "\n".join(lines)


def _export_summary(folder: Path, size: str) -> str:
    """``checkpoint info`` of an export: what its weights file holds, read from its header alone."""
    from safetensors import safe_open

    with safe_open(str(folder / MODEL_FILE), framework="pt") as weights:
        slices = [weights.get_slice(name) for name in weights.keys()]
        n_values = sum(math.prod(piece.get_shape()) for piece in slices)
        dtypes = sorted({piece.get_dtype() for piece in slices})
    lines = [
        f"export         {folder}",
        f"weights        {MODEL_FILE}: {n_values} values ({', '.join(dtypes)})",
        f"size           {size}",
        "training state none: eval and generate read it; resume or convert the checkpoint it was exported from",
    ]
    return "\n".join(lines)


# --- the manager --------------------------------------------------------------------------------

class CheckpointManager:
    """Owns the run folder's checkpoints: when to save, staging, manifest, publishing, ``latest``/``best``,
    pruning, resume discovery, conversion to another rank count/stage/backend, and the TrainState.

    Every rank calls ``save`` and ``restore``; rank 0 (with node-local storage, the first rank of each
    node) lays out and publishes folders. The backend only writes and reads engine state in a folder.
    """

    def __init__(self, cfg: Config, say):
        self.cfg, self.say = cfg, say
        self.run_dir = Path(cfg.run.output_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.state = TrainState()
        self.resume_from: Path | None = None
        self.resume_notices: list[str] = []
        self.writes = writes_checkpoint_folder(int(os.environ.get("RANK", 0)), cfg.checkpoint.use_node_local_storage)

    def should_save(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return step == self.cfg.train.max_steps or (every > 0 and step % every == 0)

    # -- before the model exists --

    def claim_run_folder(self) -> None:
        """Refuse a fresh run into a folder that holds another run's checkpoints, or with run.overwrite=true
        move that run aside (never deleting it). Every rank decides alike, from the files."""
        resume = self.cfg.train.resume
        if resume == "auto" or not list_checkpoints(self.root):
            return
        if resume != "none" and _is_inside(Path(resume), self.run_dir):
            return  # resuming one of this folder's own checkpoints
        if not self.cfg.run.overwrite:
            raise UserError(
                f"{self.run_dir} holds the checkpoints of another run ({list_checkpoints(self.root)[-1].name}); "
                f"continue it with train.resume=auto, train elsewhere with run.output_dir=DIR, or move it aside "
                f"with run.overwrite=true")
        if int(os.environ.get("RANK", 0)) == 0:
            aside = _free_name(self.run_dir)
            os.replace(self.run_dir, aside)
            self.say(f"run.overwrite=true: moved the previous run in {self.run_dir} to {aside}")
        else:  # the other ranks must not write into the folder before rank 0 has moved it
            deadline = time.monotonic() + 300
            while list_checkpoints(self.root) and time.monotonic() < deadline:
                time.sleep(0.1)

    def find_resume(self) -> Path | None:
        """The checkpoint to resume from (``train.resume``), verified; notices about damaged ones passed over."""
        resume = self.cfg.train.resume
        if resume == "auto":
            self.resume_from, self.resume_notices = newest_intact_checkpoint(self.root)
        elif resume != "none":
            self.resume_from = resolve_checkpoint(resume)
        if self.resume_from:
            self.state.load_state_dict(read_checkpoint_record(self.resume_from)["state"])
        return self.resume_from

    # -- restore --

    def restore(self, backend, model_shapes: torch.nn.Module, sampler) -> None:
        """Load the resume checkpoint into ``backend`` (natively, or through its universal form, converted
        once), and the sampler and RNG; every rank calls it."""
        folder = self.resume_from
        saved = written_by(folder)
        here = backend.layout()
        if _reads_natively(saved, here):
            backend.load(folder)
        else:
            backend.load_universal(self._universal_form(folder, saved, here, backend, model_shapes))
        sampler.load_state_dict(self.state.sampler)
        if saved.world_size != here.world_size:
            self.say(f"data: resuming epoch {sampler.epoch} at sample {sampler.position} of its global order on "
                     f"{here.world_size} rank(s) instead of {saved.world_size}: no sample of the epoch is repeated or "
                     f"skipped, but which rank sees which sample differs from an uninterrupted run")
        self._restore_rng(folder, backend.rank, saved.world_size, here.world_size)

    def _universal_form(self, folder: Path, saved: WrittenBy, here: WrittenBy, backend, model_shapes) -> Path:
        """``folder/universal``, converting it first (on rank 0, atomically) if it is not there yet."""
        from seemore_ds import universal

        existing = universal.intact_universal(folder) if saved.backend != "universal" else folder / universal.UNIVERSAL_DIR
        failure = ""
        if existing is None and backend.rank == 0:
            self.say(f"converting {folder} ({saved.describe()}) for this run ({here.describe()}): "
                     f"its universal form is written once, to {folder / universal.UNIVERSAL_DIR}")
            try:
                universal.publish_universal(folder, lambda out: universal.convert_deepspeed(
                    folder, out, model_shapes, self.cfg.train.weight_decay, saved))
            except UserError as err:
                failure = str(err)
        elif existing is not None:
            self.say(f"resuming {folder} ({saved.describe()}) through its universal form {existing} "
                     f"on this run ({here.describe()})")
        failed = backend.all_reduce(torch.tensor([float(bool(failure))], device=backend.device), torch.distributed.ReduceOp.SUM)
        if failure:
            raise UserError(failure)
        if failed.item():
            raise UserError(f"rank 0 could not convert {folder} (its message says why)")
        return folder / universal.UNIVERSAL_DIR

    def _restore_rng(self, folder: Path, rank: int, saved_world: int, world: int) -> None:
        own = folder / RNG_FILE.format(rank=rank)
        if own.is_file():
            set_rng_state(torch.load(own, map_location="cpu", weights_only=True))
        else:
            seed_rng_for(self.cfg.train.seed, self.state.step, rank)
        if saved_world > world:
            self.say(f"rng: the generator states of {_ranks(world, saved_world)} are dropped: no such rank in this run")
        elif saved_world < world:
            self.say(f"rng: {_ranks(saved_world, world)} new: generators seeded from train.seed, the step and the rank")

    # -- save --

    def save(self, backend, sampler, val_loss: float | None, tokenizer) -> Path:
        """Write the checkpoint of ``self.state.step`` (every rank its part), publish it, move ``best`` if
        ``val_loss`` beats the recorded best, prune; returns the published folder."""
        state = self.state
        tag = tag_for(state.step)
        staging = self.root / f"{TMP_PREFIX}{tag}"
        if self.writes:
            staging_dir(self.root, tag)
        backend.barrier()
        improved = val_loss is not None and val_loss < state.best_val_loss
        if improved:
            state.best_val_loss = val_loss
        state.sampler = sampler.state_dict()
        backend.save(staging)
        rng_file = staging / RNG_FILE.format(rank=backend.rank)
        rng_file.parent.mkdir(exist_ok=True)
        torch.save(rng_state(), rng_file)
        backend.barrier()
        final = self.root / tag
        if self.writes:
            record = {"state": state.state_dict(), "val_loss": val_loss, "written_by": asdict(backend.layout())}
            (staging / TRAIN_STATE_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
            save_config(self.cfg, staging / CONFIG_FILE)
            tokenizer.save(staging / TOKENIZER_FILE)
            write_manifest(staging)
            final = publish(self.root, staging, tag)
            if improved:
                write_pointer(self.root / "best", tag)
            prune_checkpoints(self.root, self.cfg.checkpoint.keep_last)
        backend.barrier()
        return final


def _reads_natively(saved: WrittenBy, here: WrittenBy) -> bool:
    """The engine-free backend's own format is the universal one; DeepSpeed reads its own at the same layout."""
    if saved.backend != here.backend:
        return False
    return here.backend == "torch" or (saved.world_size, saved.zero_stage) == (here.world_size, here.zero_stage)


def _ranks(first: int, end: int) -> str:
    return f"rank {first}" if end == first + 1 else f"ranks {first}-{end - 1}"


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _free_name(run_dir: Path) -> Path:
    """``RUN.old-1``, ``RUN.old-2``, ...: the first name not taken."""
    n = 1
    while run_dir.with_name(f"{run_dir.name}.old-{n}").exists():
        n += 1
    return run_dir.with_name(f"{run_dir.name}.old-{n}")


def convert_checkpoint(path: str | Path, out: str | Path) -> Path:
    """``checkpoint convert``: a checkpoint folder in the universal form, resumable by either backend at any
    rank count and stage, with consolidated weights for generate/eval; written whole or not at all."""
    from safetensors.torch import save_file

    from seemore_ds import universal

    folder = resolve_checkpoint(path)
    record = read_checkpoint_record(folder)
    saved = WrittenBy(**record["written_by"])
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; name a new folder")
    blocker = file_in_the_way(out.parent)
    if blocker:
        raise UserError(f"--out {out} cannot be a folder: {blocker} is a file")
    cfg = load_checkpoint_config(folder)
    tokenizer = CharTokenizer.load(folder / TOKENIZER_FILE)
    with torch.device("meta"):
        shapes = SeemoreVLM(cfg.model, tokenizer.vocab_size)
    staging = out.with_name(f"{TMP_PREFIX}{out.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if (folder / universal.UNIVERSAL_DIR / "zero").is_dir():
            shutil.copytree(folder / universal.UNIVERSAL_DIR, staging / universal.UNIVERSAL_DIR)
        else:
            universal.convert_deepspeed(folder, staging / universal.UNIVERSAL_DIR, shapes, cfg.train.weight_decay, saved)
        state = universal.read_universal(staging / universal.UNIVERSAL_DIR, shapes)
        save_file({k: v.contiguous() for k, v in {**state.weights, **state.buffers}.items()}, str(staging / MODEL_FILE))
        for name in (CONFIG_FILE, TOKENIZER_FILE):
            shutil.copyfile(folder / name, staging / name)
        if (folder / "rng").is_dir():
            shutil.copytree(folder / "rng", staging / "rng")
        record["written_by"] = asdict(WrittenBy("universal", saved.world_size, None, saved.precision))
        (staging / TRAIN_STATE_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        write_manifest(staging)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
