"""Long-run health: resident memory after warm-up, and the loss around resume points.

    python -m bench.long_run [--steps 2000] [--resume-at 700,1400] [--out runs/long_run] [key=value ...]

Trains the default config (plus any overrides) through the CLI with ``log.every=1``. At each resume
point the job is stopped with SIGTERM, as a scheduler preempts it (it saves the step it is on), and
started again with ``train.resume=auto``. Meanwhile the job's resident memory is sampled twice a
second. Prints one JSON line per segment (memory after warm-up, at the end, growth in %) and per
resume point (median train loss over the 50 steps before it, the highest over the 50 after, their
ratio), then a summary against the targets: growth <= 5 %, and no spike after a resume.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

WINDOW_STEPS = 50  # losses compared before and after each resume point
SPIKE_RATIO = 1.5  # a loss this many times the median before the resume counts as a spike


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "losses_log.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [(int(row["step"]), float(row["train_loss"])) for row in csv.DictReader(handle)]


def run_segment(args: list[str], stop_at: int | None, warmup_steps: int, run_dir: Path) -> dict:
    """One job from start (or resume) to ``stop_at`` (SIGTERM) or the end; its memory over time."""
    job = subprocess.Popen([sys.executable, "-m", "seemore_ds", "train", *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    process = psutil.Process(job.pid)
    first_step = last_step = (logged_losses(run_dir) or [(0, 0.0)])[-1][0]
    warm_rss = last_rss = None
    while job.poll() is None:
        time.sleep(0.5)
        step = (logged_losses(run_dir) or [(0, 0.0)])[-1][0]
        try:
            rss = process.memory_info().rss
        except psutil.NoSuchProcess:
            break
        if warm_rss is None and step - first_step >= warmup_steps:
            warm_rss = rss
        if warm_rss is not None and step > last_step:  # while training: not the plots drawn at the end
            last_rss = rss
        last_step = step
        if stop_at is not None and step >= stop_at:
            job.send_signal(signal.SIGTERM)
            break
    _, err = job.communicate()
    if job.returncode not in (0, 128 + signal.SIGTERM):
        sys.exit(f"training failed ({job.returncode}):\n{err[-3000:]}")
    end_step = logged_losses(run_dir)[-1][0]
    growth = None if warm_rss is None else 100.0 * (last_rss - warm_rss) / warm_rss
    return {"bench": "memory", "from_step": first_step, "to_step": end_step, "warm_rss_mib": _mib(warm_rss),
            "end_rss_mib": _mib(last_rss), "growth_pct": None if growth is None else round(growth, 2)}


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def resume_window(losses: list[tuple[int, float]], at: int) -> dict:
    before = [loss for step, loss in losses if at - WINDOW_STEPS < step <= at]
    after = [loss for step, loss in losses if at < step <= at + WINDOW_STEPS]
    median_before = statistics.median(before)
    return {"bench": "resume", "step": at, "median_loss_before": round(median_before, 5),
            "max_loss_after": round(max(after), 5), "ratio": round(max(after) / median_before, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--resume-at", default="700,1400", help="steps after which the job is stopped and resumed")
    parser.add_argument("--warmup-steps", type=int, default=100, help="steps of each job before memory is measured")
    parser.add_argument("--out", default="runs/long_run")
    parser.add_argument("overrides", nargs="*")
    options = parser.parse_args()
    run_dir = Path(options.out)
    if run_dir.exists():
        sys.exit(f"{run_dir} exists; remove it or name another folder with --out")
    args = [f"train.max_steps={options.steps}", "log.every=1", "log.progress=false", "train.device=cpu",
            f"run.output_dir={run_dir}", "train.resume=auto", *options.overrides]
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    stops = sorted(int(s) for s in options.resume_at.split(",") if s)
    segments = []
    for stop_at in [*stops, None]:
        segments.append(run_segment(args, stop_at, options.warmup_steps, run_dir))
        print(json.dumps(segments[-1]), flush=True)
    losses = logged_losses(run_dir)
    resumes = [resume_window(losses, segment["to_step"]) for segment in segments[:-1]]
    for row in resumes:
        print(json.dumps(row))
    growths = [s["growth_pct"] for s in segments if s["growth_pct"] is not None]
    print(json.dumps({"bench": "long_run", "steps": losses[-1][0], "resumes": len(resumes),
                      "max_growth_pct": max(growths) if growths else None, "growth_target_met": bool(growths) and max(growths) <= 5.0,
                      "max_resume_ratio": max((r["ratio"] for r in resumes), default=None),
                      "no_spike_after_resume": all(r["ratio"] <= SPIKE_RATIO for r in resumes)}))


if __name__ == "__main__":
    main()
