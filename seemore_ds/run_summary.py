"""The end-of-run summary: one short table on the console and ``RUN/summary.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

SUMMARY_FILE = "summary.json"


def _column(path: Path, column: str) -> pd.Series:
    """A logged column without its empty cells; empty when the file or column is missing."""
    if not path.is_file():
        return pd.Series(dtype=float)
    frame = pd.read_csv(path)
    return frame[column].dropna() if column in frame else pd.Series(dtype=float)


def _number(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def run_summary(run_dir: Path, *, steps: int, samples: int, wall_s: float, final_train_loss, final_val_loss,
                best_val_loss, skipped_steps: int, checkpoint, flops_per_sample: int, peak_tflops: float) -> dict:
    """What the run did, from the trainer's counters and the run folder's logs (which span resumes)."""
    losses, memory = run_dir / "losses_log.csv", run_dir / "memory_log.csv"
    samples_per_s, mfu = _column(losses, "samples_per_s"), _column(losses, "mfu")
    peak_cuda, peak_rss = _column(memory, "max_allocated_mib"), _column(memory, "max_rss_mib")
    return {
        "steps": steps,
        "samples": samples,
        "wall_s": wall_s,  # this process: a resumed run counts from its restart
        "final_train_loss": _number(final_train_loss),
        "final_val_loss": _number(final_val_loss),
        "best_val_loss": _number(best_val_loss) if best_val_loss is not None and math.isfinite(best_val_loss) else None,
        "mean_samples_per_s": float(samples_per_s.mean()) if len(samples_per_s) else None,
        "mean_mfu": float(mfu.mean()) if len(mfu) else None,
        "flops_per_sample": flops_per_sample,
        "peak_tflops_per_device": peak_tflops,
        "peak_cuda_allocated_mib": float(peak_cuda.max()) if len(peak_cuda) else None,
        "peak_rss_mib": float(peak_rss.max()) if len(peak_rss) else None,
        "skipped_steps": skipped_steps,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }


def write_summary(summary: dict, run_dir: Path) -> Path:
    path = run_dir / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return path


def summary_table(summary: dict) -> str:
    """Two aligned columns, one figure a line; absent figures are left out."""
    def show(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    rows = [(key, show(value)) for key, value in summary.items() if value is not None]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"  {key:<{width}}  {value}" for key, value in rows)
