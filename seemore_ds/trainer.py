"""The training loop, written once for every backend: data, steps, metrics, validation, checkpoints."""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed import ReduceOp
from tqdm import tqdm

from seemore_ds import checkpoint as ckpt
from seemore_ds.backends import build_backend
from seemore_ds.config import Config, save_config
from seemore_ds.data.csv_reader import summarize_bad_rows, write_bad_rows
from seemore_ds.data.augment import ImageShifts
from seemore_ds.data.dataset import (BatchPrefetcher, CaptionData, ResumableSampler, TokenizedSplit, check_enough_rows,
                                     load_train_val)
from seemore_ds.data.tables import absolute_spec
from seemore_ds.errors import UserError
from seemore_ds.metrics.processor import MetricsProcessor, ModelFigures
from seemore_ds.model import SeemoreVLM
from seemore_ds.precision import keep_checkpoint_precision
from seemore_ds.profiling.memory import MIB
from seemore_ds.step_guard import Halt, StepGuard
from seemore_ds.tokenizer import CharTokenizer
from seemore_ds.validator import Validator

BAD_ROWS_FILE = "bad_rows.csv"
# Training images BatchNorm's statistics are recomputed from before evaluations and checkpoints: enough
# batches for a steady average, a small cost beside an evaluation.
STATS_IMAGES = 512


def running_stats_images(train_data: CaptionData) -> torch.Tensor:
    """The images BatchNorm's statistics are recomputed from: the first STATS_IMAGES training rows."""
    return train_data.images_at(torch.arange(min(STATS_IMAGES, len(train_data))))


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_train_loss: float
    final_val_loss: float | None
    exact_match: float | None
    checkpoint: Path | None


def check_same_model(cfg: Config, saved: Config, where: Path) -> None:
    """Refuse to resume a checkpoint whose model sizes differ from the config's (dropout may change)."""
    for key, value in vars(cfg.model).items():
        if getattr(saved.model, key) != value and key != "dropout":
            raise UserError(
                f"checkpoint {where} was trained with model.{key}={getattr(saved.model, key)}, "
                f"but the config says {value}; use the same model sizes to resume"
            )


def with_absolute_data(cfg: Config) -> Config:
    """A copy of ``cfg`` whose data files are absolute paths, so that its saved config finds the data from
    any working directory; ``cfg`` itself is left as loaded."""
    data = dataclasses.replace(cfg.data, csv=absolute_spec(cfg.data.csv), val_csv=absolute_spec(cfg.data.val_csv))
    copy = dataclasses.replace(cfg, data=data)
    copy.explicit_keys = cfg.explicit_keys  # which keys the user set: not a field, so replace() drops it
    return copy


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg = with_absolute_data(cfg)
        self.run_dir = Path(cfg.run.output_dir)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)

        self.is_main = int(os.environ.get("RANK", 0)) == 0  # the launcher's rank until the backend says
        self.checkpoints = ckpt.CheckpointManager(cfg, self.say)
        self.checkpoints.claim_run_folder()
        self.state = self.checkpoints.state  # step, samples seen, best val loss, ...: restored by the manager
        cache_dir = Path(cfg.data.cache_dir or self.run_dir / "cache") if cfg.data.cache else None
        data, train_data, val_data = load_train_val(cfg, cache_dir=cache_dir)
        # Before the backend, whose train.precision=auto times training steps at train.batch_size: too few rows
        # for one rank's batch is refused at once, saying which rows were skipped (no run folder holds their
        # list yet). The sampler checks again for every rank.
        skipped = data.bad_rows + val_data.bad_rows
        check_enough_rows(len(train_data), cfg.train.batch_size, 1, summarize_bad_rows(skipped) if skipped else "")
        self.resume_from = self.checkpoints.find_resume()
        if self.resume_from:
            saved = ckpt.load_checkpoint_config(self.resume_from)
            check_same_model(cfg, saved, self.resume_from)
            cfg = keep_checkpoint_precision(cfg, ckpt.written_by(self.resume_from).precision, str(self.resume_from), self.say)
            self.tokenizer = CharTokenizer.load(self.resume_from / ckpt.TOKENIZER_FILE)
        else:
            self.tokenizer = CharTokenizer.from_captions(train_data.captions)
        model = SeemoreVLM(cfg.model, self.tokenizer.vocab_size)
        self.n_params = model.num_params()  # counted before ZeRO-3 partitions the parameters away
        with torch.device("meta"):  # the parameters' names and shapes, for a conversion between layouts
            model_shapes = SeemoreVLM(cfg.model, self.tokenizer.vocab_size)
        self.backend = build_backend(model, cfg)
        # The run's files, console and MFU speak of the config the backend settled (train.precision=auto
        # decided, a DeepSpeed JSON's values adopted).
        self.cfg = self.checkpoints.cfg = cfg = self.backend.config
        # How many processes decoded rather than mapped the image cache, and their summed decode rate, for
        # the console's data line; every rank counts.
        rate = data.decode.rows_per_s if data.decode else 0.0
        decoders = self.backend.all_reduce(torch.tensor([float(data.decoded), rate], device=self.backend.device), ReduceOp.SUM)
        self.is_main = self.backend.rank == 0
        self.train_split = TokenizedSplit(train_data, self.tokenizer, model.text_len)
        self.val_split = TokenizedSplit(val_data, self.tokenizer, model.text_len) if len(val_data) else None
        # What a training sample costs at the text length the data needs (not the most the model takes).
        self.flops_per_sample = model.flops_per_sample(self.train_split.text_len)
        self.sampler = ResumableSampler(
            len(train_data), cfg.train.batch_size, cfg.train.seed, self.backend.rank, self.backend.world_size
        )
        for notice in self.checkpoints.resume_notices:
            self.say(notice)
        if self.resume_from:
            self.checkpoints.restore(self.backend, model_shapes, self.sampler)
        self.guard = StepGuard(self.backend, cfg.train, self.say, self.step, self.state.skipped_steps)
        if self.is_main:
            self._prepare_run_folder(data, val_data, model, int(decoders[0].item()), decoders[1].item())
        self.validator = Validator(cfg, self.backend, self.val_split, self.tokenizer, self.is_main)
        figures = ModelFigures(self.n_params, self.flops_per_sample, model.num_image_tokens + self.train_split.text_len)
        self.metrics = MetricsProcessor(
            cfg, figures, device=self.backend.device, world_size=self.backend.world_size,
            precision=self.backend.precision, samples_per_step=self.samples_per_step, is_main=self.is_main,
            resume_step=self.step if self.resume_from else None, wandb_run_id=self.state.wandb_run_id, say=self.say)
        self.last_checkpoint: Path | None = None
        self.settled_step: int | None = None  # the step whose weights BatchNorm's statistics were recomputed for

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def _prepare_run_folder(self, data, val_data, model: SeemoreVLM, decoders: int, rate_sum: float) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / ckpt.CONFIG_FILE)
        self.tokenizer.save(self.run_dir / ckpt.TOKENIZER_FILE)
        n_train, n_val = len(self.train_split), len(self.val_split) if self.val_split else 0
        val_source = f" ({val_data.source})" if self.cfg.data.val_csv else ""
        decode = f"; decoded at {rate_sum / decoders:.0f} rows/s" if decoders else ""
        self.say(f"data: {data.source}: {len(data)} rows used, {n_train} train / {n_val} val{val_source}, "
                 f"vocab {self.tokenizer.vocab_size}{decode}")
        if data.cache_file:
            how = f"decoded by {decoders} of {self.backend.world_size} process(es)" if decoders else "decoded earlier"
            self.say(f"data: image cache {data.cache_file} ({data.images.nbytes / MIB:.1f} MiB), {how}; every rank maps it")
        bad_rows = data.bad_rows + val_data.bad_rows  # a split has none of its own; data.val_csv's tables may
        if bad_rows:
            write_bad_rows(bad_rows, self.run_dir / BAD_ROWS_FILE)
            self.say(f"data: {summarize_bad_rows(bad_rows)}; row numbers and reasons in {self.run_dir / BAD_ROWS_FILE}")
        self.say(
            f"model: {self.n_params / 1e6:.2f}M parameters, {self.flops_per_sample / 1e9:.2f} GFLOP per training sample "
            f"(captions of up to {self.train_split.text_len - 1} characters); "
            f"backend {type(self.backend).__name__} on {self.backend.device} x {self.backend.world_size}, {self.backend.precision}"
        )
        if self.resume_from:
            self.say(f"resuming from {self.resume_from} at step {self.step}")

    def settle_running_stats(self) -> None:
        """BatchNorm's statistics recomputed for this step's weights (once per step) from the same training
        images on every rank; every rank calls it."""
        if self.settled_step != self.step:
            self.backend.settle_running_stats(running_stats_images(self.train_split.data), self.cfg.train.batch_size)
            self.settled_step = self.step

    def save_checkpoint(self, val_loss: float | None) -> Path:
        """The manager writes this step's checkpoint; every rank calls it."""
        self.settle_running_stats()  # a checkpoint, and what is exported from it, evaluates as the run did
        self.state.samples_seen = self.step * self.samples_per_step
        self.state.skipped_steps = self.guard.skipped_steps  # read at every checkpoint step
        self.state.wandb_run_id = self.metrics.wandb_run_id  # a resumed run continues it
        self.last_checkpoint = self.checkpoints.save(self.backend, self.sampler, val_loss, self.tokenizer)
        return self.last_checkpoint

    @property
    def samples_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.backend.world_size

    def run(self) -> TrainResult:
        """Train to ``train.max_steps``; each component decides for itself whether this step is one of its."""
        shift_px = self.cfg.data.shift_px
        shifts = ImageShifts(shift_px, self.cfg.train.seed, len(self.train_split)) if shift_px else None
        batches = BatchPrefetcher(self.train_split, self.sampler, self.cfg.train.grad_accum, shifts)
        while self.step < self.cfg.train.max_steps:
            step = self.step + 1
            self.metrics.start_step(step)
            micro_batches = batches.next_step()
            self.metrics.data_loaded()
            validate, save = self.validator.should_run(step), self.checkpoints.should_save(step)
            # The step's tensors are read on the host only at these steps, which sync anyway: on a GPU every
            # read waits for the queued work.
            read_now = self.metrics.should_log(step) or validate or save
            stats = self.backend.train_step(micro_batches, timed=read_now or self.metrics.should_profile(step))
            self.step = step
            self.guard.count(step, stats)
            self.metrics.end_step(step, stats, self.backend.profiled_forward)
            skipped = self.guard.read(step) if read_now else 0
            if validate:
                self.settle_running_stats()
            validation = self.validator.run(step) if validate else None
            self.metrics.log(step, stats, self.sampler.epoch, skipped, validation)
            if save:
                self.save_checkpoint(validation.val_loss if validation else None)
            halt = self.guard.after_step(step)  # the same answer on every rank
            if halt:
                self.stop(halt, read_now)
        return self.finish()

    def stop(self, halt: Halt, read_now: bool) -> None:
        """End the run for ``halt``: save this step if not saved yet, write the summary and plots, raise."""
        if not read_now:  # a signal: the checkpoint counts the skipped steps up to here
            self.guard.read(self.step)
        if self.last_checkpoint is None or self.last_checkpoint.name != ckpt.tag_for(self.step):
            self.save_checkpoint(None)
        self._close()
        raise halt.error(self.last_checkpoint, self.is_main)

    def finish(self) -> TrainResult:
        """After the last step: the final figures on the console, the summary and plots."""
        validation = self.metrics.validation
        exact = validation.exact_match if validation else None
        if exact is None and self.val_split is not None:  # resumed at max_steps: nothing evaluated yet
            exact = self.validator.exact_match()
        parts = [f"done: {self.step} steps"]
        if validation is not None:
            parts.append(f"val loss {validation.val_loss:.4f}")
        if exact is not None:
            parts.append(f"caption exact match {exact:.3f} on {len(self.val_split)} held-out rows")
        self._close("; ".join(parts))
        advice = self.validator.longer_run_advice()
        if advice:
            self.say(advice)
        return TrainResult(self.run_dir, self.step, self.metrics.train_loss, validation.val_loss if validation else None,
                           exact, self.last_checkpoint)

    def _close(self, done_line: str | None = None) -> None:
        """At any end that leaves a checkpoint: the engine's records, then (rank 0) the plots and summary."""
        self.metrics.close_progress()
        self.backend.finish(self.run_dir)
        if done_line:
            self.say(done_line)
        self.metrics.finish(steps=self.step, best_val_loss=self.state.best_val_loss,
                            skipped_steps=self.guard.skipped_steps, checkpoint=self.last_checkpoint)
        self.say(f"run folder: {self.run_dir}  (checkpoint: {self.last_checkpoint or 'none'})")


def train(cfg: Config) -> TrainResult:
    """Train as configured; the single entry point used by the CLI and the tests."""
    trainer = Trainer(cfg)
    with trainer.guard.signals:  # from the first step on, a signal saves a checkpoint before the run ends
        return trainer.run()
