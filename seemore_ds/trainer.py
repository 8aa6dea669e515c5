"""The training loop, written once for every backend: data, steps, logging, eval, checkpoints."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from seemore_ds import checkpoint as ckpt
from seemore_ds.backends import build_backend
from seemore_ds.config import Config, save_config
from seemore_ds.data.csv_reader import summarize_bad_rows, write_bad_rows
from seemore_ds.data.dataset import BatchPrefetcher, ResumableSampler, TokenizedSplit, load_train_val
from seemore_ds.data.tables import absolute_spec
from seemore_ds.errors import UserError
from seemore_ds.evaluation import caption_matches, split_loss
from seemore_ds.metrics.csv_log import LOSS_COLUMNS, TIMING_COLUMNS, CSVLog
from seemore_ds.metrics.monitor import RunMonitor
from seemore_ds.metrics.plots import plot_run
from seemore_ds.model import SeemoreVLM
from seemore_ds.precision import keep_checkpoint_precision, with_precision
from seemore_ds.profiling import MIB
from seemore_ds.run_summary import run_summary, summary_table, write_summary
from seemore_ds.step_guard import StepGuard
from seemore_ds.tokenizer import CharTokenizer

BAD_ROWS_FILE = "bad_rows.csv"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_train_loss: float
    final_val_loss: float | None
    exact_match: float | None
    checkpoint: Path | None


def check_same_model(cfg: Config, saved: Config, where: Path) -> None:
    for key, value in vars(cfg.model).items():
        if getattr(saved.model, key) != value and key != "dropout":
            raise UserError(
                f"checkpoint {where} was trained with model.{key}={getattr(saved.model, key)}, "
                f"but the config says {value}; use the same model sizes to resume"
            )


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        # saved configs must find the data from any working directory
        cfg.data.csv, cfg.data.val_csv = absolute_spec(cfg.data.csv), absolute_spec(cfg.data.val_csv)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)

        self.is_main = int(os.environ.get("RANK", 0)) == 0  # the launcher's rank until the backend says
        self.checkpoints = ckpt.CheckpointManager(cfg, self.say)
        self.checkpoints.claim_run_folder()
        self.state = self.checkpoints.state  # step, samples seen, best val loss, ...: restored by the manager
        cache_dir = Path(cfg.data.cache_dir or self.run_dir / "cache") if cfg.data.cache else None
        data, train_data, val_data = load_train_val(cfg, cache_dir=cache_dir)
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
        # The run's files, console and MFU speak of the precision it trains in: train.precision=auto settled.
        self.cfg = self.checkpoints.cfg = cfg = with_precision(cfg, self.backend.precision)
        # How many processes decoded rather than mapped the image cache, and their summed decode rate, for
        # the console's data line; every rank counts.
        rate = data.decode.rows_per_s if data.decode else 0.0
        decoders = self.backend.all_reduce_sum(torch.tensor([float(data.decoded), rate], device=self.backend.device))
        self.is_main = self.backend.rank == 0
        text_len = model.text_len
        self.train_split = TokenizedSplit(train_data, self.tokenizer, text_len)
        self.val_split = TokenizedSplit(val_data, self.tokenizer, text_len) if len(val_data) else None
        self.sampler = ResumableSampler(
            len(train_data), cfg.train.batch_size, cfg.train.seed, self.backend.rank, self.backend.world_size
        )
        for notice in self.checkpoints.resume_notices:
            self.say(notice)
        if self.resume_from:
            self.checkpoints.restore(self.backend, model_shapes, self.sampler)
        self.guard = StepGuard(self.backend, cfg.train, self.say, self.step, self.state.skipped_steps)
        self.monitor = None  # rank 0's
        if self.is_main:
            self._prepare_run_folder(data, val_data, model, int(decoders[0].item()), decoders[1].item())
            self.monitor = RunMonitor(cfg, model, self.n_params, self.backend.device, self.backend.world_size,
                                      self.step if self.resume_from else None, self.state.wandb_run_id, self.say)

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
        resume_step = self.step if self.resume_from else None
        self.loss_log = CSVLog(self.run_dir / "losses_log.csv", LOSS_COLUMNS, resume_step)
        self.timing_log = CSVLog(self.run_dir / "timing_logs.csv", TIMING_COLUMNS, resume_step)
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
            f"model: {self.n_params / 1e6:.2f}M parameters, {model.flops_per_sample() / 1e9:.2f} GFLOP per training sample; "
            f"backend {type(self.backend).__name__} on {self.backend.device} x {self.backend.world_size}, {self.cfg.train.precision}"
        )
        if self.resume_from:
            self.say(f"resuming from {self.resume_from} at step {self.step}")

    def _due(self, every: int, step: int) -> bool:
        return step == self.cfg.train.max_steps or (every > 0 and step % every == 0)

    def evaluate(self) -> tuple[float | None, float | None]:
        """(val loss, caption exact match) on up to eval.max_batches batches of the held-out split;
        at the last step the exact match covers the whole split, as the run's final figure."""
        if self.val_split is None:
            return None, None
        self.backend.average_running_stats()
        batch_size, max_batches = self.cfg.train.batch_size, self.cfg.eval.max_batches
        loss = split_loss(self.backend, self.val_split, batch_size, max_batches)
        last = self.step == self.cfg.train.max_steps
        return loss, self.exact_match(max_rows=0 if last else batch_size * max_batches)

    def exact_match(self, max_rows: int = 0) -> float:
        """Fraction of held-out rows (the first ``max_rows``; 0: all) captioned exactly right, over all ranks."""
        matches, n = caption_matches(self.backend.module, self.val_split, self.tokenizer,
                                     self.backend.rank, self.backend.world_size, max_rows=max_rows)
        total = self.backend.all_reduce_sum(torch.tensor([matches, n], dtype=torch.float64, device=self.backend.device))
        return (total[0] / total[1]).item()

    def save_checkpoint(self, val_loss: float | None) -> Path:
        """The manager writes this step's checkpoint; every rank calls it."""
        self.state.samples_seen = self.step * self.samples_per_step
        self.state.skipped_steps = self.guard.skipped_steps  # read at every checkpoint step
        self.state.wandb_run_id = self.monitor.wandb_run_id if self.monitor else None  # a resumed run continues it
        return self.checkpoints.save(self.backend, self.sampler, val_loss, self.tokenizer)

    @property
    def samples_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.backend.world_size

    def run(self) -> TrainResult:
        cfg = self.cfg
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not (self.is_main and cfg.log.progress),
                   desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)
        train_loss = val_loss = val_exact = None
        last_checkpoint = None
        interval_s, interval_steps = 0.0, 0  # training time since the last log row, eval excluded
        skipped_since_row = 0
        start_s = time.perf_counter()
        compiling = cfg.train.compile  # the first step of this process compiles the model
        batches = BatchPrefetcher(self.train_split, self.sampler, cfg.train.grad_accum)
        while self.step < cfg.train.max_steps:
            if self.monitor:
                self.monitor.before_step(self.step + 1)
            t0 = time.perf_counter()
            micro_batches = batches.next_step()
            data_s = time.perf_counter() - t0
            log_now = self._due(cfg.log.every, self.step + 1)
            eval_now, checkpoint_now = self._due(cfg.eval.every, self.step + 1), self.checkpoints.should_save(self.step + 1)
            # The step's tensors are read on the host only at these steps, which sync anyway: on a GPU every
            # read waits for the queued work.
            read_now = log_now or eval_now or checkpoint_now
            stats = self.backend.train_step(micro_batches, timed=read_now or self.step + 1 == cfg.profile.flops_step)
            self.step += 1
            step_s = time.perf_counter() - t0
            self.guard.count(self.step, stats)
            if self.monitor:
                self.monitor.after_step(self.step, stats, self.backend)
            if compiling:  # reported apart so that compilation does not pass for training speed
                compiling = False
                self.say(f"compile: step {self.step} took {step_s:.1f} s, compilation included; not counted in samples/s")
            else:
                interval_s, interval_steps = interval_s + step_s, interval_steps + 1
            bar.update(1)
            if read_now:
                skipped_since_row += self.guard.read(self.step)
            val_loss, val_exact = self.evaluate() if eval_now else (None, None)
            if eval_now and self.monitor:  # the evaluation gathered ZeRO-3 weights on every rank: module is local now
                self.monitor.log_captions(self.step, self.backend.module, self.val_split, self.tokenizer)
            if log_now or eval_now:
                train_loss, lr = stats.loss.item(), stats.lr.item()
                samples_per_s = interval_steps * self.samples_per_step / interval_s if interval_steps else None
                interval_s, interval_steps = 0.0, 0
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", refresh=False,
                                samples_per_s="-" if samples_per_s is None else f"{samples_per_s:.0f}")
                if self.is_main:
                    loss_row = {
                        "step": self.step, "epoch": self.sampler.epoch, "train_loss": train_loss, "val_loss": val_loss,
                        "lr": lr, "grad_norm": None if stats.grad_norm is None else stats.grad_norm.item(),
                        "val_exact_match": val_exact, "loss_scale": stats.loss_scale, "skipped_steps": skipped_since_row,
                        **self.monitor.throughput(samples_per_s),
                    }
                    timing_row = {
                        "step": self.step, "data_s": data_s, "forward_s": stats.forward_s, "backward_s": stats.backward_s,
                        "optimizer_s": stats.optimizer_s, "step_s": step_s, "backward_allreduce_s": stats.backward_allreduce_s,
                    }
                    self.loss_log.write(loss_row)
                    self.timing_log.write(timing_row)
                    self.monitor.log(self.step, loss_row, timing_row)
                skipped_since_row = 0
            if val_loss is not None:
                self.say(f"step {self.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                         f"caption exact match {val_exact:.3f}")
            if checkpoint_now:
                last_checkpoint = self.save_checkpoint(val_loss)
            halt = self.guard.after_step(self.step)  # the same answer on every rank
            if halt:
                if not read_now:  # a signal: the checkpoint counts the skipped steps up to here
                    self.guard.read(self.step)
                if last_checkpoint is None or last_checkpoint.name != ckpt.tag_for(self.step):
                    last_checkpoint = self.save_checkpoint(None)
                bar.close()
                raise halt.error(last_checkpoint, self.is_main)
        bar.close()
        return self._finish(train_loss, val_loss, val_exact, last_checkpoint, time.perf_counter() - start_s)

    def _finish(self, train_loss, val_loss, exact, last_checkpoint, wall_s: float) -> TrainResult:
        if exact is None and self.val_split is not None:  # resumed at max_steps: nothing evaluated yet
            exact = self.exact_match()
        self.backend.finish(self.run_dir)
        if self.is_main:
            if (self.run_dir / "losses_log.csv").is_file() and self.step > 0:
                plot_run(self.run_dir)
            parts = [f"done: {self.step} steps"]
            if val_loss is not None:
                parts.append(f"val loss {val_loss:.4f}")
            if exact is not None:
                parts.append(f"caption exact match {exact:.3f} on {len(self.val_split)} held-out rows")
            self.say("; ".join(parts))
            summary = run_summary(
                self.run_dir, steps=self.step, samples=self.step * self.samples_per_step, wall_s=wall_s,
                final_train_loss=train_loss, final_val_loss=val_loss,
                best_val_loss=self.state.best_val_loss,
                skipped_steps=self.guard.skipped_steps, checkpoint=last_checkpoint,
                flops_per_sample=self.monitor.flops_per_sample, peak_tflops=self.monitor.peak_tflops)
            self.say(f"summary ({write_summary(summary, self.run_dir)}):\n{summary_table(summary)}")
            self.monitor.finish(summary)
            self.say(f"run folder: {self.run_dir}  (checkpoint: {last_checkpoint or 'none'})")
        return TrainResult(self.run_dir, self.step, train_loss, val_loss, exact, last_checkpoint)


def train(cfg: Config) -> TrainResult:
    """Train as configured; the single entry point used by the CLI and the tests."""
    trainer = Trainer(cfg)
    with trainer.guard.signals:  # from the first step on, a signal saves a checkpoint before the run ends
        return trainer.run()
