"""The end-of-run summary: one short table on the console and ``RUN/summary.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path

SUMMARY_FILE = "summary.json"


class ColumnFigures:
    """Running mean and maximum of some log columns over the rows seen, empty and NaN cells left out;
    rows may be numbers or the text of a CSV file (kept from an earlier process of the run)."""

    def __init__(self, columns: list[str]):
        self.sums, self.counts = dict.fromkeys(columns, 0.0), dict.fromkeys(columns, 0)
        self.maxima: dict[str, float | None] = dict.fromkeys(columns)

    def add(self, row: dict) -> None:
        """Count ``row``'s values of the tracked columns."""
        for column in self.sums:
            value = row.get(column)
            if value is None or value == "" or math.isnan(value := float(value)):
                continue
            self.sums[column] += value
            self.counts[column] += 1
            self.maxima[column] = value if self.maxima[column] is None else max(self.maxima[column], value)

    def mean(self, column: str) -> float | None:
        """The mean of the column's values; None when it had none."""
        return self.sums[column] / self.counts[column] if self.counts[column] else None

    def max(self, column: str) -> float | None:
        """The largest of the column's values; None when it had none."""
        return self.maxima[column]


def _number(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def run_summary(*, steps: int, samples: int, wall_s: float, final_train_loss, final_val_loss, best_val_loss,
                mean_samples_per_s, mean_mfu, flops_per_sample: int, peak_tflops: float, peak_cuda_allocated_mib,
                peak_rss_mib, skipped_steps: int, checkpoint) -> dict:
    """What the run did, as ``summary.json`` holds it: the trainer's counters and the logs' figures (which span
    resumes); a figure that is missing is None."""
    return {
        "steps": steps,
        "samples": samples,
        "wall_s": wall_s,  # this process: a resumed run counts from its restart
        "final_train_loss": _number(final_train_loss),
        "final_val_loss": _number(final_val_loss),
        "best_val_loss": best_val_loss if best_val_loss is not None and math.isfinite(best_val_loss) else None,
        "mean_samples_per_s": mean_samples_per_s,
        "mean_mfu": mean_mfu,
        "flops_per_sample": flops_per_sample,
        "peak_tflops_per_device": peak_tflops,
        "peak_cuda_allocated_mib": peak_cuda_allocated_mib,
        "peak_rss_mib": peak_rss_mib,
        "skipped_steps": skipped_steps,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }


def write_summary(summary: dict, run_dir: Path) -> Path:
    """``RUN/summary.json``; returns its path."""
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
