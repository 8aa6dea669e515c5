"""Typed run configuration: dataclasses, YAML loading, dotted overrides and every value check.

A run is configured by a YAML file (``configs/default.yaml``) plus ``key=value`` overrides such as
``train.max_steps=50``. Every check of a value lives in ``validate`` so that a bad value is reported
once, as a one-line :class:`UserError`, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from seemore_ds.errors import UserError


def option(default, doc: str):
    """A config key: its default and the one-line description that docs/config.md and ``train --help`` show."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class RunConfig:
    output_dir: str = option("runs/default", "the run folder: every file of the run lands here; relative to the "
                                             "folder the command runs in")
    overwrite: bool = option(False, "a fresh run into a folder holding another run's checkpoints is refused; true "
                                    "moves that run aside to OUTPUT_DIR.old-N first (nothing is deleted)")


@dataclass
class DataConfig:
    csv: str = option("", "captions table(s): a file, a glob or a comma-separated list (a YAML list too); CSV, "
                          "JSONL or Parquet, images base64 or file paths (docs/data.md); empty: the built-in dataset")
    val_csv: str = option("", "held-out table(s), as data.csv; empty: data.val_fraction of data.csv is held out")
    on_bad_row: str = option("skip", "skip: count a bad row, report it in RUN/bad_rows.csv and go on; error: stop "
                                     "at the first")
    val_fraction: float = option(0.1, "held-out share, split deterministically from train.seed (unused with "
                                      "data.val_csv)")
    synth_n: int = option(3000, "size of the built-in dataset")
    shift_px: int = option(0, "training images moved by up to this many pixels each way (at model.img_size), "
                              "another way every epoch, edges repeated; for captions a few pixels' move cannot "
                              "make untrue (docs/data.md); 0: none")
    max_image_pixels: int = option(64_000_000, "images declaring more pixels are refused as decompression bombs")
    decode_workers: int = option(0, "processes that decode the images; 0: one per core this process may use")
    cache: bool = option(True, "decode the images once per node into a uint8 file every rank memory-maps; false: "
                               "every rank decodes its own copy")
    # In the run folder by default because it then goes wherever the run's files go (shared storage or each
    # node's disk), a resumed run finds it, and deleting the run deletes it.
    cache_dir: str = option("", "where that file lives; empty: RUN/cache; a folder of your own shares the decoded "
                                "images between runs of the same data")


@dataclass
class ModelConfig:
    img_size: int = option(64, "images are resized to img_size x img_size pixels")
    patch_size: int = option(8, "ViT patch side; the ViT sees (img_size / patch_size)^2 patches")
    image_embed_dim: int = option(64, "ViT width")
    num_blks: int = option(2, "ViT blocks")
    n_embd: int = option(128, "decoder width")
    n_layer: int = option(2, "decoder blocks")
    n_head: int = option(4, "attention heads, both towers")
    dropout: float = option(0.0, "dropout everywhere")
    max_caption_len: int = option(48, "characters; longer captions are reported as bad rows")
    image_tokens: str = option("patches", "patches: the decoder sees the CLS token and every patch token (LLaVA "
                                          "style); pooled: CLS + the patch grid averaged token_pool x token_pool; "
                                          "cls: the CLS token alone, as in seemore")
    decoder_updates_images: bool = option(False, "true: every decoder block computes the image tokens as it does the "
                                                 "text (LLaVA style); false: the blocks read them as keys and values "
                                                 "only, which costs a fraction (docs/design.md); checkpoints written "
                                                 "before this key existed load as true")
    token_pool: int = option(2, "with image_tokens=pooled: patches pooled into one decoder token, per side")
    patch_embed: str = option("conv_stem", "conv_stem: 3x3 stride-2 convolutions (BatchNorm, ReLU) down to the patch "
                                           "grid; patch: one patch_size convolution, as in seemore (docs/design.md); "
                                           "checkpoints written before this key existed load as patch")
    stem_full_res_width: int = option(8, "with patch_embed=conv_stem: channels of a 3x3 stride-1 convolution "
                                          "(BatchNorm, ReLU) that opens the stem at the image's full resolution, "
                                          "so that fine shapes are seen before the first halving; 0: none "
                                          "(docs/design.md); checkpoints written before this key existed load as 0")
    stem_max_width: int = option(128, "with patch_embed=conv_stem: the most channels of the stem's stride-2 "
                                      "convolutions, which double towards image_embed_dim; a ViT wider than this "
                                      "gets the stem of one this wide and a last 1x1 convolution up to its width, "
                                      "a fraction of the cost (docs/design.md); 0: no limit; checkpoints written "
                                      "before this key existed load as 0")
    patch_norm: bool = option(True, "LayerNorm on each patch embedding before the positions are added, so that the "
                                    "image, not the position table, dominates the ViT's input (docs/design.md); "
                                    "checkpoints written before this key existed load as false")


@dataclass
class TrainConfig:
    max_steps: int = option(2000, "optimizer steps")
    batch_size: int = option(32, "samples per rank per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(5e-4, "AdamW peak learning rate: linear warm-up, then cosine decay")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at lr x min_lr_ratio")
    warmup_steps: int = option(50, "optimizer steps of linear warm-up")
    weight_decay: float = option(0.05, "AdamW weight decay (none on biases and norms)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "gradient-norm clipping; 0 disables it")
    seed: int = option(1337, "data split, built-in data, initialisation, shuffling, dropout")
    precision: str = option("auto", "auto: the fastest here (GPU: bf16 where supported, else fp16; CPU: a measured "
                                    "step, cached; docs/precision.md); bf16 autocasts (CPU and GPU); fp16 autocasts "
                                    "with loss scaling (CUDA only)")
    backend: str = option("auto", "torch: never imports deepspeed; deepspeed; auto: deepspeed under its launcher, "
                                  "with a DeepSpeed JSON, or on CUDA when installed")
    device: str = option("auto", "auto: CUDA when present, else the CPU")
    resume: str = option("none", "none: a fresh run; auto: the newest intact checkpoint in run.output_dir, if "
                                 "any; or a checkpoint/run path (any rank count, ZeRO stage or backend)")
    deepspeed_config: str = option("", "DeepSpeed JSON (--deepspeed_config on the command line also sets it)")
    max_nonfinite_steps: int = option(20, "NaN/Inf losses in a row (their updates skipped) that stop the run "
                                          "with a checkpoint; checked at log, eval and checkpoint steps, so the "
                                          "stop may come up to log.every - 1 steps later")
    compile: bool = option(False, "torch.compile the model (on a CPU needs a C++ compiler); the first step's "
                                  "time is logged apart (compile: step 1 took ... s) and left out of samples/s")


@dataclass
class EvalConfig:
    every: int = option(200, "steps between evaluations (val loss, caption exact match); 0: only at the end")
    max_batches: int = option(20, "validation batches per evaluation; 0: the whole split")


@dataclass
class CheckpointConfig:
    every: int = option(200, "steps between checkpoints; 0: only at the end (the last step always saves)")
    keep_last: int = option(2, "checkpoints kept; older ones are deleted, except the one checkpoints/best names "
                                  "(best moves only to a better val loss)")
    use_node_local_storage: bool = option(False, "multi-node without storage every node sees: the first rank of "
                                                 "each node writes the checkpoint folder on its own disk")


@dataclass
class LogConfig:
    every: int = option(10, "steps between rows of losses_log.csv, timing_logs.csv and memory_log.csv")
    progress: bool = option(True, "the progress bar on the console")


@dataclass
class ProfileConfig:
    flops_step: int = option(0, "optimizer step whose FLOPs are profiled into RUN/flops_profile.txt; 0: never")
    torch_trace: str = option("", "START:END: a torch.profiler Chrome trace of those optimizer steps (counted "
                                  "from 1) in RUN/torch_trace.json; empty: none")
    peak_tflops: float = option(0.0, "peak TFLOP/s of one device, the MFU denominator; 0: the datasheet on known "
                                     "GPUs, else a measured matmul (cached)")


@dataclass
class WandbConfig:
    enabled: bool = option(False, "log every CSV column, the config and sample captions to Weights & Biases "
                                  "(rank 0)")
    project: str = option("seemore-ds", "W&B project")
    entity: str = option("", "W&B entity; empty: your default")
    name: str = option("", "W&B run name; empty: the run folder's name")
    tags: str = option("", "comma-separated W&B tags")
    group: str = option("", "W&B group; empty: none")
    mode: str = option("online", "online: stream to W&B (without an API key: offline, said in one line); offline: "
                                 "RUN/wandb only, to `wandb sync` later")


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


# The bounds of numeric keys, checked by validate() and listed in docs/config.md.
POSITIVE_KEYS = (
    "model.img_size", "model.patch_size", "model.image_embed_dim", "model.num_blks", "model.n_embd", "model.n_layer",
    "model.n_head", "model.max_caption_len", "model.token_pool", "train.max_steps", "train.batch_size",
    "train.grad_accum", "data.synth_n", "data.max_image_pixels", "log.every", "train.max_nonfinite_steps",
)
NON_NEGATIVE_KEYS = (
    "train.lr", "train.warmup_steps", "train.weight_decay", "train.grad_clip", "eval.every", "eval.max_batches",
    "checkpoint.every", "checkpoint.keep_last", "data.decode_workers", "data.shift_px", "model.stem_full_res_width",
    "model.stem_max_width", "train.eps", "profile.flops_step", "profile.peak_tflops",
)

FRACTION_KEYS = {"model.dropout": "[0, 1)", "data.val_fraction": "[0, 1)", "train.min_lr_ratio": "[0, 1]",
                 "train.beta1": "[0, 1)", "train.beta2": "[0, 1)"}


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


def _value(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


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


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of an existing file the user named, or a one-line UserError for a folder or other bytes."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; name a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping, where PyYAML keeps the last one silently."""

    def construct_mapping(self, node, deep=False):
        first_lines = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merge keys (<<) may repeat; a list or mapping as a key is unhashable, refused below
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first_lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first at line {first_lines[key]}); keep one", key_node.start_mark)
            first_lines[key] = line
        return super().construct_mapping(node, deep)


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated. Records the keys they set."""
    cfg = Config()
    explicit = set()
    if path:
        file = Path(path)
        if not file.exists():
            raise UserError(f"config file {path} does not exist")
        text = read_text_file(file, "config file")
        try:
            tree = yaml.load(text, Loader=_UniqueKeyLoader) or {}
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
        value = _value(cfg, key)
        if value not in allowed:
            raise UserError(f"config key {key} must be one of {', '.join(allowed)}, got {value!r}")
    for key, expected in all_keys(cfg).items():
        # NaN passes every bound below (each comparison is false) and inf passes "zero or more"; neither trains.
        if expected is float and not math.isfinite(_value(cfg, key)):
            raise UserError(f"config key {key} must be a finite number, got {_value(cfg, key)}")
    for key in POSITIVE_KEYS:
        if _value(cfg, key) <= 0:
            raise UserError(f"config key {key} must be positive, got {_value(cfg, key)}")
    for key in NON_NEGATIVE_KEYS:
        if _value(cfg, key) < 0:
            raise UserError(f"config key {key} must be zero or more, got {_value(cfg, key)}")
    m, t = cfg.model, cfg.train
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
    if 2 * cfg.data.shift_px >= m.img_size:
        raise UserError(f"data.shift_px ({cfg.data.shift_px}) would move images by half of model.img_size "
                        f"({m.img_size}) or more; choose at most {(m.img_size - 1) // 2} (0: no move)")
    for key, interval in FRACTION_KEYS.items():
        value = _value(cfg, key)
        if not (0 <= value < 1 or (interval == "[0, 1]" and value == 1)):
            raise UserError(f"config key {key} must be in {interval}, got {value}")
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
