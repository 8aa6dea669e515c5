"""DeepSpeed JSON configs: loading, settling them with the YAML run config, refusing contradictions.

DeepSpeed itself does not resolve ``"auto"`` (at the top level it breaks, inside blocks it is
silently dropped), and users bring JSONs written for other trainers, so every value DeepSpeed and
the YAML both speak of is settled here, before ``deepspeed.initialize``, by one rule
(docs/deepspeed.md, "Bring your own DeepSpeed JSON"):

- ``"auto"``, or a key the JSON leaves out, takes the YAML's value;
- a concrete JSON value must agree with a YAML key the user set (in the YAML file or on the command
  line): disagreement is refused, naming both and the fix;
- a concrete JSON value replaces a YAML key left at its default, and says so in one line
  (``train.batch_size=4 from ds.json train_micro_batch_size_per_gpu``): the run config then holds the values used.

``train.precision=auto`` (the default) is never a disagreement: a concrete ``bf16``/``fp16``
``enabled: true`` decides it, ``false`` rules that precision out, and what is left open is picked by
``pick_auto`` (``seemore_ds.precision``: measured, or the GPU rule). The run config keeps ``auto``;
the precision used is the resolved tree's (``precision_of``).

The YAML keys concerned: precision, the batch triple, clipping, optimizer and scheduler parameters,
node-local checkpoints, ``profile.flops_step`` (``flops_profiler``) and the W&B sink (``wandb``,
which the trainer writes itself, so DeepSpeed's own W&B writer is never started). ``csv_monitor`` and
``tensorboard`` write under the run folder unless their path is absolute; every other block and key
passes through to DeepSpeed untouched. Settling is a pure function of (JSON, YAML, world size), so
every rank reaches the same verdict before any collective starts: an error ends all ranks alike.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path
from typing import Callable

from seemore_ds.config import Config, validate
from seemore_ds.errors import UserError
from seemore_ds.precision import PRECISIONS, Choice
from seemore_ds.profiling.flops_profile import FLOPS_PROFILE_FILE

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

# Optimizers seemore-ds trains with: DeepSpeed's names, lower-cased as DeepSpeed compares them.
OPTIMIZERS = ("adam", "adamw")
# Scheduler type -> {params key: (YAML key, kind)}; a key the JSON leaves out is filled as "auto" is.
SCHEDULER_PARAMS = {
    "WarmupLR": {"warmup_max_lr": ("train.lr", "rate"), "warmup_num_steps": ("train.warmup_steps", "count")},
    "WarmupDecayLR": {"warmup_max_lr": ("train.lr", "rate"), "warmup_num_steps": ("train.warmup_steps", "count"),
                      "total_num_steps": ("train.max_steps", "positive")},
    "WarmupCosineLR": {"warmup_num_steps": ("train.warmup_steps", "count"), "total_num_steps": ("train.max_steps", "positive"),
                       "cos_min_ratio": ("train.min_lr_ratio", "ratio")},
    "OneCycle": {"cycle_max_lr": ("train.lr", "rate"), "cycle_first_step_size": ("train.warmup_steps", "positive")},
    "LRRangeTest": {"lr_range_test_min_lr": ("train.lr", "rate")},
}
# Scheduler params with a fixed value for "auto" (no YAML key of their own).
SCHEDULER_AUTO_CONSTANTS = {"warmup_min_lr": 0.0, "warmup_min_ratio": 0.0}
COMMS_SUMMARY_FILE = "comms_summary.txt"  # in the run folder, when the JSON has a comms_logger block


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


# Picks train.precision=auto among the precisions the JSON leaves open, at the run's micro-batch.
PickAuto = Callable[[tuple[str, ...], int], str]


def ds_config_for(cfg: Config, world_size: int, pick_auto: PickAuto | None = None) -> tuple[dict, str, list[str]]:
    """(resolved DeepSpeed config, where it came from, one line per value ``cfg`` adopted from it or
    decided by it, such as ``precision: auto -> bf16 (ds.json bf16.enabled=true)``)."""
    path = cfg.train.deepspeed_config
    raw, source = (load_ds_json(path), path) if path else (DEFAULT_DS_CONFIG, "the built-in DeepSpeed config")
    tree, adopted = resolve_ds_config(raw, cfg, world_size, source, pick_auto)
    return tree, source, adopted


def precision_of(tree: dict) -> str:
    """The precision a resolved DeepSpeed config trains in."""
    return "bf16" if tree["bf16"]["enabled"] else "fp16" if tree["fp16"]["enabled"] else "fp32"


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return a == b
    return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# kind -> (accepts, what it must be, JSON value -> YAML value)
KINDS = {
    "positive": (lambda v: _number(v) and v >= 1 and float(v).is_integer(), "a positive integer", int),
    "count": (lambda v: _number(v) and v >= 0 and float(v).is_integer(), "an integer >= 0", int),
    "rate": (lambda v: _number(v) and v >= 0, "a number >= 0", float),
    "ratio": (lambda v: _number(v) and 0 <= v <= 1, "a number from 0 to 1", float),
    "beta": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", float),
    "bool": (lambda v: isinstance(v, bool), "true, false or \"auto\"", bool),
    "text": (lambda v: isinstance(v, str), "a string", str),
}


class _Resolver:
    """Settles one config tree (in place) with ``cfg`` (in place); ``source`` names the file in every message."""

    def __init__(self, tree: dict, cfg: Config, source: str):
        self.tree, self.cfg, self.source = tree, cfg, source
        self.taken_from: dict[str, str] = {}  # YAML key -> the JSON key whose concrete value it holds
        self.adopted: list[str] = []  # one line per YAML value the JSON changed
        self.autos: list[tuple[dict, str, str]] = []  # (block, key, YAML key): filled once every concrete value is in
        self.precision: str | None = None  # the run's; None while train.precision=auto is still open
        self.open_precisions: tuple[str, ...] = ()  # what auto may still pick, when it is open

    def yaml(self, key: str):
        section, name = key.split(".")
        return getattr(getattr(self.cfg, section), name)

    def block(self, tree: dict, key: str, where: str | None = None) -> dict:
        """``tree[key]`` as a JSON object, created empty when missing."""
        block = tree.setdefault(key, {})
        if not isinstance(block, dict):
            raise UserError(f"{self.source}: \"{where or key}\" must be a JSON object, got {json.dumps(block)}")
        return block

    def concrete(self, value, where: str, kind: str):
        """``value`` checked against ``kind``, as the YAML key's type; a bad one is refused naming ``where``."""
        accepts, wanted, convert = KINDS[kind]
        if not accepts(value):
            raise UserError(f"{self.source}: {where} must be {wanted}, got {json.dumps(value)}")
        return convert(value)

    def settle(self, block: dict, key: str, where: str, yaml_key: str, kind: str) -> None:
        """``block[key]``: "auto" or missing -> the YAML value; concrete -> agreed, adopted or refused."""
        value = block.get(key, AUTO)
        if value == AUTO:
            self.autos.append((block, key, yaml_key))
            return
        block[key] = self.concrete(value, where, kind)
        self.agree(where, block[key], yaml_key)

    def fill_autos(self) -> None:
        """Every "auto" and left-out key from the YAML, after the JSON's concrete values have been adopted."""
        for block, key, yaml_key in self.autos:
            block[key] = self.yaml(yaml_key)

    def agree(self, where: str, value, yaml_key: str, json_value=None, how: str = "") -> None:
        """The JSON's ``where`` (``json_value``, when it is not ``value`` itself) means ``value`` for
        ``yaml_key``: adopt it unless the user set that key or another JSON key already did."""
        current = self.yaml(yaml_key)
        if not _same(value, current):
            said = f"{where}={json.dumps(value if json_value is None else json_value)}"
            if yaml_key in self.cfg.explicit_keys:
                raise UserError(f"{self.source}: {said} contradicts {yaml_key}={_show(current)}; "
                                f"set {where} to \"auto\" or {yaml_key}={_show(value)}")
            if yaml_key in self.taken_from:
                raise UserError(f"{self.source}: {said} contradicts {self.taken_from[yaml_key]} in the same file, "
                                f"which set {yaml_key}={_show(current)}; make them agree")
            section, name = yaml_key.split(".")
            setattr(getattr(self.cfg, section), name, value)
            self.adopted.append(f"{yaml_key}={_show(value)} from {self.source} {where}" + (f" ({how})" if how else ""))
        self.taken_from.setdefault(yaml_key, where)


def resolve_ds_config(raw: dict, cfg: Config, world_size: int, source: str = "DeepSpeed config",
                      pick_auto: PickAuto | None = None) -> tuple[dict, list[str]]:
    """(a copy of ``raw`` with every value settled, one line per value ``cfg`` adopted from it).

    ``cfg`` takes the JSON's concrete values for the keys the user left at their defaults; anything
    that cannot hold raises a one-line UserError. ``pick_auto`` settles a train.precision=auto that the
    JSON leaves open, once everything else has held; without one (a resolution that trains nothing)
    it settles as fp32.
    """
    tree = copy.deepcopy(raw)
    r = _Resolver(tree, cfg, source)
    _resolve_precision(r)
    _resolve_batch(r, world_size)
    r.settle(tree, "gradient_clipping", "gradient_clipping", "train.grad_clip", "rate")
    _resolve_zero(r)
    _resolve_optimizer(r)
    _resolve_scheduler(r)
    r.settle(r.block(tree, "checkpoint"), "use_node_local_storage", "checkpoint.use_node_local_storage",
             "checkpoint.use_node_local_storage", "bool")
    _resolve_monitors(r)
    _resolve_flops_profiler(r)
    r.fill_autos()
    if tree.get("wall_clock_breakdown", AUTO) == AUTO:  # the engine's timers fill timing_logs.csv
        tree["wall_clock_breakdown"] = True
    tree.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    # fp16/bf16 "enabled" are set below, once the precision is settled
    left = [path for path in _auto_paths(tree) if path not in ("fp16.enabled", "bf16.enabled")]
    if left:
        raise UserError(f"{source}: {left[0]} is \"auto\", which seemore-ds cannot resolve from the YAML; give it a value")
    if r.adopted:
        try:
            validate(cfg)
        except UserError as err:
            raise UserError(f"{source}: {err} (after taking {', '.join(r.adopted)})") from None
    if r.precision is None:  # last: the pick may measure, and every rank must have come this far alike
        r.precision = pick_auto(r.open_precisions, cfg.train.batch_size) if pick_auto else "fp32"
    for key in ("fp16", "bf16"):
        tree[key]["enabled"] = r.precision == key
    return tree, r.adopted


def _resolve_precision(r: _Resolver) -> None:
    tree = r.tree
    if "bfloat16" in tree:  # DeepSpeed's older spelling of the bf16 block
        if "bf16" in tree:
            raise UserError(f"{r.source}: has both \"bf16\" and \"bfloat16\" blocks; keep one")
        tree["bf16"] = tree.pop("bfloat16")
    said = {}  # "fp16" / "bf16" -> the concrete enabled value
    for key in ("fp16", "bf16"):
        value = r.block(tree, key).get("enabled", AUTO)
        if value != AUTO:
            said[key] = r.concrete(value, f"{key}.enabled", "bool")
    if said.get("fp16") and said.get("bf16"):
        raise UserError(f"{r.source}: fp16.enabled and bf16.enabled are both true; keep one of them (or set it to \"auto\")")
    wanted = next((key for key, on in said.items() if on), None)
    precision = r.cfg.train.precision
    if precision == AUTO:  # the JSON decides what it says; auto picks among the rest, later
        r.open_precisions = (wanted,) if wanted else tuple(p for p in PRECISIONS if said.get(p) is not False)
        if len(r.open_precisions) == 1:
            r.precision = r.open_precisions[0]
            said_line = f"{wanted}.enabled=true" if wanted else "bf16.enabled=false and fp16.enabled=false"
            r.adopted.append(Choice(r.precision, f"{r.source} {said_line}").line())
        return
    if wanted:
        _settle_precision(r, wanted, f"{wanted}.enabled")
    elif said.get(precision) is False:  # the JSON turns off what the YAML asks for: fp32, unless the user set it
        _settle_precision(r, "fp32", f"{precision}.enabled")
    r.precision = r.cfg.train.precision


def _settle_precision(r: _Resolver, precision: str, where: str) -> None:
    """The JSON's ``where`` (an fp16/bf16 ``enabled``) asks for ``precision``."""
    current = r.cfg.train.precision
    if current != precision:
        enabled = precision != "fp32"
        if "train.precision" in r.cfg.explicit_keys:
            raise UserError(f"{r.source}: {where}={_show(enabled)} contradicts train.precision={current}; "
                            f"set {where} to \"auto\" or train.precision={precision}")
        r.cfg.train.precision = precision
        r.adopted.append(f"train.precision={precision} from {r.source} {where}")
    r.taken_from.setdefault("train.precision", where)


def _resolve_batch(r: _Resolver, world_size: int) -> None:
    tree, cfg = r.tree, r.cfg
    micro_key, accum_key, total_key = "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"
    free = []  # YAML keys at their defaults that the JSON's train_batch_size may set
    for key, yaml_key in ((micro_key, "train.batch_size"), (accum_key, "train.grad_accum")):
        value = tree.get(key, AUTO)
        if value == AUTO:
            if yaml_key not in cfg.explicit_keys:
                free.append(yaml_key)
        else:
            r.agree(key, r.concrete(value, key, "positive"), yaml_key)
    total = tree.get(total_key, AUTO)
    if total != AUTO:
        total = r.concrete(total, total_key, "positive")
        micro, accum = cfg.train.batch_size, cfg.train.grad_accum
        if micro * accum * world_size != total:
            # accumulation first: the micro-batch is what the memory was sized for
            for yaml_key, other, other_name in (("train.grad_accum", micro, "train.batch_size"),
                                                ("train.batch_size", accum, "train.grad_accum")):
                if yaml_key in free and total % (other * world_size) == 0:
                    r.agree(total_key, total // (other * world_size), yaml_key, json_value=total,
                            how=f"{total} / ({other_name} {other} x {world_size} rank(s))")
                    break
    micro, accum = cfg.train.batch_size, cfg.train.grad_accum
    implied = micro * accum * world_size
    if total != AUTO and total != implied:
        fixes = [f"set \"{total_key}\": \"auto\" (or {implied})"]
        if total % (micro * world_size) == 0:
            fixes.append(f"train.grad_accum={total // (micro * world_size)}")
        if total % (accum * world_size) == 0:
            fixes.append(f"train.batch_size={total // (accum * world_size)}")
        raise UserError(
            f"{r.source}: {total_key}={total} cannot hold: it must equal train.batch_size ({micro}) x "
            f"train.grad_accum ({accum}) x {world_size} rank(s) = {implied}; fix: {' or '.join(fixes)}"
        )
    tree.update({micro_key: micro, accum_key: accum, total_key: implied})


def _resolve_zero(r: _Resolver) -> None:
    zero = r.block(r.tree, "zero_optimization")
    stage = zero.setdefault("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"{r.source}: zero_optimization.stage must be 0, 1, 2 or 3, got {json.dumps(stage)}")
    zero["stage"] = int(stage)
    # DeepSpeed reads offload_param at stage 3 only (DeepSpeed-Chat's JSONs carry it at every stage), but an
    # offloaded optimizer at stage 0 would step the GPU's parameters on the CPU.
    for what, lowest in (("offload_optimizer", 1), ("offload_param", 0)):
        if what in zero and zero[what] is not None:
            offload = r.block(zero, what, f"zero_optimization.{what}")
            device = offload.get("device", "none")
            if device not in ("none", "cpu", "nvme", None):
                raise UserError(f"{r.source}: zero_optimization.{what}.device must be \"none\", \"cpu\" or \"nvme\", "
                                f"got {json.dumps(device)}")
            if device not in ("none", None) and stage < lowest:
                raise UserError(f"{r.source}: zero_optimization.{what} needs ZeRO stage {lowest} or more, the "
                                f"config says stage {stage}; raise zero_optimization.stage or set {what}.device to \"none\"")
    d = r.cfg.model.n_embd
    buckets = {"reduce_bucket_size": d * d, "stage3_prefetch_bucket_size": int(0.9 * d * d),
               "stage3_param_persistence_threshold": 10 * d}
    for key, value in buckets.items():
        if zero.get(key) == AUTO:
            zero[key] = value


def offload_device(tree: dict, what: str) -> str:
    """"cpu", "nvme" or "none" for ``offload_optimizer`` / ``offload_param`` of a resolved config."""
    block = tree.get("zero_optimization", {}).get(what) or {}
    return block.get("device", "none") or "none"


def _resolve_optimizer(r: _Resolver) -> None:
    tree = r.tree
    if "optimizer" not in tree and offload_device(tree, "offload_optimizer") != "none":
        # ZeRO-Offload steps on the CPU with DeepSpeedCPUAdam, which DeepSpeed builds from this block.
        tree["optimizer"] = {"type": "AdamW", "params": {}}
    if "optimizer" not in tree:
        return
    optimizer = r.block(tree, "optimizer")
    kind = optimizer.get("type", AUTO)
    if not isinstance(kind, str) or kind.lower() not in OPTIMIZERS:
        raise UserError(f"{r.source}: optimizer.type={json.dumps(kind)} is not one seemore-ds trains with; "
                        f"use \"AdamW\" or \"Adam\", or remove the \"optimizer\" block (a torch AdamW is used)")
    params = r.block(optimizer, "params", "optimizer.params")
    r.settle(params, "lr", "optimizer.params.lr", "train.lr", "rate")
    betas = params.get("betas", AUTO)
    if betas == AUTO:
        params["betas"] = [AUTO, AUTO]
        r.autos += [(params["betas"], 0, "train.beta1"), (params["betas"], 1, "train.beta2")]
    elif not (isinstance(betas, list) and len(betas) == 2):
        raise UserError(f"{r.source}: optimizer.params.betas must be two numbers such as [0.9, 0.999], got {json.dumps(betas)}")
    else:
        for i, yaml_key in enumerate(("train.beta1", "train.beta2")):
            betas[i] = r.concrete(betas[i], f"optimizer.params.betas[{i}]", "beta")
            r.agree(f"optimizer.params.betas[{i}]", betas[i], yaml_key)
    r.settle(params, "eps", "optimizer.params.eps", "train.eps", "rate")
    r.settle(params, "weight_decay", "optimizer.params.weight_decay", "train.weight_decay", "rate")


def _resolve_scheduler(r: _Resolver) -> None:
    if "scheduler" not in r.tree:
        return
    scheduler = r.block(r.tree, "scheduler")
    kind = scheduler.get("type")
    if kind not in SCHEDULER_PARAMS:
        raise UserError(f"{r.source}: scheduler.type={json.dumps(kind)} is not one of DeepSpeed's "
                        f"({', '.join(SCHEDULER_PARAMS)}); fix it, or remove the \"scheduler\" block (cosine from the YAML)")
    params = r.block(scheduler, "params", "scheduler.params")
    for key, value in SCHEDULER_AUTO_CONSTANTS.items():
        if params.get(key) == AUTO:
            params[key] = value
    for key, (yaml_key, kind_of_value) in SCHEDULER_PARAMS[kind].items():
        r.settle(params, key, f"scheduler.params.{key}", yaml_key, kind_of_value)


def _resolve_monitors(r: _Resolver) -> None:
    tree, run_dir = r.tree, Path(r.cfg.run.output_dir)
    if "wandb" in tree:
        # The trainer's own W&B sink takes the block, so that one writer logs the run.
        block = r.block(tree, "wandb")
        r.settle(block, "enabled", "wandb.enabled", "wandb.enabled", "bool")
        if r.cfg.wandb.enabled:
            for key, yaml_key in (("project", "wandb.project"), ("team", "wandb.entity"), ("group", "wandb.group")):
                if block.get(key) is not None:  # DeepSpeed's default for each is null
                    r.settle(block, key, f"wandb.{key}", yaml_key, "text")
        del tree["wandb"]
    for name in ("csv_monitor", "tensorboard"):
        if name not in tree:
            continue
        block = r.block(tree, name)
        if block.get("enabled") is True:
            if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
                raise UserError(f"{r.source}: the \"tensorboard\" block needs the tensorboard package: "
                                f"pip install tensorboard (or set tensorboard.enabled to false)")
            path = block.get("output_path") or ""
            if not isinstance(path, str):
                raise UserError(f"{r.source}: {name}.output_path must be a folder name, got {json.dumps(path)}")
            block["output_path"] = str(run_dir / path)  # an absolute path stays as it is


def _resolve_flops_profiler(r: _Resolver) -> None:
    """One profiled step either way: profile.flops_step counts optimizer steps from 1, DeepSpeed's
    profile_step from 0; the report always goes to RUN/flops_profile.txt."""
    tree, cfg = r.tree, r.cfg
    profiler = tree.get("flops_profiler")
    if profiler is None:
        if not cfg.profile.flops_step:
            return
        profiler = tree["flops_profiler"] = {"enabled": True}
    profiler = r.block(tree, "flops_profiler")
    enabled = profiler.get("enabled", False)  # DeepSpeed's default
    if enabled == AUTO:
        enabled = bool(cfg.profile.flops_step)
    enabled = r.concrete(enabled, "flops_profiler.enabled", "bool")
    if not enabled:
        if cfg.profile.flops_step and "profile.flops_step" in cfg.explicit_keys:
            raise UserError(f"{r.source}: flops_profiler.enabled=false contradicts profile.flops_step="
                            f"{cfg.profile.flops_step}; set flops_profiler.enabled to \"auto\" or profile.flops_step=0")
        profiler["enabled"] = False
        cfg.profile.flops_step = 0
        return
    step = profiler.get("profile_step", AUTO if cfg.profile.flops_step else 1)  # DeepSpeed's default: 1
    if step == AUTO:
        step = max(cfg.profile.flops_step, 1) - 1
    step = r.concrete(step, "flops_profiler.profile_step", "count")
    r.agree("flops_profiler.profile_step", step + 1, "profile.flops_step", json_value=step,
            how=f"{step} counted from 0")
    profiler.update(enabled=True, profile_step=step, output_file=str(Path(cfg.run.output_dir) / FLOPS_PROFILE_FILE))
    profiler.setdefault("detailed", True)


def check_with_deepspeed(tree: dict, source: str) -> None:
    """DeepSpeed's own config class on the resolved tree: what it refuses becomes one line.

    Import deepspeed only after the accelerator is chosen. Before the process group exists DeepSpeed's
    config may count one rank or the launcher's, so train_batch_size (which resolution checked against
    the real world size) is left for it to derive from the other two.
    """
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig({k: v for k, v in copy.deepcopy(tree).items() if k != "train_batch_size"})
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{source}: DeepSpeed refuses {where}: {first['msg']}") from None
    except (ValueError, AssertionError, TypeError, KeyError) as err:
        raise UserError(f"{source}: DeepSpeed refuses the config: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _auto_paths(tree, prefix: str = ""):
    """Dotted paths of values still "auto"."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if value == AUTO:
            yield path
        else:
            yield from _auto_paths(value, path)
