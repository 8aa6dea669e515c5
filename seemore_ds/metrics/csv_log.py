"""The run folder's CSV logs: their file names and columns, appended to with a fixed header and trimmed
back to the resume step on restart."""

from __future__ import annotations

import csv
from pathlib import Path

LOSSES_FILE, TIMING_FILE, MEMORY_FILE = "losses_log.csv", "timing_logs.csv", "memory_log.csv"
LOSS_COLUMNS = ["step", "epoch", "train_loss", "val_loss", "lr", "grad_norm", "samples_per_s", "val_exact_match", "loss_scale", "skipped_steps",
               "tokens_per_s", "achieved_tflops", "mfu"]
TIMING_COLUMNS = ["step", "data_s", "forward_s", "backward_s", "optimizer_s", "step_s", "backward_allreduce_s"]
MEMORY_COLUMNS = ["step", "max_allocated_mib", "max_reserved_mib", "rss_mib", "max_rss_mib"]


class CSVLog:
    def __init__(self, path: Path, columns: list[str], resume_step: int | None = None):
        """Start a new file, or on resume keep the rows up to ``resume_step`` (later ones were never
        checkpointed); ``kept`` holds those rows, as text, for figures that span the resumes."""
        self.path, self.columns = path, columns
        self.kept: list[dict] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as handle:
                self.kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: row.get(k, "") for k in columns} for row in self.kept)

    def write(self, row: dict) -> None:
        """Append one row; missing and None values are left empty, floats written to 6 significant digits."""
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow({k: _fmt(row.get(k)) for k in self.columns})


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
