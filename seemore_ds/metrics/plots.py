"""PNG plots of a run folder's CSV logs: loss curve (train and val) and the step-time breakdown."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from seemore_ds.errors import UserError  # noqa: E402


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path} does not exist; is {path.parent} a run folder?")
    return pd.read_csv(path)


def plot_loss_curve(losses: pd.DataFrame, out: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(losses["step"], losses["train_loss"], label="train loss")
    val = losses.dropna(subset=["val_loss"])
    if len(val):
        ax.plot(val["step"], val["val_loss"], "o-", label="val loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats / char)", title=title)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_timing_curve(timings: pd.DataFrame, out: Path, title: str) -> None:
    parts = ["data_s", "forward_s", "backward_s", "optimizer_s"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ms = [timings[p] * 1000 for p in parts]
    ax.stackplot(timings["step"], ms, labels=[p.removesuffix("_s") for p in parts], alpha=0.85)
    ax.plot(timings["step"], timings["step_s"] * 1000, "k-", lw=1, label="whole step")
    ax.set(xlabel="optimizer step", ylabel="milliseconds", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss_curve.png and timing_curve.png for a run folder; returns their paths."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    losses, timings = _read(run_dir / "losses_log.csv"), _read(run_dir / "timing_logs.csv")
    if losses.empty:
        raise UserError(f"{run_dir / 'losses_log.csv'} has no rows yet; train for at least log.every steps")
    written = [out_dir / "loss_curve.png", out_dir / "timing_curve.png"]
    plot_loss_curve(losses, written[0], f"loss: {run_dir.name}")
    plot_timing_curve(timings, written[1], f"step time: {run_dir.name}")
    return written
