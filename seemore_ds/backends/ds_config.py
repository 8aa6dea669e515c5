"""DeepSpeed JSON configs: loading, resolving ``"auto"`` from the YAML, refusing contradictions.

DeepSpeed itself does not resolve ``"auto"`` (at the top level it breaks, inside blocks it is
silently dropped), so every ``"auto"`` is replaced here, before ``deepspeed.initialize``, by the
value the YAML run config implies, as the Hugging Face Trainer does:

- ``train_micro_batch_size_per_gpu`` <- train.batch_size, ``gradient_accumulation_steps`` <-
  train.grad_accum, ``train_batch_size`` <- micro x accumulation x ranks;
- ``fp16.enabled`` / ``bf16.enabled`` <- train.precision; ``gradient_clipping`` <- train.grad_clip;
- ``optimizer.params`` lr / betas / eps / weight_decay <- train.lr, (beta1, beta2), eps, weight_decay;
- ``scheduler.params`` warmup_min_lr <- 0, warmup_max_lr <- train.lr, warmup_num_steps <-
  train.warmup_steps, total_num_steps <- train.max_steps;
- ZeRO buckets from model.n_embd (d): reduce_bucket_size d^2, stage3_prefetch_bucket_size 0.9 d^2,
  stage3_param_persistence_threshold 10 d;
- ``checkpoint.use_node_local_storage`` <- checkpoint.use_node_local_storage;
- ``wall_clock_breakdown`` <- true (the engine's timers fill timing_logs.csv); ``flops_profiler`` <-
  on at profile.flops_step, writing RUN/flops_profile.txt. A ``wandb`` monitor block is refused: the
  trainer writes to W&B itself.

A concrete JSON value that says something else than the YAML is refused, naming both. The
resolution is a pure function of (JSON, YAML, world size), so every rank reaches the same verdict
before any collective starts: an error ends all ranks instead of leaving some waiting.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from seemore_ds.config import Config
from seemore_ds.errors import UserError
from seemore_ds.profiling import FLOPS_PROFILE_FILE

AUTO = "auto"

# The built-in config when none is named: ZeRO stage 0 (plain data parallelism), all else from the YAML.
DEFAULT_DS_CONFIG = {
    "train_batch_size": AUTO,
    "train_micro_batch_size_per_gpu": AUTO,
    "gradient_accumulation_steps": AUTO,
    "gradient_clipping": AUTO,
    "fp16": {"enabled": AUTO, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": AUTO},
    "zero_optimization": {"stage": 0},
}

# DeepSpeed logs every N steps unless told otherwise; the trainer does its own logging.
QUIET_STEPS_PER_PRINT = 10**9


def load_ds_json(path: str) -> dict:
    """The JSON object in ``path``; a missing file or bad JSON is one line naming the file and line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist (train.deepspeed_config / --deepspeed_config)")
    try:
        tree = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {path} is not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(tree, dict):
        raise UserError(f"DeepSpeed config {path} must hold a JSON object, not a {type(tree).__name__}")
    return tree


def ds_config_for(cfg: Config, world_size: int) -> tuple[dict, str]:
    """(resolved DeepSpeed config, where it came from) for a run config."""
    path = cfg.train.deepspeed_config
    raw, source = (load_ds_json(path), path) if path else (DEFAULT_DS_CONFIG, "the built-in DeepSpeed config")
    return resolve_ds_config(raw, cfg, world_size, source), source


class _Resolver:
    """Fills one config tree in place; ``source`` names the file in every message."""

    def __init__(self, tree: dict, source: str):
        self.tree, self.source = tree, source

    def fill(self, block: dict, key: str, where: str, yaml_key: str, yaml_value, same=None) -> None:
        """``block[key]``: "auto" or missing -> the YAML value; a different concrete value is refused."""
        value = block.get(key, AUTO)
        if value == AUTO:
            block[key] = yaml_value
            return
        agrees = same(value, yaml_value) if same else value == yaml_value
        if not agrees:
            raise UserError(
                f"{self.source}: {where}={json.dumps(value)} contradicts {yaml_key}={_show(yaml_value)}; "
                f"set {where} to \"auto\" or change {yaml_key}"
            )


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _close(a, b) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    except (TypeError, ValueError):
        return False


def _same_betas(a, b) -> bool:
    return isinstance(a, (list, tuple)) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))


def _block(tree: dict, key: str, source: str) -> dict:
    block = tree.setdefault(key, {})
    if not isinstance(block, dict):
        raise UserError(f"{source}: \"{key}\" must be a JSON object, got {json.dumps(block)}")
    return block


def resolve_ds_config(raw: dict, cfg: Config, world_size: int, source: str = "DeepSpeed config") -> dict:
    """A copy of ``raw`` with every "auto" resolved from ``cfg``; contradictions raise UserError."""
    tree = copy.deepcopy(raw)
    r = _Resolver(tree, source)
    t = cfg.train
    _resolve_precision(tree, t.precision, source)
    _resolve_batch(tree, r, cfg, world_size)
    r.fill(tree, "gradient_clipping", "gradient_clipping", "train.grad_clip", t.grad_clip, _close)
    _resolve_zero(tree, r, cfg)
    _resolve_optimizer(tree, r, cfg)
    r.fill(_block(tree, "checkpoint", source), "use_node_local_storage", "checkpoint.use_node_local_storage",
           "checkpoint.use_node_local_storage (YAML)", cfg.checkpoint.use_node_local_storage)
    _resolve_profiling(tree, cfg, source)
    tree.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    left = list(_auto_paths(tree))
    if left:
        raise UserError(f"{source}: {left[0]} is \"auto\", which seemore-ds cannot resolve from the YAML; give it a value")
    return tree


def _resolve_precision(tree: dict, precision: str, source: str) -> None:
    if "bfloat16" in tree:  # DeepSpeed's older spelling of the bf16 block
        if "bf16" in tree:
            raise UserError(f"{source}: has both \"bf16\" and \"bfloat16\" blocks; keep one")
        tree["bf16"] = tree.pop("bfloat16")
    for key in ("fp16", "bf16"):
        block = _block(tree, key, source)
        wanted = precision == key
        value = block.get("enabled", AUTO if wanted else False)
        if value == AUTO:
            block["enabled"] = wanted
        elif not isinstance(value, bool):
            raise UserError(f"{source}: {key}.enabled must be true, false or \"auto\", got {json.dumps(value)}")
        elif value != wanted:
            raise UserError(
                f"{source}: {key}.enabled={_show(value)} contradicts train.precision={precision}; "
                f"set {key}.enabled to \"auto\" or train.precision={key if value else 'fp32'}"
            )


def _resolve_batch(tree: dict, r: _Resolver, cfg: Config, world_size: int) -> None:
    t = cfg.train
    r.fill(tree, "train_micro_batch_size_per_gpu", "train_micro_batch_size_per_gpu", "train.batch_size", t.batch_size)
    r.fill(tree, "gradient_accumulation_steps", "gradient_accumulation_steps", "train.grad_accum", t.grad_accum)
    micro, accum = tree["train_micro_batch_size_per_gpu"], tree["gradient_accumulation_steps"]
    implied = micro * accum * world_size
    total = tree.get("train_batch_size", AUTO)
    if total == AUTO:
        tree["train_batch_size"] = implied
        return
    if total == implied:
        return
    fixes = [f"set \"train_batch_size\": \"auto\" (or {implied})"]
    if isinstance(total, int) and total > 0 and total % (micro * world_size) == 0:
        fixes.append(f"train.grad_accum={total // (micro * world_size)}")
    if isinstance(total, int) and total > 0 and total % (accum * world_size) == 0:
        fixes.append(f"train.batch_size={total // (accum * world_size)}")
    raise UserError(
        f"{r.source}: train_batch_size={json.dumps(total)} cannot hold: it must equal train.batch_size ({micro}) x "
        f"train.grad_accum ({accum}) x {world_size} rank(s) = {implied}; fix: {' or '.join(fixes)}"
    )


def _resolve_zero(tree: dict, r: _Resolver, cfg: Config) -> None:
    zero = _block(tree, "zero_optimization", r.source)
    stage = zero.setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{r.source}: zero_optimization.stage must be 0, 1, 2 or 3, got {json.dumps(stage)}")
    d = cfg.model.n_embd
    buckets = {"reduce_bucket_size": d * d, "stage3_prefetch_bucket_size": int(0.9 * d * d),
               "stage3_param_persistence_threshold": 10 * d}
    for key, value in buckets.items():
        if zero.get(key) == AUTO:
            zero[key] = value


def offload_device(tree: dict, what: str) -> str:
    """"cpu", "nvme" or "none" for ``offload_optimizer`` / ``offload_param`` of a resolved config."""
    block = tree.get("zero_optimization", {}).get(what) or {}
    return block.get("device", "none") or "none"


def _resolve_optimizer(tree: dict, r: _Resolver, cfg: Config) -> None:
    t = cfg.train
    if "optimizer" not in tree and offload_device(tree, "offload_optimizer") != "none":
        # ZeRO-Offload steps on the CPU with DeepSpeedCPUAdam, which DeepSpeed builds from this block.
        tree["optimizer"] = {"type": "AdamW", "params": {}}
    if "optimizer" in tree:
        params = _block(_block(tree, "optimizer", r.source), "params", r.source)
        r.fill(params, "lr", "optimizer.params.lr", "train.lr", t.lr, _close)
        r.fill(params, "betas", "optimizer.params.betas", "train.beta1,beta2", [t.beta1, t.beta2], _same_betas)
        r.fill(params, "eps", "optimizer.params.eps", "train.eps", t.eps, _close)
        r.fill(params, "weight_decay", "optimizer.params.weight_decay", "train.weight_decay", t.weight_decay, _close)
    if "scheduler" in tree:
        params = _block(_block(tree, "scheduler", r.source), "params", r.source)
        if params.get("warmup_min_lr") == AUTO:
            params["warmup_min_lr"] = 0.0
        r.fill(params, "warmup_max_lr", "scheduler.params.warmup_max_lr", "train.lr", t.lr, _close)
        r.fill(params, "warmup_num_steps", "scheduler.params.warmup_num_steps", "train.warmup_steps", t.warmup_steps)
        if params.get("total_num_steps") == AUTO or tree["scheduler"].get("type") == "WarmupDecayLR":
            r.fill(params, "total_num_steps", "scheduler.params.total_num_steps", "train.max_steps", t.max_steps)


def _resolve_profiling(tree: dict, cfg: Config, source: str) -> None:
    if tree.get("wall_clock_breakdown", AUTO) == AUTO:
        tree["wall_clock_breakdown"] = True
    monitor = tree.get("wandb")
    if isinstance(monitor, dict) and monitor.get("enabled"):
        raise UserError(f"{source}: wandb.enabled=true starts DeepSpeed's own W&B writer, which would clash with "
                        f"seemore-ds's; remove the \"wandb\" block and set wandb.enabled=true in the YAML")
    if cfg.profile.flops_step:
        profiler = _block(tree, "flops_profiler", source)
        # The engine counts optimizer steps from 0, profile.flops_step from 1.
        profiler.update(enabled=True, profile_step=cfg.profile.flops_step - 1,
                        output_file=str(Path(cfg.run.output_dir) / FLOPS_PROFILE_FILE))
        profiler.setdefault("detailed", True)


def _auto_paths(tree, prefix: str = ""):
    """Dotted paths of values still "auto"."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if value == AUTO:
            yield path
        else:
            yield from _auto_paths(value, path)
