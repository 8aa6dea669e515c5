"""Typed run configuration: dataclasses, YAML loading, dotted overrides and every value check.

A run is configured by a YAML file (``configs/default.yaml``) plus ``key=value`` overrides such as
``train.max_steps=50``. Every check of a value lives in ``validate`` so that a bad value is reported
once, as a one-line :class:`UserError`, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from seemore_ds.errors import UserError


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # every file of the run lands here
    # A fresh run into a folder holding another run's checkpoints is refused; true moves that run aside
    # to OUTPUT_DIR.old-N first (nothing is deleted).
    overwrite: bool = False


@dataclass
class DataConfig:
    # Captions tables: a file, a glob or several of them separated by commas (a YAML list also works);
    # CSV, JSONL or Parquet, images as base64 or as file paths (docs/data.md). Empty: the built-in dataset.
    csv: str = ""
    val_csv: str = ""  # held-out tables, as data.csv; empty: data.val_fraction of data.csv is held out
    on_bad_row: str = "skip"  # skip | error
    val_fraction: float = 0.1
    synth_n: int = 3000  # size of the built-in dataset
    max_image_pixels: int = 64_000_000  # larger images are refused as decompression bombs
    decode_workers: int = 0  # processes that decode the images; 0: one per core this process may use
    # Decode the images once per node into a uint8 file every rank memory-maps, instead of once per rank.
    cache: bool = True
    # Empty: RUN/cache. In the run folder by default because it then goes wherever the run's files go
    # (shared storage or each node's disk), a resumed run finds it, and deleting the run deletes it;
    # a folder of your own shares the decoded images between runs of the same data.
    cache_dir: str = ""


@dataclass
class ModelConfig:
    img_size: int = 64
    patch_size: int = 16
    image_embed_dim: int = 128
    num_blks: int = 3
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 8
    dropout: float = 0.0
    max_caption_len: int = 48  # characters; longer captions are reported as bad rows
    # "patches": the decoder sees the CLS token and every patch token (LLaVA style);
    # "pooled": the CLS token and the patch grid average-pooled token_pool x token_pool (fewer decoder positions);
    # "cls": only the CLS token, as in the original seemore.
    image_tokens: str = "patches"
    token_pool: int = 2  # with image_tokens=pooled: patches pooled into one decoder token per side
    # "conv_stem": 3x3 stride-2 convolutions down to the patch grid; "patch": one patch_size convolution, as in seemore.
    patch_embed: str = "conv_stem"
    # LayerNorm on each patch embedding before the positions are added, so that the image, not the
    # position table, dominates the ViT's input from the first step (README "It learns").
    patch_norm: bool = True


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32  # per rank, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 1337
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto: the fastest for this model here (docs/precision.md)
    backend: str = "auto"  # torch | deepspeed | auto
    device: str = "auto"  # auto | cpu | cuda
    resume: str = "none"  # none | auto | PATH
    deepspeed_config: str = ""  # DeepSpeed JSON; --deepspeed_config on the command line also sets it
    max_nonfinite_steps: int = 20  # NaN/Inf losses in a row (their updates skipped) that stop the run
    compile: bool = False  # torch.compile the model; the first step (and the first evaluation) also compile


@dataclass
class EvalConfig:
    every: int = 200  # steps between evaluations; 0: only at the end
    max_batches: int = 20  # validation batches per evaluation; 0: the whole split


@dataclass
class CheckpointConfig:
    every: int = 200  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # older checkpoints are deleted, except the best by val loss
    # Multi-node without storage every node sees: the first rank of each node writes the checkpoint
    # folder on its own disk (DeepSpeed's "checkpoint": {"use_node_local_storage": true}).
    use_node_local_storage: bool = False


@dataclass
class LogConfig:
    every: int = 10  # steps between rows of losses_log.csv and timing_logs.csv
    progress: bool = True  # tqdm progress bar on the console


@dataclass
class ProfileConfig:
    flops_step: int = 0  # optimizer step whose FLOPs are profiled into RUN/flops_profile.txt; 0: never
    torch_trace: str = ""  # "START:END": a torch.profiler Chrome trace of those optimizer steps; empty: none
    peak_tflops: float = 0.0  # MFU denominator per device; 0: datasheet on known GPUs, else a measured matmul


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "seemore-ds"
    entity: str = ""  # empty: your default W&B entity
    name: str = ""  # empty: the run folder's name
    tags: str = ""  # comma-separated
    group: str = ""  # empty: no W&B group
    mode: str = "online"  # online | offline (online without an API key falls back to offline)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Dotted keys the user wrote in the YAML file or on the command line (load_config fills it): a
    # concrete DeepSpeed JSON value may replace a key left at its default, never one of these.
    explicit_keys: typing.ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.on_bad_row": ("skip", "error"),
    "model.image_tokens": ("patches", "pooled", "cls"),
    "model.patch_embed": ("conv_stem", "patch"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.backend": ("torch", "deepspeed", "auto"),
    "train.device": ("auto", "cpu", "cuda"),
    "wandb.mode": ("online", "offline"),
}


LIST_KEYS = ("data.csv", "data.val_csv")  # string keys that a YAML list may give, joined with commas


def all_keys(cfg: Config | None = None) -> dict[str, type]:
    """Every dotted key of the config with the type it expects."""
    cfg = cfg or Config()
    keys = {}
    for section in dataclasses.fields(cfg):
        hints = typing.get_type_hints(type(getattr(cfg, section.name)))
        for f in dataclasses.fields(getattr(cfg, section.name)):
            keys[f"{section.name}.{f.name}"] = hints[f.name]
    return keys


def _coerce(key: str, value, expected: type):
    """Convert a YAML or command-line value to the key's type, or say what the key expects."""
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"config key {key} expects true or false, got {value!r}")
    if expected is int:
        if isinstance(value, bool):
            raise UserError(f"config key {key} expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise UserError(f"config key {key} expects an integer, got {value!r}")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key {key} expects a number, got {value!r}")
    if expected is str:
        if value is None:
            return ""
        if key in LIST_KEYS and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key {key} expects a string, got {value!r}")
    raise TypeError(f"unsupported config type {expected} for {key}")


def set_key(cfg: Config, key: str, value) -> None:
    """Set one dotted key, refusing unknown keys with the closest valid one suggested."""
    keys = all_keys(cfg)
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f"; valid sections: {', '.join(f.name for f in dataclasses.fields(cfg))}"
        raise UserError(f"unknown config key {key!r}{hint}")
    section, name = key.split(".", 1)
    setattr(getattr(cfg, section), name, _coerce(key, value, keys[key]))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def parse_override(text: str) -> tuple[str, str]:
    """Split ``section.key=value``; the value is parsed by the key's type later."""
    if "=" not in text:
        raise UserError(f"expected a key=value override such as train.max_steps=50, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated. Records the keys they set."""
    cfg = Config()
    explicit = set()
    if path:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
        if not isinstance(tree, dict):
            raise UserError(f"config file {path} must hold sections such as 'train:', not a {type(tree).__name__}")
        sections = {f.name for f in dataclasses.fields(cfg)}
        for name, value in list(tree.items()):
            if name in sections and value is None:  # a section whose keys are all commented out
                del tree[name]
            elif name in sections and not isinstance(value, dict):
                raise UserError(f"config file {path}: section {name!r} must hold keys such as '{name}.<key>: value', not {value!r}")
        for key, value in _flatten(tree).items():
            if "." not in key:
                raise UserError(f"config file {path}: {key!r} must sit inside a section such as 'train:'")
            try:
                set_key(cfg, key, value)
            except UserError as err:
                raise UserError(f"config file {path}: {err}") from None
            explicit.add(key)
    for text in overrides:
        key, value = parse_override(text)
        set_key(cfg, key, value)
        explicit.add(key)
    cfg.explicit_keys = frozenset(explicit)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def validate(cfg: Config) -> None:
    """Every check of a config value; the first problem found is raised as a UserError."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise UserError(f"config key {key} must be one of {', '.join(allowed)}, got {value!r}")
    m, t = cfg.model, cfg.train
    positive = {
        "model.img_size": m.img_size, "model.patch_size": m.patch_size, "model.image_embed_dim": m.image_embed_dim,
        "model.num_blks": m.num_blks, "model.n_embd": m.n_embd, "model.n_layer": m.n_layer, "model.n_head": m.n_head,
        "model.max_caption_len": m.max_caption_len, "model.token_pool": m.token_pool, "train.max_steps": t.max_steps, "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum, "data.synth_n": cfg.data.synth_n, "data.max_image_pixels": cfg.data.max_image_pixels,
        "log.every": cfg.log.every, "train.max_nonfinite_steps": t.max_nonfinite_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config key {key} must be positive, got {value}")
    non_negative = {
        "train.lr": t.lr, "train.warmup_steps": t.warmup_steps, "train.weight_decay": t.weight_decay,
        "train.grad_clip": t.grad_clip, "eval.every": cfg.eval.every, "eval.max_batches": cfg.eval.max_batches,
        "checkpoint.every": cfg.checkpoint.every, "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "data.decode_workers": cfg.data.decode_workers,
        "train.eps": t.eps, "profile.flops_step": cfg.profile.flops_step, "profile.peak_tflops": cfg.profile.peak_tflops,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"config key {key} must be zero or more, got {value}")
    if m.img_size % m.patch_size:
        raise UserError(f"model.img_size ({m.img_size}) must be a multiple of model.patch_size ({m.patch_size})")
    grid = m.img_size // m.patch_size
    if m.image_tokens == "pooled" and grid % m.token_pool:
        raise UserError(f"model.token_pool ({m.token_pool}) must divide the patch grid's side "
                        f"(model.img_size / model.patch_size = {grid}) with model.image_tokens=pooled")
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if m.image_embed_dim % m.n_head:
        raise UserError(f"model.image_embed_dim ({m.image_embed_dim}) must be divisible by model.n_head ({m.n_head})")
    if not 0 <= m.dropout < 1:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not 0 <= cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise UserError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    for key, beta in (("train.beta1", t.beta1), ("train.beta2", t.beta2)):
        if not 0 <= beta < 1:
            raise UserError(f"config key {key} must be in [0, 1), got {beta}")
    trace = trace_steps(cfg.profile.torch_trace)
    for key, first_step in (("profile.flops_step", cfg.profile.flops_step), ("profile.torch_trace", trace and trace[0])):
        if first_step and first_step > t.max_steps:
            raise UserError(f"{key} starts at step {first_step}, after the last step (train.max_steps={t.max_steps}); "
                            f"choose a step from 1 to {t.max_steps}")
    if not cfg.run.output_dir:
        raise UserError("run.output_dir must name a folder, e.g. run.output_dir=runs/first")


def trace_steps(text: str) -> tuple[int, int] | None:
    """profile.torch_trace "START:END" -> (START, END), optimizer steps counted from 1; empty -> None."""
    if not text:
        return None
    start, sep, end = text.partition(":")
    if sep and start.strip().isdigit() and end.strip().isdigit() and 1 <= int(start) <= int(end):
        return int(start), int(end)
    raise UserError(f"profile.torch_trace must be START:END with 1 <= START <= END (optimizer steps), e.g. "
                    f"profile.torch_trace=5:7, got {text!r}")
