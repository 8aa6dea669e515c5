"""The engine-free backend: plain PyTorch on CPU or one CUDA GPU. Never imports deepspeed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

from seemore_ds import universal
from seemore_ds.backends.base import StepStats, resolve_device, run_micro_batches, timestamp
from seemore_ds.backends.torch_compat import fused_step_unless
from seemore_ds.checkpoint import MODEL_FILE, WrittenBy
from seemore_ds.compiling import check_can_compile
from seemore_ds.config import Config
from seemore_ds.data.dataset import Batch
from seemore_ds.errors import UserError
from seemore_ds.evaluation import token_loss_sum
from seemore_ds.model import SeemoreVLM
from seemore_ds.optim import DeviceLRSchedule, param_groups
from seemore_ds.precision import AUTO, PRECISION_DTYPES, agreed_precision, auto_choice, with_precision

GRAD_SCALER_FILE = "grad_scaler.pt"  # fp16 only: the loss scale


class TorchBackend:
    rank, world_size = 0, 1

    def __init__(self, model: SeemoreVLM, cfg: Config):
        self.device = resolve_device(cfg.train.device)
        precision = cfg.train.precision
        if precision == AUTO:
            precision = agreed_precision(lambda: auto_choice(model, cfg.train.batch_size, self.device), 0, self.device)
        self.precision = precision  # what the run trains in: train.precision with auto settled
        self.config = with_precision(cfg, precision)
        if precision == "fp16" and self.device.type != "cuda":
            raise UserError("train.precision=fp16 needs a CUDA GPU (CPU autocast has no fp16 loss scaling); use train.precision=bf16 on CPU")
        self.module = model.to(self.device)
        if cfg.train.compile:
            check_can_compile(self.device)
            self.module.compile()
        self.train_cfg = cfg.train
        self.global_steps = 0  # optimizer steps taken, skipped ones included (as DeepSpeed counts them)
        # Fused: one kernel per parameter group (on the CPU too), and it takes the decision to skip an update
        # as a device tensor (found_inf), as GradScaler hands it over: no host sync per step.
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
            betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps, fused=True,
        )
        self.scheduler = DeviceLRSchedule(self.optimizer, cfg.train, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        dtype = PRECISION_DTYPES.get(precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else nullcontext

    def train_step(self, micro_batches: list[Batch], timed: bool) -> StepStats:
        self.module.train()

        def forward(batch: Batch) -> torch.Tensor:
            with self.autocast():
                return self.module(batch.images, batch.input_ids, batch.targets)[1]

        def backward(loss: torch.Tensor) -> None:
            self.scaler.scale(loss / len(micro_batches)).backward()

        totals = run_micro_batches(micro_batches, self.device, timed, forward, backward)
        t0 = time.perf_counter()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.train_cfg.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)  # foreach: stays on the device
        lr = self.scheduler.lr.clone()  # the rate this step uses; the schedule moves on below
        loss = totals.loss
        # A NaN/Inf loss or gradient would poison the weights and Adam's moments: skip the update and hold the
        # LR schedule, as DeepSpeed does, all decided on the device.
        skipped = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if self.scaler.is_enabled():
            # fp16: GradScaler finds the non-finite gradients itself, hands the fused kernel its found_inf and
            # lowers the scale; the schedule moves on at every step, as it always did under fp16.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        else:
            fused_step_unless(self.optimizer, skipped)  # the kernel leaves everything as it was, step count included
            self.scheduler.step(~skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        optimizer_s = timestamp(self.device, timed) - t0
        return StepStats(
            loss=loss, grad_norm=grad_norm, lr=lr,
            forward_s=totals.forward_s, backward_s=totals.backward_s, optimizer_s=optimizer_s, skipped=skipped,
            backward_allreduce_s=0.0,  # one process: nothing to reduce
            loss_scale=self.scaler.get_scale() if self.scaler.is_enabled() and timed else None,  # get_scale syncs
            nonfinite=~torch.isfinite(loss),
        )

    @contextmanager
    def full_model(self) -> Iterator[SeemoreVLM]:
        """The model itself: one process holds all of it."""
        yield self.module

    def eval_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        self.module.eval()
        with self.autocast():
            return token_loss_sum(self.module, batch.to(self.device))

    def profiled_forward(self) -> None:
        return None  # never imports DeepSpeed's profiler: the trainer uses the model's own count

    def all_reduce(self, tensor: torch.Tensor, op: torch.distributed.ReduceOp.RedOpType) -> torch.Tensor:
        return tensor  # one rank: every reduction is the tensor itself

    def settle_running_stats(self, images: torch.Tensor, batch_size: int) -> None:
        with self.autocast():  # the stem's outputs as training and evaluation compute them
            self.module.settle_running_stats(images, batch_size)

    def barrier(self) -> None:
        pass

    def layout(self) -> WrittenBy:
        return WrittenBy("torch", 1, None, self.precision)

    def finish(self, run_dir: Path) -> None:
        pass  # no engine, nothing recorded beside the trainer's own logs

    def save(self, checkpoint_dir: Path) -> None:
        """The universal layout (this backend's own), and the weights as safetensors for inference."""
        save_file({k: v.contiguous() for k, v in self.module.state_dict().items()}, str(checkpoint_dir / MODEL_FILE))
        names = universal.group_names(self.module, self.train_cfg.weight_decay)
        applied = int(self.scheduler.applied)
        state = universal.from_optimizer(self.module, self.optimizer.state_dict(), names, self.global_steps,
                                         self.global_steps - applied, self.scheduler.state_dict())
        universal.write_universal(checkpoint_dir / universal.UNIVERSAL_DIR, state)
        if self.scaler.is_enabled():
            torch.save(self.scaler.state_dict(), checkpoint_dir / GRAD_SCALER_FILE)

    def load(self, checkpoint_dir: Path) -> None:
        self.load_universal(checkpoint_dir / universal.UNIVERSAL_DIR)
        if self.scaler.is_enabled() and (checkpoint_dir / GRAD_SCALER_FILE).is_file():
            self.scaler.load_state_dict(torch.load(checkpoint_dir / GRAD_SCALER_FILE, weights_only=True))

    def load_universal(self, folder: Path) -> None:
        """Weights, Adam's moments and step, the schedule's position and the step counts from a universal folder."""
        state = universal.read_universal(folder, self.module)
        self.module.load_state_dict({**state.weights, **state.buffers})
        names = universal.group_names(self.module, self.train_cfg.weight_decay)
        current = universal.hyperparameters(self.optimizer.param_groups)
        self.optimizer.load_state_dict(universal.optimizer_state_dict(state, names, self.device, current))
        self.scheduler.load_state_dict({"last_epoch": universal.schedule_position(state.lr_scheduler, state.updates)})
        self.global_steps = state.global_steps
