"""Rank 0's watch over a run beyond its losses: throughput and MFU, memory, the FLOPs profile, the
torch.profiler trace, the held-out captions and the W&B sink. The trainer calls it; it decides
nothing about training."""

from __future__ import annotations

from pathlib import Path

import torch

from seemore_ds.config import Config, trace_steps
from seemore_ds.evaluation import generate_captions
from seemore_ds.metrics.caption_grid import CAPTIONS_FILE, write_caption_grid
from seemore_ds.metrics.csv_log import CSVLog
from seemore_ds.model import SeemoreVLM
from seemore_ds.profiling import FLOPS_PROFILE_FILE, FlopsReport, TorchTrace, memory_mib, peak_tflops, throughput

MEMORY_FILE, TRACE_FILE = "memory_log.csv", "torch_trace.json"
MEMORY_COLUMNS = ["step", "max_allocated_mib", "max_reserved_mib", "rss_mib", "max_rss_mib"]
CAPTION_SAMPLES = 16  # held-out images captioned into captions.png (and W&B) at each evaluation


class RunMonitor:
    def __init__(self, cfg: Config, model: SeemoreVLM, n_params: int, device: torch.device, world_size: int,
                 resume_step: int | None, wandb_run_id: str | None, say):
        self.cfg, self.device, self.world_size, self.say = cfg, device, world_size, say
        self.run_dir = Path(cfg.run.output_dir)
        self.n_params = n_params
        self.flops_per_sample = model.flops_per_sample()
        self.tokens_per_sample = model.num_image_tokens + model.text_len  # decoder positions, padding included
        self.peak_tflops, source = peak_tflops(device, cfg.train.precision, cfg.profile.peak_tflops)
        say(f"mfu: peak {self.peak_tflops:.3g} TFLOP/s per device ({source}), x {world_size} device(s)")
        self.memory_log = CSVLog(self.run_dir / MEMORY_FILE, MEMORY_COLUMNS, resume_step)
        self.trace = TorchTrace(trace_steps(cfg.profile.torch_trace), self.run_dir / TRACE_FILE, device)
        self.wandb = None
        if cfg.wandb.enabled:
            from seemore_ds.metrics.wandb_sink import WandbSink

            self.wandb = WandbSink(cfg, self.run_dir, wandb_run_id, say)

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.run_id if self.wandb else None

    def before_step(self, step: int) -> None:
        """``step``: the optimizer step about to run, counted from 1."""
        self.trace.before_step(step)

    def after_step(self, step: int, stats, backend) -> None:
        self.trace.after_step(step)
        if step == self.cfg.profile.flops_step:
            self._report_flops(stats, backend)

    def _report_flops(self, stats, backend) -> None:
        """Headline figures of the profiled step: the engine's flops profiler if it ran, else the model's count."""
        t = self.cfg.train
        step_s = stats.forward_s + stats.backward_s + (stats.backward_allreduce_s or 0.0) + stats.optimizer_s
        profiled = backend.profiled_forward()
        if profiled:
            forward_flops, params = profiled
            source = f"DeepSpeed flops profiler, full report in {self.run_dir / FLOPS_PROFILE_FILE}"
        else:
            forward_flops, params = self.flops_per_sample / 3 * t.batch_size, self.n_params
            source = "the model's own count"
        report = FlopsReport(source, params, forward_flops, t.batch_size, t.grad_accum, step_s)
        if not profiled:  # with a profile, the file already holds DeepSpeed's full report
            headline = "".join(f"{key}: {value}\n" for key, value in report.headline().items())
            (self.run_dir / FLOPS_PROFILE_FILE).write_text(report.line() + "\n" + headline, encoding="utf-8")
        self.say(report.line())
        if self.wandb:
            self.wandb.log(self.cfg.profile.flops_step, {f"flops_profile/{k}": v for k, v in report.headline().items()})

    def throughput(self, samples_per_s: float) -> dict:
        """samples/s, tokens/s, achieved TFLOP/s and MFU over all ranks, for the loss log row."""
        return throughput(samples_per_s, self.tokens_per_sample, self.flops_per_sample, self.peak_tflops, self.world_size)

    def log(self, step: int, *rows: dict) -> None:
        """Write this step's memory row, and every row the trainer logged, to W&B as well."""
        memory = {"step": step, **memory_mib(self.device)}
        self.memory_log.write(memory)
        if self.wandb:
            merged = {}
            for row in (*rows, memory):
                merged.update(row)
            self.wandb.log(step, merged)

    def log_captions(self, step: int, model: SeemoreVLM, split, tokenizer) -> None:
        """At an evaluation: the first held-out images with their generated captions, drawn into
        ``captions.png`` (replaced at each evaluation) and, with W&B, as a table and that image."""
        if split is None:
            return
        images, captions, references, grid = draw_held_out_captions(
            model, split.data, tokenizer, self.run_dir / CAPTIONS_FILE, f"{self.run_dir.name}, step {step}")
        if self.wandb:
            self.wandb.log_captions(step, images, captions, references, grid)

    def finish(self, summary: dict) -> None:
        self.trace.close()
        if self.wandb:
            self.wandb.finish(summary)


def draw_held_out_captions(model: SeemoreVLM, data, tokenizer, out: Path, title: str):
    """Caption the first CAPTION_SAMPLES held-out images (``data``: CaptionData) and draw them into
    ``out``; returns (images, captions, references, out)."""
    n = min(CAPTION_SAMPLES, len(data))
    images = data.images_at(torch.arange(n)).cpu()
    captions, references = generate_captions(model, images, tokenizer), data.captions[:n]
    return images, captions, references, write_caption_grid(images.numpy(), captions, references, out, title)
