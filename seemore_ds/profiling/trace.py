"""A torch.profiler Chrome trace of a window of optimizer steps (``profile.torch_trace``)."""

from __future__ import annotations

from pathlib import Path

import torch


class TorchTrace:
    """A torch.profiler Chrome trace of optimizer steps START..END (counted from 1), written to ``path``."""

    def __init__(self, steps: tuple[int, int] | None, path: Path, device: torch.device):
        self.steps, self.path, self.profiler = steps, path, None
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)

    def before_step(self, step: int) -> None:
        """Start profiling when ``step`` (about to run) opens the window."""
        if self.steps and step == self.steps[0]:
            self.profiler = torch.profiler.profile(activities=self.activities)
            self.profiler.__enter__()

    def after_step(self, step: int) -> None:
        """Stop and write the trace once ``step`` (just run) closes the window."""
        if self.profiler is not None and step >= self.steps[1]:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run ends inside the window)."""
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler.export_chrome_trace(str(self.path))
            self.profiler = None
