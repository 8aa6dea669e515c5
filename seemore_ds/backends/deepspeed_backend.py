"""The DeepSpeed engine backend: ZeRO 0-3, CPU offload, fp16/bf16, engine-native sharded checkpoints.

Works under the ``deepspeed`` launcher (one process per rank) and as a single process. The JSON
config is resolved against the YAML in ``ds_config`` before the engine exists, identically on
every rank, so a bad config ends every rank with the same one-line error.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import socket
import warnings
from pathlib import Path

import torch

from seemore_ds import universal
from seemore_ds.backends.base import PRECISION_DTYPES, StepStats, resolve_device, timestamp
from seemore_ds.backends.ds_config import COMMS_SUMMARY_FILE, check_with_deepspeed, ds_config_for, precision_of
from seemore_ds.checkpoint import WrittenBy
from seemore_ds.compiling import check_can_compile
from seemore_ds.config import Config
from seemore_ds.data.dataset import Batch
from seemore_ds.errors import UserError
from seemore_ds.evaluation import token_loss_sum
from seemore_ds.model import SeemoreVLM
from seemore_ds.optim import lr_multiplier, param_groups
from seemore_ds.precision import agreed_precision, auto_choice
from seemore_ds.safe_pickles import weights_only_loads

def free_port() -> int:
    """A TCP port no process listens on now, for a rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_environment(device: str = "auto") -> None:
    """Pick DeepSpeed's CPU accelerator when there is no GPU, and fake a one-rank world without a launcher.

    Must run before ``deepspeed`` is imported: the accelerator is chosen at import time.
    """
    select_accelerator(resolve_device(device))
    if "WORLD_SIZE" not in os.environ:  # not launched: deepspeed.init_distributed would look for MPI
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def select_accelerator(device: torch.device) -> None:
    """DeepSpeed picks its accelerator when imported: choose the CPU one unless told otherwise or on CUDA."""
    if "DS_ACCELERATOR" not in os.environ and device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"


def unlink_shared_allreduce_buffer(rank: int) -> None:
    """Remove the name of this rank's shared-memory all-reduce buffer once every rank has mapped it.

    On CPU ranks that share one machine, DeepSpeed's shm_comm creates one 66 MB buffer per rank in
    /dev/shm and never unlinks it: each launch would leave its RAM taken until a reboot (the files
    are named by MASTER_PORT, so every new port adds 132 MB at 2 ranks). Once all ranks have
    opened each other's buffers, the names are no longer needed; the mappings live on, and the
    kernel frees the memory when the last rank exits, even a killed one. Call after a barrier.
    """
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"
    with contextlib.suppress(FileNotFoundError):  # not created: ranks on several machines, or no shm_comm
        os.unlink(Path("/dev/shm") / name)


def _reset_timers(timers, names, normalizer=1.0, reset=True, memory_breakdown=False, ranks=None) -> None:
    """DeepSpeed's ``SynchronizedWallClockTimer.log`` without the printing."""
    for name in names:
        if reset and name in timers.timers:
            timers.timers[name].reset()


def _skip_nonfinite_updates(optimizer) -> None:
    """Make a step on NaN/Inf gradients a skipped one, as ZeRO and fp16 already do.

    Without them DeepSpeed steps a plain optimizer on whatever the gradients hold. The engine reads
    ``optimizer.overflow`` after the step: it then counts a skipped step and holds the LR schedule.
    That is a Python bool, so deciding it costs a host sync per step, as DeepSpeed's own overflow checks
    (fp16, ZeRO) do: the engine's interface allows no skip decided on the device.
    """
    step = optimizer.step

    @functools.wraps(step)  # keeps the LR scheduler's mark on the step it wrapped, which it checks for
    def step_unless_nonfinite(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        optimizer.overflow = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if not optimizer.overflow:
            step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = step_unless_nonfinite


def comms_table(summary: dict, world_size: int) -> str:
    """DeepSpeed's comms_logger summary as a text table: one row per operation and message size."""
    lines = [f"# collectives of rank 0 of {world_size}, recorded by DeepSpeed's comms_logger",
             f"{'operation':<24} {'count':>7} {'bytes':>14} {'total_ms':>10} {'avg_ms':>9}"]
    for operation, sizes in sorted(summary.items()):
        for size, row in sorted(sizes.items()):
            lines.append(f"{operation:<24} {row['count']:>7} {int(size):>14} {row['total_latency_ms']:>10.2f} "
                         f"{row['avg_latency_ms']:>9.3f}")
    return "\n".join(lines) + "\n"


class DeepSpeedBackend:
    def __init__(self, model: SeemoreVLM, cfg: Config):
        # A dry settling first, of a copy, from files and environment only: a bad config is refused alike on
        # every rank before anything is started or changed. train.precision=auto is settled for real below.
        ds_config_for(copy.deepcopy(cfg), int(os.environ.get("WORLD_SIZE", 1)))
        prepare_environment(cfg.train.device)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # the trainer does the talking
        # DeepSpeed 0.19 still calls collectives that torch 2.13 deprecates, once per rank and name.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
        accelerator = get_accelerator()
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if accelerator.device_name() == "cpu":  # one rank too: shm_comm maps a buffer at any world size
            torch.distributed.barrier()  # past it, every rank has mapped its peers' buffers (in init_distributed)
            unlink_shared_allreduce_buffer(self.rank)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")

        def pick_auto(open_precisions: tuple[str, ...], micro_batch: int) -> str:  # a broadcast from rank 0
            return agreed_precision(lambda: auto_choice(model, micro_batch, self.device, open_precisions), self.rank, self.device)

        # Settled from files, the environment and, for train.precision=auto, rank 0's pick, which every rank
        # receives: every rank settles alike. cfg adopts the JSON's concrete values for keys left at their
        # defaults: the trainer then saves them.
        self.ds_config, source, adopted = ds_config_for(cfg, self.world_size, pick_auto)
        check_with_deepspeed(self.ds_config, source)
        if self.ds_config["fp16"]["enabled"] and not accelerator.is_fp16_supported():
            raise UserError(f"fp16 ({source}, train.precision=fp16) is not supported on {accelerator.device_name()}; "
                            f"use train.precision=bf16 (and \"bf16\": {{\"enabled\": \"auto\"}})")
        if self.ds_config["bf16"]["enabled"] and not accelerator.is_bf16_supported():
            raise UserError(f"bf16 is not supported on {accelerator.device_name()}; use train.precision=fp32")
        if self.rank == 0:
            for line in adopted:
                print(line, flush=True)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        self.precision = precision_of(self.ds_config)  # what the run trains in: train.precision with auto settled
        self.train_cfg = cfg.train

        # A torch AdamW avoids the JIT build of DeepSpeed's fused_adam; fused, as on the engine-free backend (one
        # kernel per parameter group, on the CPU too). A JSON "optimizer" block (needed for offload:
        # DeepSpeedCPUAdam) is built by DeepSpeed instead.
        optimizer = scheduler = None
        if "optimizer" not in self.ds_config:
            optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                          betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps, fused=True)
        if "scheduler" not in self.ds_config:  # DeepSpeed calls it with the optimizer it builds
            scheduler = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: lr_multiplier(step, cfg.train))

        if "activation_checkpointing" in self.ds_config:
            # Configured from the JSON's block; the blocks' inputs are then recomputed in the backward.
            deepspeed.checkpointing.configure(None, deepspeed_config=self.ds_config)
            blocks = model.checkpoint_blocks(deepspeed.checkpointing.checkpoint)
            if self.rank == 0:
                print(f"activation checkpointing ({source}): {blocks} ViT and decoder blocks keep only their inputs "
                      f"and recompute the rest in the backward", flush=True)
        # ZeRO-3 partitions the model's parameters; evaluation and generation use a full copy
        # (see _full_model) so that ranks with unequal work never wait on each other's all-gathers.
        self._replica = copy.deepcopy(model) if self.zero_stage == 3 else None
        self._replica_step = -1
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            model_parameters=param_groups(model, cfg.train.weight_decay) if optimizer is None else None,
            config=self.ds_config,
        )
        if self._replica is not None:
            self._replica.to(device=self.device, dtype=PRECISION_DTYPES.get(self.precision, torch.float32))
        # With wall_clock_breakdown (or the flops profiler) the engine prints its timers at every step;
        # the trainer writes them to timing_logs.csv instead, so the engine's log call only resets them.
        self.engine.timers.log = functools.partial(_reset_timers, self.engine.timers)
        if not hasattr(self.engine.optimizer, "overflow"):
            _skip_nonfinite_updates(self.engine.optimizer)
        if cfg.train.compile:
            check_can_compile(self.device)
            self.engine.compile()

    @property
    def module(self) -> torch.nn.Module:
        """The bare SeemoreVLM with the current weights; under ZeRO-3 a gathered full copy.

        Under ZeRO-3 this is a collective the first time after each step: every rank must ask.
        """
        return self._full_model() if self._replica is not None else self.engine.module

    def _full_model(self) -> torch.nn.Module:
        import deepspeed

        if self._replica_step != self.engine.global_steps:
            params = list(self.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                with torch.no_grad():
                    for full, partitioned in zip(self._replica.parameters(), params):
                        full.copy_(partitioned.data)
            self._copy_buffers_to_replica()
            self._replica_step = self.engine.global_steps
        return self._replica

    def train_step(self, micro_batches: list[Batch], timed: bool) -> StepStats:
        engine = self.engine
        engine.train()
        forward_s = backward_s = optimizer_s = 0.0
        total_loss = torch.zeros((), device=self.device)
        skipped_before = engine.skipped_steps
        lr = engine.get_lr()[0]  # the rate this step uses; the scheduler moves on inside engine.step()
        grad_norm = None
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            t0 = timestamp(self.device, timed)
            _, loss = engine(batch.images, batch.input_ids, batch.targets)
            t1 = timestamp(self.device, timed)
            engine.backward(loss)  # divides by gradient_accumulation_steps itself
            t2 = timestamp(self.device, timed)
            if i == len(micro_batches) - 1 and not hasattr(engine.optimizer, "_global_grad_norm"):
                grad_norm = self._grad_norm()  # plain fp32 data parallelism: the engine clips but keeps no norm
            engine.step()  # an optimizer step only at the accumulation boundary
            t3 = timestamp(self.device, timed)
            forward_s, backward_s, optimizer_s = forward_s + t1 - t0, backward_s + t2 - t1, optimizer_s + t3 - t2
            total_loss += loss.detach().float()
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        allreduce_s = None
        if timed and engine.wall_clock_breakdown():  # the engine's own breakdown of this optimizer step, in ms
            ms = engine.get_wall_clock_timers()  # names from deepspeed.utils.timer's *_GLOBAL_TIMER
            forward_s, backward_s, allreduce_s, optimizer_s = (ms[name] / 1e3 for name in ("fwd", "bwd_inner", "bwd_allreduce", "step"))
        loss = total_loss / len(micro_batches)
        return StepStats(
            loss=loss, grad_norm=None if grad_norm is None else torch.as_tensor(grad_norm, dtype=torch.float32),
            lr=torch.tensor(lr, dtype=torch.float64), forward_s=forward_s, backward_s=backward_s, optimizer_s=optimizer_s,
            backward_allreduce_s=allreduce_s, loss_scale=self._loss_scale(),
            # The engine has decided on the host already; the flag joins the guard's tallies on the device.
            skipped=torch.tensor(engine.skipped_steps != skipped_before, device=self.device),
            nonfinite=~torch.isfinite(loss),
        )

    def profiled_forward(self) -> tuple[float, int] | None:
        """Set on global rank 0 once the engine has profiled its flops_profiler.profile_step."""
        profiler = getattr(self.engine, "flops_profiler", None)
        flops = getattr(profiler, "flops", None)
        return (flops, profiler.params) if flops else None

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def _loss_scale(self) -> float | None:
        if self.precision != "fp16":
            return None
        optimizer = self.engine.optimizer
        scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
        return None if scale is None else float(scale)

    def eval_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self._replica is not None:
            model = self._full_model()
            model.eval()
            return token_loss_sum(model, batch.to(self.device))
        self.engine.eval()
        return token_loss_sum(self.engine, batch.to(self.device))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._replica is not None:
            self._full_model()  # a rank with no eval batch joins the gather the others made in eval_loss
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def average_running_stats(self) -> None:
        if self.world_size == 1:
            return
        for module in self.engine.module.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                for stats in (module.running_mean, module.running_var):  # buffers: never partitioned by ZeRO
                    torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
                    stats.div_(self.world_size)
        if self._replica is not None:
            self._copy_buffers_to_replica()

    def _copy_buffers_to_replica(self) -> None:
        """BatchNorm's statistics into the ZeRO-3 evaluation copy; buffers are whole on every rank, no gather."""
        with torch.no_grad():
            for full, own in zip(self._replica.buffers(), self.engine.module.buffers()):
                full.copy_(own)

    def barrier(self) -> None:
        torch.distributed.barrier()

    def layout(self) -> WrittenBy:
        return WrittenBy("deepspeed", self.world_size, self.zero_stage, self.precision)

    def finish(self, run_dir: Path) -> None:
        """With a comms_logger block: every collective of the run, per operation and message size, printed
        by rank 0 and saved to RUN/comms_summary.txt. A collective: every rank calls it."""
        if not self.ds_config.get("comms_logger", {}).get("enabled"):
            return
        import deepspeed.comm

        summary = deepspeed.comm.log_summary(return_dict=True)["summary"]
        if self.rank == 0:
            table = comms_table(summary, self.world_size)
            (run_dir / COMMS_SUMMARY_FILE).write_text(table, encoding="utf-8")
            print(f"comms ({run_dir / COMMS_SUMMARY_FILE}):\n{table}", end="", flush=True)

    def save(self, checkpoint_dir: Path) -> None:
        """DeepSpeed's sharded checkpoint in ``checkpoint_dir``: every rank writes its own shards."""
        self.engine.save_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name, client_state={},
                                    save_latest=False)

    def load(self, checkpoint_dir: Path) -> None:
        """A checkpoint of this backend at this rank count and stage, as DeepSpeed wrote it."""
        with weights_only_loads(checkpoint_dir):  # a checkpoint from elsewhere must not run code
            path, _ = self.engine.load_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
        if path is None:
            raise UserError(f"DeepSpeed found no checkpoint in {checkpoint_dir}")
        self._replica_step = -1

    def load_universal(self, folder: Path) -> None:
        """A universal folder (``universal.py``): DeepSpeed's own loader at ZeRO 1-3, ours at stage 0.

        The schedule is set from its saved position rather than loaded, so that either backend's
        schedule (LambdaLR, or a JSON one such as WarmupLR) resumes; the optimizer's hyperparameters are
        this run's config (DeepSpeed's ZeRO-3 loader would give every group the first group's)."""
        engine = self.engine
        state = None
        if self.zero_stage == 0:
            state = self._load_universal_stage0(folder)
        else:
            engine._config.load_universal_checkpoint = True  # read at load time only: the engine is built already
            try:
                with weights_only_loads(folder):
                    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_lr_scheduler_states=False)
            finally:
                engine._config.load_universal_checkpoint = False
            if path is None:
                raise UserError(f"DeepSpeed found no checkpoint in {folder}")
            if hasattr(engine.optimizer, "clip_grad"):  # the ZeRO 1-2 loader takes the checkpoint's over the config
                engine.optimizer.clip_grad = self.ds_config.get("gradient_clipping", 0.0)
            # The ZeRO-3 loader hands every group one and the same step tensor, which a fused or foreach
            # AdamW then advances in place once per group: the second group's bias correction would run ahead.
            inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
            for param_state in inner.state.values():
                if torch.is_tensor(param_state.get("step")):
                    param_state["step"] = param_state["step"].clone()
        for group, weight_decay in zip(engine.optimizer.param_groups, (self.train_cfg.weight_decay, 0.0)):
            group.update(weight_decay=weight_decay, betas=(self.train_cfg.beta1, self.train_cfg.beta2), eps=self.train_cfg.eps)
        saved = torch.load(folder / universal.MODEL_STATES, map_location="cpu", weights_only=True)
        with torch.no_grad():  # DeepSpeed's universal loader restores parameters only, not BatchNorm's statistics
            for name, buffer in engine.module.named_buffers():
                buffer.copy_(saved["module"][name])
        updates = state.updates if state else int(saved["global_steps"]) - int(saved["skipped_steps"])
        _set_schedule_position(engine.lr_scheduler, engine.optimizer,
                               universal.schedule_position(saved["lr_scheduler"], updates))
        self._replica_step = -1

    def _load_universal_stage0(self, folder: Path):
        """Stage 0 keeps a whole model and a plain optimizer on every rank: load them directly."""
        optimizer = self.engine.optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(f"ZeRO stage 0 in {self.precision} wraps its optimizer in a form seemore-ds cannot load "
                            f"{folder} into; resume with train.precision=fp32 at stage 0, or with ZeRO stage 1-3")
        module = self.engine.module
        state = universal.read_universal(folder, module)
        module.load_state_dict({**state.weights, **state.buffers})
        names = universal.group_names(module, self.train_cfg.weight_decay)
        optimizer.load_state_dict(universal.optimizer_state_dict(state, names, self.device,
                                                                 universal.hyperparameters(optimizer.param_groups)))
        self.engine.global_steps, self.engine.skipped_steps = state.global_steps, state.skipped_steps
        return state


def _set_schedule_position(scheduler, optimizer, position: int) -> None:
    """Put a schedule where it is after ``position`` applied updates, and the optimizer at its rate."""
    if scheduler is None:
        return
    if hasattr(scheduler, "last_batch_iteration"):  # DeepSpeed's WarmupLR family: step(i) sets the rate of update i
        scheduler.step(position - 1)
        return
    rates = [base * rate(position) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]  # LambdaLR
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler.last_epoch, scheduler._last_lr = position, rates
