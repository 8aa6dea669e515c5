"""Weights & Biases beside the local CSVs: the resolved config, every logged metric, caption tables.

Rank 0 only, imported only when ``wandb.enabled``. It never waits at a login prompt: without an
API key an online run becomes an offline one (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from seemore_ds.config import Config
from seemore_ds.errors import UserError


class WandbSink:
    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None, say):
        """Start a W&B run, or continue ``run_id`` (kept in checkpoints) when resuming."""
        if importlib.util.find_spec("wandb") is None:
            raise UserError("wandb.enabled=true needs the wandb package: pip install wandb (or wandb.enabled=false)")
        import wandb

        w = cfg.wandb
        mode = w.mode
        if mode == "online" and not wandb.login(prompt=False, verify=False):
            mode = "offline"
            say(f"wandb: no API key (WANDB_API_KEY or `wandb login`), logging offline under {run_dir / 'wandb'}; "
                f"upload later with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
        self.wandb = wandb
        self.run = wandb.init(
            project=w.project, entity=w.entity or None, name=w.name or run_dir.resolve().name,
            tags=[t.strip() for t in w.tags.split(",") if t.strip()], group=w.group or None, mode=mode, dir=str(run_dir),
            config=cfg.to_dict(), id=run_id, resume="allow",
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run.define_metric("*", step_metric="step")

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, step: int, metrics: dict) -> None:
        """One point per metric at this optimizer step; empty values are left out."""
        self.run.log({"step": step, **{k: v for k, v in metrics.items() if v is not None and k != "step"}})

    def log_captions(self, step: int, images: torch.Tensor, captions: list[str], references: list[str],
                     grid: Path) -> None:
        """A table of held-out images with the generated and the reference caption, and the same
        images drawn as one grid (``captions.png``) with the wrong captions marked."""
        table = self.wandb.Table(columns=["step", "image", "generated", "reference"])
        for image, caption, reference in zip(images, captions, references):
            table.add_data(step, self.wandb.Image(image.permute(1, 2, 0).numpy()), caption, reference)
        self.run.log({"step": step, "captions": table, "captions_grid": self.wandb.Image(str(grid))})

    def finish(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if v is not None})
        self.run.finish()
