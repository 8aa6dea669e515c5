"""The DeepSpeed engine backend: ZeRO 0-3, CPU offload, fp16/bf16, engine-native sharded checkpoints.

Works under the ``deepspeed`` launcher (one process per rank) and as a single process. The JSON
config is resolved against the YAML in ``ds_config`` before the engine exists, identically on
every rank, so a bad config ends every rank with the same one-line error.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed import ReduceOp

from seemore_ds import universal
from seemore_ds.backends import deepspeed_compat as compat
from seemore_ds.backends.base import StepStats, resolve_device, run_micro_batches
from seemore_ds.backends.ds_config import COMMS_SUMMARY_FILE, check_with_deepspeed, ds_config_for, precision_of
from seemore_ds.checkpoint import WrittenBy
from seemore_ds.compiling import check_can_compile
from seemore_ds.config import Config
from seemore_ds.data.dataset import Batch
from seemore_ds.errors import UserError
from seemore_ds.evaluation import token_loss_sum
from seemore_ds.model import SeemoreVLM
from seemore_ds.optim import lr_multiplier, param_groups
from seemore_ds.precision import agreed_precision, auto_choice, compute_dtype, with_precision
from seemore_ds.safe_pickles import weights_only_loads

def comms_table(summary: dict, world_size: int) -> str:
    """DeepSpeed's comms_logger summary as a text table: one row per operation and message size."""
    lines = [f"# collectives of rank 0 of {world_size}, recorded by DeepSpeed's comms_logger",
             f"{'operation':<24} {'count':>7} {'bytes':>14} {'total_ms':>10} {'avg_ms':>9}"]
    for operation, sizes in sorted(summary.items()):
        for size, row in sorted(sizes.items()):
            lines.append(f"{operation:<24} {row['count']:>7} {int(size):>14} {row['total_latency_ms']:>10.2f} "
                         f"{row['avg_latency_ms']:>9.3f}")
    return "\n".join(lines) + "\n"


def leave_process_group() -> None:
    """Destroy the process group at exit, as torch asks of every process that made one. Its threads live on
    while DeepSpeed's engine holds the group (until the process ends), which is why ``launching.end_process``
    ends such a process without Python's finalization. Not at the end of a run: a process may hold several
    runs (tests do), and a group destroyed and made again on the same port can meet the old one's
    rendezvous on another rank and wait forever."""
    import deepspeed.comm

    if torch.distributed.is_initialized():
        deepspeed.comm.destroy_process_group()


class DeepSpeedBackend:
    def __init__(self, model: SeemoreVLM, cfg: Config):
        # A dry settling first, of a copy, from files and environment only: a bad config is refused alike on
        # every rank before anything is started or changed. train.precision=auto is settled for real below.
        ds_config_for(copy.deepcopy(cfg), int(os.environ.get("WORLD_SIZE", 1)))
        compat.prepare_environment(resolve_device(cfg.train.device))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))  # set by the launcher, or by the stand-in above
        if local_rank == 0:  # one report per machine
            compat.report_stale_op_build_locks()
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        compat.quiet_deepspeed()
        accelerator = get_accelerator()
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
        # Once per process however many runs it holds: the runs of one process share one process group.
        atexit.unregister(leave_process_group)
        atexit.register(leave_process_group)
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        # Host tensors (the step guard's signal flags) are reduced over a CPU (gloo) group, so that agreeing on
        # them never waits for queued GPU work. The default group serves when it is gloo already (CPU ranks);
        # a second one would be one more set of sockets. Created here: every rank must create it together.
        self._host_group = torch.distributed.group.WORLD
        if self.world_size > 1 and torch.distributed.get_backend() != "gloo":
            self._host_group = torch.distributed.new_group(backend="gloo")
        if accelerator.device_name() == "cpu":  # under the launcher shm_comm maps a buffer at any world size
            torch.distributed.barrier()  # past it, every rank has mapped its peers' buffers (in init_distributed)
            compat.unlink_shared_allreduce_buffer(self.rank)
        self.device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")

        def pick_auto(open_precisions: tuple[str, ...], micro_batch: int) -> str:  # a broadcast from rank 0
            return agreed_precision(lambda: auto_choice(model, micro_batch, self.device, open_precisions), self.rank, self.device)

        # Settled from files, the environment and, for train.precision=auto, rank 0's pick, which every rank
        # receives: every rank settles alike. A copy of cfg adopts the JSON's concrete values for keys left at
        # their defaults; it becomes self.config, which the trainer saves.
        cfg = copy.deepcopy(cfg)
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
        self.config = cfg = with_precision(cfg, self.precision)
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
        # (see full_model) so that ranks with unequal work never wait on each other's all-gathers.
        self._replica = copy.deepcopy(model) if self.zero_stage == 3 else None
        self._replica_step = -1
        self._gathered = False  # inside full_model(): eval_loss may use the copy
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            model_parameters=param_groups(model, cfg.train.weight_decay) if optimizer is None else None,
            config=self.ds_config,
        )
        if self._replica is not None:
            self._replica.to(device=self.device, dtype=compute_dtype(self.precision))
        compat.quiet_engine_timers(self.engine)
        compat.skip_nonfinite_updates(self.engine.optimizer)
        if cfg.train.compile:
            check_can_compile(self.device)
            self.engine.compile()

    @property
    def module(self) -> torch.nn.Module:
        """This rank's SeemoreVLM inside the engine; under ZeRO-3 its parameters are partitions (see full_model)."""
        return self.engine.module

    @contextlib.contextmanager
    def full_model(self) -> Iterator[torch.nn.Module]:
        """The engine's model, or under ZeRO-3 a full copy gathered on entry (a collective: every rank enters).

        The copy is refreshed once per optimizer step, so that evaluation and generation on it never wait on
        another rank's all-gathers, however unequal the ranks' shares of the work."""
        if self._replica is None:
            yield self.engine.module
            return
        if self._replica_step != self.engine.global_steps:
            import deepspeed

            params = list(self.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                with torch.no_grad():
                    for full, partitioned in zip(self._replica.parameters(), params):
                        full.copy_(partitioned.data)
            copy_buffers(self.engine.module, self._replica)
            self._replica_step = self.engine.global_steps
        self._gathered = True
        try:
            yield self._replica
        finally:
            self._gathered = False

    def train_step(self, micro_batches: list[Batch], timed: bool) -> StepStats:
        engine = self.engine
        engine.train()
        skipped_before = engine.skipped_steps
        lr = engine.get_lr()[0]  # the rate this step uses; the scheduler moves on inside engine.step()
        grad_norm = None

        def step(last: bool) -> None:
            nonlocal grad_norm
            if last and not hasattr(engine.optimizer, "_global_grad_norm"):
                grad_norm = self._grad_norm()  # plain fp32 data parallelism: the engine clips but keeps no norm
            engine.step()  # an optimizer step only at the accumulation boundary

        totals = run_micro_batches(micro_batches, self.device, timed,
                                   forward=lambda batch: engine(batch.images, batch.input_ids, batch.targets)[1],
                                   backward=engine.backward,  # divides by gradient_accumulation_steps itself
                                   step=step)
        forward_s, backward_s, optimizer_s = totals.forward_s, totals.backward_s, totals.step_s
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        allreduce_s = None
        if timed and engine.wall_clock_breakdown():  # the engine's own breakdown of this optimizer step, in ms
            ms = engine.get_wall_clock_timers()  # names from deepspeed.utils.timer's *_GLOBAL_TIMER
            forward_s, backward_s, allreduce_s, optimizer_s = (ms[name] / 1e3 for name in ("fwd", "bwd_inner", "bwd_allreduce", "step"))
        loss = totals.loss
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
            if not self._gathered:
                raise RuntimeError("under ZeRO-3, eval_loss runs inside `with backend.full_model():`")
            self._replica.eval()
            return token_loss_sum(self._replica, batch.to(self.device))
        self.engine.eval()
        return token_loss_sum(self.engine, batch.to(self.device))

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp.RedOpType) -> torch.Tensor:
        if self.world_size > 1:
            group = self._host_group if tensor.device.type == "cpu" else None
            torch.distributed.all_reduce(tensor, op=op, group=group)
        return tensor

    def settle_running_stats(self, images: torch.Tensor, batch_size: int) -> None:
        with self.full_model() as model:  # under ZeRO-3 the stem runs on the gathered copy
            model.settle_running_stats(images, batch_size)
        if self._replica is not None:  # the checkpoint saves the engine's own buffers
            copy_buffers(self._replica, self.engine.module)

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
            with compat.loading_universal(engine), weights_only_loads(folder):
                path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_lr_scheduler_states=False)
            if path is None:
                raise UserError(f"DeepSpeed found no checkpoint in {folder}")
            compat.after_universal_load(engine, self.ds_config.get("gradient_clipping", 0.0))
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


def copy_buffers(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """BatchNorm's statistics between the engine's model and its ZeRO-3 evaluation copy; buffers are whole on
    every rank (ZeRO never partitions them), so no gather."""
    with torch.no_grad():
        for target_buffer, source_buffer in zip(target.buffers(), source.buffers()):
            target_buffer.copy_(source_buffer)
