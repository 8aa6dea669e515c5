"""PNG plots of one run folder's CSV logs, or of several overlaid with a legend naming each run:
loss (train and val), learning rate, throughput and MFU, the stacked step-time breakdown, memory."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
# Figures made directly, not through pyplot: no backend to choose, no display needed, and no
# process-wide matplotlib state changed for whoever imports this module.
from matplotlib.figure import Figure

from seemore_ds.errors import UserError
from seemore_ds.metrics.csv_log import LOSSES_FILE, MEMORY_FILE, TIMING_FILE

# Phases of a step, bottom to top of the stacked breakdown; older runs lack backward_allreduce_s.
TIMING_PARTS = ["data_s", "forward_s", "backward_s", "backward_allreduce_s", "optimizer_s"]
PLOT_FILES = ["loss_curve.png", "lr_curve.png", "throughput_curve.png", "timing_curve.png", "memory_curve.png"]


class RunLogs:
    """The CSV logs of one run folder, with the label its lines carry in the legend."""

    def __init__(self, run_dir: Path, label: str):
        self.label = label
        self.losses = _read(run_dir / LOSSES_FILE, required=True)
        if self.losses.empty:
            raise UserError(f"{run_dir / LOSSES_FILE} has no rows yet; train for at least log.every steps")
        self.timings = _read(run_dir / TIMING_FILE, required=True)
        self.memory = _read(run_dir / MEMORY_FILE, required=False)


def _read(path: Path, required: bool) -> pd.DataFrame:
    if not path.is_file():
        if required:
            raise UserError(f"{path} does not exist; is {path.parent} a run folder?")
        return pd.DataFrame()
    return pd.read_csv(path)


def _labels(run_dirs: list[Path]) -> list[str]:
    """Folder names, or the paths as given when two runs share a folder name."""
    names = [p.name or str(p) for p in run_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in run_dirs]


def _finish(fig, ax, out: Path) -> None:
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _has(frame: pd.DataFrame, column: str) -> bool:
    return column in frame and frame[column].notna().any()


def plot_loss(runs: list[RunLogs], out: Path, title: str) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, run in enumerate(runs):
        color = f"C{i}"
        ax.plot(run.losses["step"], run.losses["train_loss"], color=color, label=f"{run.label} train")
        val = run.losses.dropna(subset=["val_loss"])
        if len(val):
            ax.plot(val["step"], val["val_loss"], "o--", color=color, label=f"{run.label} val")
    ax.set(ylabel="cross-entropy (nats / char)", title=title)
    ax.set_yscale("log")
    _finish(fig, ax, out)


def plot_lr(runs: list[RunLogs], out: Path, title: str) -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for i, run in enumerate(runs):
        ax.plot(run.losses["step"], run.losses["lr"], color=f"C{i}", label=run.label)
    ax.set(ylabel="learning rate", title=title)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _finish(fig, ax, out)


def plot_throughput(runs: list[RunLogs], out: Path, title: str) -> None:
    with_mfu = any(_has(run.losses, "mfu") for run in runs)
    fig = Figure(figsize=(7, 6.5 if with_mfu else 4))
    axes = fig.subplots(2 if with_mfu else 1, 1, sharex=True, squeeze=False)
    top = axes[0][0]
    for i, run in enumerate(runs):
        top.plot(run.losses["step"], run.losses["samples_per_s"], color=f"C{i}", label=run.label)
        if with_mfu and _has(run.losses, "mfu"):
            axes[1][0].plot(run.losses["step"], run.losses["mfu"] * 100, color=f"C{i}", label=run.label)
    top.set(ylabel="samples / s (all ranks)", title=title)
    top.set_ylim(bottom=0)
    if with_mfu:
        axes[1][0].set(ylabel="MFU (% of peak)")
        axes[1][0].set_ylim(bottom=0)
        top.set_xlabel("")
    for a in fig.axes:
        a.grid(True, alpha=0.3)
    fig.axes[-1].set_xlabel("optimizer step")
    top.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_timing(runs: list[RunLogs], out: Path, title: str) -> None:
    """One stacked panel per run, on a shared scale: where the milliseconds of a step go."""
    fig = Figure(figsize=(7, 2.2 + 2.6 * len(runs)))
    axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False)
    top_ms = 1.05 * max(run.timings["step_s"].max() * 1000 for run in runs)
    for ax, run in zip(axes[:, 0], runs):
        parts = [p for p in TIMING_PARTS if _has(run.timings, p)]
        ms = [run.timings[p].fillna(0) * 1000 for p in parts]
        colors = [f"C{TIMING_PARTS.index(p)}" for p in parts]
        ax.stackplot(run.timings["step"], ms, labels=[p.removesuffix("_s") for p in parts], colors=colors, alpha=0.85)
        ax.plot(run.timings["step"], run.timings["step_s"] * 1000, "k-", lw=1, label="whole step")
        ax.set(ylabel="ms", title=run.label if len(runs) > 1 else title)
        ax.set_ylim(0, top_ms)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize="small", ncol=2)
    if len(runs) > 1:
        fig.suptitle(title)
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_memory(runs: list[RunLogs], out: Path, title: str) -> None:
    """Peak CUDA allocated/reserved where a GPU was used, the process's resident set always."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    top = 0.0
    for i, run in enumerate(runs):
        mem, color = run.memory, f"C{i}"
        on_gpu = _has(mem, "max_allocated_mib")
        if on_gpu:
            ax.plot(mem["step"], mem["max_allocated_mib"], color=color, label=f"{run.label} CUDA max allocated")
            ax.plot(mem["step"], mem["max_reserved_mib"], "--", color=color, label=f"{run.label} CUDA max reserved")
            top = max(top, mem["max_reserved_mib"].max())
        rss = "rss_mib" if _has(mem, "rss_mib") else "max_rss_mib"  # only the peak is known off Linux
        if _has(mem, rss):
            ax.plot(mem["step"], mem[rss], ":" if on_gpu else "-", color=color, label=f"{run.label} process RSS")
            top = max(top, mem[rss].max())
    ax.set(ylabel="MiB (rank 0)", title=title)
    ax.set_ylim(0, 1.1 * top)
    _finish(fig, ax, out)


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write the plots of one run, or of several overlaid, into ``out_dir``; returns the files written."""
    run_dirs = [Path(p) for p in run_dirs]
    out_dir = Path(out_dir)
    runs = [RunLogs(p, label) for p, label in zip(run_dirs, _labels(run_dirs))]
    out_dir.mkdir(parents=True, exist_ok=True)
    name = runs[0].label if len(runs) == 1 else " vs ".join(run.label for run in runs)
    written = [out_dir / f for f in PLOT_FILES]
    plot_loss(runs, written[0], f"loss: {name}")
    plot_lr(runs, written[1], f"learning rate: {name}")
    plot_throughput(runs, written[2], f"throughput: {name}")
    plot_timing(runs, written[3], f"step time: {name}")
    if any(_has(run.memory, "max_rss_mib") for run in runs):
        plot_memory(runs, written[4], f"memory: {name}")
    else:  # runs logged before memory was recorded
        written.pop()
    return written


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The plots of one run folder, written into it unless ``out_dir`` is given."""
    return plot_runs([run_dir], out_dir or run_dir)
