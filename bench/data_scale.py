"""Data at scale: decode rate on 1 and on all workers, peak memory against the cache, time to the first step.

    python -m bench.data_scale [--rows 10000,100000] [--million] [--rate-rows 20000] [--img-size 64]
                               [--source-px 128] [--work DIR]

For each row count it writes a seemore CSV of photo-like JPEGs (smooth colour fields, shapes, sensor
noise; ``--source-px`` square, base64), then:

- ``decode``: ``--rate-rows`` of those rows decoded by ``decoding.decode_tables`` with 1 worker and
  with one per core (once per row count: the same rows, so the ratio is the parallel speed-up);
- ``cold`` / ``warm``: ``python -m seemore_ds train`` on the CSV with an empty cache folder, then
  again with the one it filled, each stopped once the first step's row is in ``losses_log.csv``:
  the time from launch to that row, the peak RssAnon of the trainer and its decode workers together
  (sampled every 50 ms from /proc; the mapped cache's pages are file-backed and do not count) and
  the cache's size;
- ``data wait``: batches of ``train.batch_size`` random rows gathered from the mapped cache with its
  pages dropped from the page cache before every batch (posix_fadvise DONTNEED), as when the cache
  is larger than memory, against the warm run's median step time; and the warm run's own data
  wait (``data_s`` over ``step_s`` in timing_logs.csv, batches prefetched by the trainer) while the
  cache's pages are dropped every 50 ms.

Prints one JSON line per figure and a Markdown table for docs/data.md.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw, ImageFilter

from seemore_ds.config import load_config
from seemore_ds.data.dataset import load_caption_data
from seemore_ds.data.decoding import default_workers
from seemore_ds.metrics.csv_log import TIMING_FILE
from seemore_ds.profiling.memory import MIB

REPO = Path(__file__).resolve().parent.parent
DISTINCT_IMAGES = 500  # encoded once and repeated with new captions: decoding costs the same
SAMPLE_S = 0.05


def photo_like(rng: np.random.Generator, side: int) -> bytes:
    """A JPEG that compresses and decodes like a photo, not like flat synthetic shapes."""
    field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(rng.integers(2, 6)):
        x, y = rng.integers(0, side, 2)
        r = int(rng.integers(side // 10, side // 3))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=fill)
    field = field.filter(ImageFilter.GaussianBlur(side / 100))
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 8, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_csv(path: Path, rows: int, side: int) -> None:
    rng = np.random.default_rng(0)
    images = [base64.b64encode(photo_like(rng, side)).decode("ascii") for _ in range(DISTINCT_IMAGES)]
    words = ["a", "photo", "of", "the", "red", "blue", "green", "sky", "tree", "dog", "car", "house", "at", "night"]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "b64string_images", "caption"])
        for i in range(rows):
            caption = " ".join(words[j] for j in rng.integers(0, len(words), 6))
            writer.writerow([i, images[i % DISTINCT_IMAGES], caption])


DECODE = """
import json, sys
from pathlib import Path
from seemore_ds.data.decoding import DecodeSettings, decode_tables
result = decode_tables([Path(sys.argv[1])], DecodeSettings(int(sys.argv[2]), 48, 64_000_000), Path(sys.argv[3]),
                       workers=int(sys.argv[4]))
print(json.dumps({"rows": result.n_images, "workers": result.workers, "images_per_s": round(result.rows_per_s, 1),
                  "peak_rss_anon_mib": round(result.peak_rss_anon / 2**20, 1)}))
"""


def decode_rates(csv_path: Path, img_size: int, out: Path) -> list[dict]:
    """Decode with 1 worker, then one per core. In a fresh ``python -c`` process, as the trainer's
    ``python -m seemore_ds``: decode workers import the main module unless it is a package's __main__,
    and this module imports torch."""
    figures = []
    for workers in (1, default_workers()):
        done = subprocess.run([sys.executable, "-c", DECODE, str(csv_path), str(img_size), str(out), str(workers)],
                              cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        figures.append({"bench": "data_scale", "figure": "decode", **json.loads(done.stdout.splitlines()[-1])})
        print(json.dumps(figures[-1]), flush=True)
    out.unlink()
    return figures


def rss_anon_of_tree(pid: int) -> int:
    """RssAnon of ``pid`` and all its descendants, in bytes."""
    try:
        pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return 0
    total = 0
    for current in pids:
        try:
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
        except (OSError, StopIteration):
            continue
    return total


def drop_from_page_cache(cache_dir: Path) -> None:
    """Evict the cache files' pages (clean ones: the cache is on disk), as memory pressure would."""
    for file in cache_dir.glob("*.u8"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def first_step(csv_path: Path, cache_dir: Path, run_dir: Path, img_size: int, steps: int, drop: bool = False) -> dict:
    """Launch a training run; time to its first logged step, its peak RssAnon, then ``steps`` steps'
    times; with ``drop`` the cache's pages are dropped from the page cache every SAMPLE_S."""
    cmd = [sys.executable, "-m", "seemore_ds", "train", f"data.csv={csv_path}", f"data.cache_dir={cache_dir}",
           f"run.output_dir={run_dir}", f"model.img_size={img_size}", "train.backend=torch", "train.device=cpu",
           "train.max_steps=1000000", "eval.every=0", "checkpoint.every=0", "log.every=1", "log.progress=false"]
    shutil.rmtree(run_dir, ignore_errors=True)
    log = run_dir / TIMING_FILE
    start = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    peak, first_s, rows = 0, None, []
    try:
        while process.poll() is None:
            peak = max(peak, rss_anon_of_tree(process.pid))
            if drop:
                drop_from_page_cache(cache_dir)
            if log.is_file():
                with open(log, newline="") as handle:
                    rows = list(csv.DictReader(handle))
                if rows and first_s is None:
                    first_s = time.perf_counter() - start
                if len(rows) > steps:
                    break
            time.sleep(SAMPLE_S)
    finally:
        process.kill()
        output = process.communicate()[0]
    if first_s is None:
        raise RuntimeError(f"the run stopped before its first step:\n{output[-3000:]}")
    data_lines = [line for line in output.splitlines() if line.startswith("data:")]
    return {"first_step_s": round(first_s, 1), "peak_rss_anon_mib": round(peak / MIB, 1),
            "step_s": [float(r["step_s"]) for r in rows[1:]], "data_s": [float(r["data_s"]) for r in rows[1:]],
            "data_lines": data_lines}


def data_wait(csv_path: Path, cache_dir: Path, img_size: int, batches: int = 50) -> dict:
    """Gather time of one batch of random rows, page cache warm and dropped before every batch."""
    cfg = load_config(None, [f"data.csv={csv_path}", f"model.img_size={img_size}", "log.progress=false"])
    data = load_caption_data(cfg, cache_dir=cache_dir)
    fd = os.open(data.cache_file, os.O_RDONLY)
    generator = torch.Generator().manual_seed(0)
    times = {"warm": [], "cold": []}
    try:
        for kind in ("cold", "warm"):
            for _ in range(batches):
                indices = torch.randint(0, len(data), (cfg.train.batch_size,), generator=generator)
                if kind == "cold":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter()
                data.images_at(indices)
                times[kind].append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return {kind: statistics.median(values) for kind, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000", help="comma-separated row counts")
    parser.add_argument("--million", action="store_true", help="also 1,000,000 rows (about 13 GB of CSV)")
    parser.add_argument("--rate-rows", type=int, default=20000, help="rows decoded with 1 and with all workers")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--source-px", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps timed after the first in the warm run")
    parser.add_argument("--work", default=None, help="folder for the CSVs, caches and runs (default: a temporary one)")
    args = parser.parse_args()
    counts = [int(n) for n in args.rows.split(",") if n] + ([1_000_000] if args.million else [])
    work = Path(args.work or tempfile.mkdtemp(prefix="seemore-ds-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {os.cpu_count()} cores, affinity {default_workers()}, load {os.getloadavg()[0]:.1f}; work in {work}", flush=True)

    rate_csv = work / f"rate_{args.rate_rows}.csv"
    write_csv(rate_csv, args.rate_rows, args.source_px)
    rates = decode_rates(rate_csv, args.img_size, work / "rate.u8")
    speedup = rates[1]["images_per_s"] / rates[0]["images_per_s"]

    table = []
    for rows in counts:
        csv_path = work / f"rows_{rows}.csv"
        if not csv_path.is_file():
            write_csv(csv_path, rows, args.source_px)
        cache_dir = work / f"cache_{rows}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        cold = first_step(csv_path, cache_dir, work / f"run_{rows}_cold", args.img_size, steps=0)
        warm = first_step(csv_path, cache_dir, work / f"run_{rows}_warm", args.img_size, steps=args.steps, drop=True)
        cache_mib = sum(f.stat().st_size for f in cache_dir.glob("*.u8")) / MIB
        wait = data_wait(csv_path, cache_dir, args.img_size)
        step_s = statistics.median(warm["step_s"])
        trainer_wait = sum(warm["data_s"]) / sum(warm["step_s"])
        row = {"bench": "data_scale", "rows": rows, "csv_mib": round(csv_path.stat().st_size / MIB, 1),
               "cache_mib": round(cache_mib, 1), "cold_first_step_s": cold["first_step_s"],
               "warm_first_step_s": warm["first_step_s"], "cold_peak_rss_anon_mib": cold["peak_rss_anon_mib"],
               "warm_peak_rss_anon_mib": warm["peak_rss_anon_mib"],
               "rss_goal_mib": round(600 + 0.05 * cache_mib, 1), "median_step_s": round(step_s, 4),
               "gather_warm_ms": round(wait["warm"] * 1e3, 3), "gather_cold_ms": round(wait["cold"] * 1e3, 3),
               "data_wait_cold_share": round(wait["cold"] / step_s, 4),
               "trainer_data_wait_share": round(trainer_wait, 4), "cold_data_lines": cold["data_lines"]}
        print(json.dumps(row), flush=True)
        table.append(row)

    print()
    print(f"Decode ({args.rate_rows} rows of {args.source_px} px JPEGs to {args.img_size} px): "
          f"{rates[0]['images_per_s']:.0f} images/s on 1 worker, {rates[1]['images_per_s']:.0f} on "
          f"{rates[1]['workers']} ({speedup:.2f}x)")
    print()
    print("| rows | CSV | cache | peak RssAnon cold (goal) | peak RssAnon warm | first step cold | first step warm "
          "| step | batch gather, page cache dropped (share of step) | trainer's data wait, prefetched |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['rows']:,} | {r['csv_mib']:.0f} MiB | {r['cache_mib']:.0f} MiB | {r['cold_peak_rss_anon_mib']:.0f} MiB "
              f"({r['rss_goal_mib']:.0f}) | {r['warm_peak_rss_anon_mib']:.0f} MiB | {r['cold_first_step_s']:.1f} s "
              f"| {r['warm_first_step_s']:.1f} s | {r['median_step_s'] * 1e3:.0f} ms "
              f"| {r['gather_cold_ms']:.2f} ms ({100 * r['data_wait_cold_share']:.1f} %) "
              f"| {100 * r['trainer_data_wait_share']:.2f} % |")


if __name__ == "__main__":
    main()
