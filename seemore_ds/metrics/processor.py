"""The run's metrics, one component: the interval timer (a compiling step left out), the loss, timing and
memory rows, their CSV and W&B sinks, the progress bar and console lines, the FLOPs profile, the
torch.profiler trace, the plots and the end-of-run summary built from the figures it holds.

Every rank keeps the timer and reads the step's figures at log steps (they sync anyway); rank 0 alone
writes files, W&B and the console. It is handed figures, never a model or an engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from seemore_ds.config import Config, trace_steps
from seemore_ds.metrics.csv_log import (LOSS_COLUMNS, LOSSES_FILE, MEMORY_COLUMNS, MEMORY_FILE, TIMING_COLUMNS,
                                        TIMING_FILE, CSVLog)
from seemore_ds.metrics.plots import plot_run
from seemore_ds.metrics.summary import ColumnFigures, run_summary, summary_table, write_summary
from seemore_ds.profiling.flops_profile import FLOPS_PROFILE_FILE, FlopsReport
from seemore_ds.profiling.memory import memory_mib
from seemore_ds.profiling.peak import peak_tflops
from seemore_ds.profiling.throughput import throughput
from seemore_ds.profiling.trace import TorchTrace

TRACE_FILE = "torch_trace.json"


@dataclass
class ModelFigures:
    """What the metrics need to know of the model: its size and cost."""

    n_params: int  # counted before ZeRO-3 partitions them
    flops_per_sample: int  # forward and backward of one training sample
    tokens_per_sample: int  # decoder positions, padding included


@dataclass
class Validation:
    """One evaluation's figures, and the held-out captions it drew (rank 0's, for W&B)."""

    val_loss: float
    exact_match: float
    captions: tuple | None = None  # (images, captions, references, captions.png) on rank 0


class MetricsProcessor:
    def __init__(self, cfg: Config, model: ModelFigures, *, device: torch.device, world_size: int, precision: str,
                 samples_per_step: int, is_main: bool, resume_step: int | None, wandb_run_id: str | None,
                 say: Callable[[str], None]):
        """On rank 0: the logs (trimmed to ``resume_step`` when resuming), the device's peak, the trace and W&B."""
        self.cfg, self.model, self.device, self.world_size = cfg, model, device, world_size
        self.samples_per_step, self.is_main, self.say = samples_per_step, is_main, say
        self.run_dir = Path(cfg.run.output_dir)
        self.compiling = cfg.train.compile  # the first step of this process compiles the model
        self.interval_s, self.interval_steps = 0.0, 0  # training time since the last row, evaluation excluded
        self.skipped_since_row = 0
        self.step_start = self.data_s = self.step_s = 0.0
        self.train_loss: float | None = None  # as of the last row
        self.validation: Validation | None = None  # the last one of this process
        self.start_s = time.perf_counter()  # restarted at the first step
        self.bar = None
        self.peak_tflops = None
        self.wandb = None
        if not is_main:
            return
        self.peak_tflops, source = peak_tflops(device, precision, cfg.profile.peak_tflops)
        say(f"mfu: peak {self.peak_tflops:.3g} TFLOP/s per device ({source}), x {world_size} device(s)")
        self.loss_log = CSVLog(self.run_dir / LOSSES_FILE, LOSS_COLUMNS, resume_step)
        self.timing_log = CSVLog(self.run_dir / TIMING_FILE, TIMING_COLUMNS, resume_step)
        self.memory_log = CSVLog(self.run_dir / MEMORY_FILE, MEMORY_COLUMNS, resume_step)
        # The summary's figures span the resumes: the rows of earlier processes count too.
        self.figures = ColumnFigures(["samples_per_s", "mfu", "max_allocated_mib", "max_rss_mib"])
        for row in (*self.loss_log.kept, *self.memory_log.kept):
            self.figures.add(row)
        self.rows = len(self.loss_log.kept)
        self.trace = TorchTrace(trace_steps(cfg.profile.torch_trace), self.run_dir / TRACE_FILE, device)
        if cfg.wandb.enabled:
            from seemore_ds.metrics.wandb_sink import WandbSink

            self.wandb = WandbSink(cfg, self.run_dir, wandb_run_id, say)

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run a resumed run continues (kept in checkpoints); None without W&B or off rank 0."""
        return self.wandb.run_id if self.wandb else None

    def should_log(self, step: int) -> bool:
        """A loss and timing row at every ``log.every`` steps and the last one (and at every evaluation)."""
        every = self.cfg.log.every
        return step == self.cfg.train.max_steps or (every > 0 and step % every == 0)

    def should_profile(self, step: int) -> bool:
        """The step whose FLOPs are reported (``profile.flops_step``): its phases are timed."""
        return step == self.cfg.profile.flops_step

    # -- one step: start, data, end --

    def start_step(self, step: int) -> None:
        """``step`` (counted from 1) is about to fetch its data and run."""
        if self.bar is None:  # from the first step on: the set-up's lines come before it, its time is not counted
            self.start_s = time.perf_counter()
            self.bar = tqdm(total=self.cfg.train.max_steps, initial=step - 1, desc="train", unit="step",
                            disable=not (self.is_main and self.cfg.log.progress), dynamic_ncols=True, mininterval=0.5)
        if self.is_main:
            self.trace.before_step(step)
        self.step_start = time.perf_counter()

    def data_loaded(self) -> None:
        """The step's micro-batches are in hand."""
        self.data_s = time.perf_counter() - self.step_start

    def end_step(self, step: int, stats, profiled_forward: Callable[[], tuple[float, int] | None]) -> None:
        """The optimizer step ran: count its time (a compiling step apart), close the trace window, report the
        profiled step's FLOPs (``profiled_forward``: the engine's count, if any)."""
        self.step_s = time.perf_counter() - self.step_start
        if self.compiling:  # reported apart so that compilation does not pass for training speed
            self.compiling = False
            self.say(f"compile: step {step} took {self.step_s:.1f} s, compilation included; not counted in samples/s")
        else:
            self.interval_s, self.interval_steps = self.interval_s + self.step_s, self.interval_steps + 1
        self.bar.update(1)
        if self.is_main:
            self.trace.after_step(step)
            if self.should_profile(step):
                self._report_flops(stats, profiled_forward())

    def log(self, step: int, stats, epoch: int, skipped: int, validation: Validation | None) -> None:
        """At a log step or an evaluation: the loss, timing and memory rows, the bar's figures, W&B, and the
        evaluation's console line. ``skipped``: updates skipped since the guard's last read."""
        self.skipped_since_row += skipped
        if validation is not None:
            self.validation = validation
        if not (self.should_log(step) or validation):
            return
        self.train_loss, lr = stats.loss.item(), stats.lr.item()
        samples_per_s = self.interval_steps * self.samples_per_step / self.interval_s if self.interval_steps else None
        self.interval_s, self.interval_steps = 0.0, 0
        self.bar.set_postfix(loss=f"{self.train_loss:.4f}", lr=f"{lr:.2e}", refresh=False,
                             samples_per_s="-" if samples_per_s is None else f"{samples_per_s:.0f}")
        if self.is_main:
            loss_row = {
                "step": step, "epoch": epoch, "train_loss": self.train_loss,
                "val_loss": validation.val_loss if validation else None, "lr": lr,
                "grad_norm": None if stats.grad_norm is None else stats.grad_norm.item(),
                "val_exact_match": validation.exact_match if validation else None, "loss_scale": stats.loss_scale,
                "skipped_steps": self.skipped_since_row,
                **throughput(samples_per_s, self.model.tokens_per_sample, self.model.flops_per_sample,
                             self.peak_tflops, self.world_size),
            }
            timing_row = {
                "step": step, "data_s": self.data_s, "forward_s": stats.forward_s, "backward_s": stats.backward_s,
                "optimizer_s": stats.optimizer_s, "step_s": self.step_s, "backward_allreduce_s": stats.backward_allreduce_s,
            }
            memory_row = {"step": step, **memory_mib(self.device)}
            for log, row in ((self.loss_log, loss_row), (self.timing_log, timing_row), (self.memory_log, memory_row)):
                log.write(row)
                self.figures.add(row)
            self.rows += 1
            if self.wandb:
                self.wandb.log(step, {**loss_row, **timing_row, **memory_row})
                if validation and validation.captions:
                    self.wandb.log_captions(step, *validation.captions)
        self.skipped_since_row = 0
        if validation:
            self.say(f"step {step}: train loss {self.train_loss:.4f}, val loss {validation.val_loss:.4f}, "
                     f"caption exact match {validation.exact_match:.3f}")

    def _report_flops(self, stats, profiled: tuple[float, int] | None) -> None:
        """Headline figures of the profiled step: the engine's flops profiler if it ran, else the model's count."""
        t = self.cfg.train
        step_s = stats.forward_s + stats.backward_s + (stats.backward_allreduce_s or 0.0) + stats.optimizer_s
        if profiled:
            forward_flops, params = profiled
            source = f"DeepSpeed flops profiler, full report in {self.run_dir / FLOPS_PROFILE_FILE}"
        else:
            forward_flops, params = self.model.flops_per_sample / 3 * t.batch_size, self.model.n_params
            source = "the model's own count"
        report = FlopsReport(source, params, forward_flops, t.batch_size, t.grad_accum, step_s)
        if not profiled:  # with a profile, the file already holds DeepSpeed's full report
            headline = "".join(f"{key}: {value}\n" for key, value in report.headline().items())
            (self.run_dir / FLOPS_PROFILE_FILE).write_text(report.line() + "\n" + headline, encoding="utf-8")
        self.say(report.line())
        if self.wandb:
            self.wandb.log(self.cfg.profile.flops_step, {f"flops_profile/{k}": v for k, v in report.headline().items()})

    # -- the end: a finished run, or one stopped after saving a checkpoint --

    def close_progress(self) -> None:
        """Take the progress bar off the console, before the run's closing lines."""
        if self.bar is not None:
            self.bar.close()

    def finish(self, *, steps: int, best_val_loss: float, skipped_steps: int, checkpoint: Path | None) -> dict | None:
        """Close the trace; on rank 0 draw the plots, write ``summary.json`` and print it, end the W&B run.
        Returns the summary (None off rank 0)."""
        if not self.is_main:
            return None
        self.trace.close()
        if self.rows:
            plot_run(self.run_dir)
        validation = self.validation
        summary = run_summary(
            steps=steps, samples=steps * self.samples_per_step, wall_s=time.perf_counter() - self.start_s,
            final_train_loss=self.train_loss, final_val_loss=validation.val_loss if validation else None,
            best_val_loss=best_val_loss, mean_samples_per_s=self.figures.mean("samples_per_s"),
            mean_mfu=self.figures.mean("mfu"), flops_per_sample=self.model.flops_per_sample,
            peak_tflops=self.peak_tflops, peak_cuda_allocated_mib=self.figures.max("max_allocated_mib"),
            peak_rss_mib=self.figures.max("max_rss_mib"), skipped_steps=skipped_steps, checkpoint=checkpoint)
        self.say(f"summary ({write_summary(summary, self.run_dir)}):\n{summary_table(summary)}")
        if self.wandb:
            self.wandb.finish(summary)
        return summary
