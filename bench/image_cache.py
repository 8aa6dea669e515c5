"""Memory per rank and load time of the decoded images, with the image cache and without, at 2 ranks.

    python -m bench.image_cache [--ranks 2] [--images 3000] [--img-size 64]

Writes the built-in shapes as a seemore CSV, then launches the ranks under the deepspeed launcher
three times: ``off`` (data.cache=false: every rank decodes), ``build`` (an empty cache folder: one
rank decodes and writes, the others wait and map) and ``map`` (the folder that build filled). Each
rank loads and splits the data as the trainer does, reads every image once in batches of
train.batch_size, as an epoch does, and measures its own memory with psutil, minus what it held before loading:

- pss: a page shared by k processes counts 1/k to each, so N ranks together take N x pss;
- uss: the pages only this process holds;
- rss: every page it can touch, shared ones counted whole.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import torch

from bench.launch import launch_module
from seemore_ds.config import load_config
from seemore_ds.data.csv_reader import write_caption_csv
from seemore_ds.data.dataset import load_caption_data, split_train_val
from seemore_ds.data.synthetic import synthetic_dataset
from seemore_ds.profiling.memory import MIB

SCENARIOS = ("off", "build", "map")


def memory_mib() -> dict[str, float]:
    info = psutil.Process().memory_full_info()
    return {name: getattr(info, name) / MIB for name in ("pss", "uss", "rss")}


def worker(csv_path: str, img_size: int, cache_dir: str, scenario: str) -> None:
    torch.distributed.init_process_group("gloo")
    before = memory_mib()
    start = time.perf_counter()
    cfg = load_config(None, [f"data.csv={csv_path}", f"model.img_size={img_size}"])
    data = load_caption_data(cfg, cache_dir=Path(cache_dir) if scenario != "off" else None)
    splits = split_train_val(data, cfg.data.val_fraction, cfg.train.seed)
    load_s = time.perf_counter() - start
    for split in splits:
        for batch in torch.arange(len(split)).split(cfg.train.batch_size):
            split.images_at(batch)
    torch.distributed.barrier()  # every rank holds its data: shared pages are shared now
    after = memory_mib()
    row = {"bench": "image_cache", "cache": scenario, "rank": torch.distributed.get_rank(),
           "ranks": torch.distributed.get_world_size(), "images": len(data), "img_size": img_size,
           "decoded": data.decoded, "load_s": round(load_s, 3),
           **{f"{name}_mib": round(after[name] - before[name], 1) for name in after}}
    rows = [None] * row["ranks"]
    torch.distributed.all_gather_object(rows, row)  # also keeps every rank alive until all have measured
    if row["rank"] == 0:
        for gathered in rows:
            print(json.dumps(gathered), flush=True)
    torch.distributed.destroy_process_group()


def cache_part(ranks: int, n_images: int, img_size: int) -> tuple[list[dict], str]:
    """One launch per scenario; every rank's row."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = str(Path(tmp) / "shapes.csv")
        write_caption_csv(csv_path, *synthetic_dataset(n_images, seed=0, size_px=img_size))
        for scenario in SCENARIOS:
            args = ["--worker", "--csv", csv_path, "--img-size", str(img_size), "--cache-dir", str(Path(tmp) / "cache"),
                    "--scenario", scenario]
            result = launch_module(ranks, "bench.image_cache", args, stdout=subprocess.PIPE)
            if result.returncode:
                raise SystemExit(f"bench.image_cache: the {scenario} launch failed (exit {result.returncode})")
            rows += [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"bench": "image_cache"')]
    decoded_mib = n_images * 3 * img_size**2 / MIB
    table = [f"| data.cache (per rank of {ranks}; {n_images} images of {img_size} px = {decoded_mib:.1f} MiB decoded) "
             "| processes that decoded | load s (slowest rank) | PSS MiB | USS MiB | RSS MiB |", "|---|---:|---:|---:|---:|---:|"]
    for scenario in SCENARIOS:
        these = [r for r in rows if r["cache"] == scenario]
        mean = {k: sum(r[f"{k}_mib"] for r in these) / len(these) for k in ("pss", "uss", "rss")}
        table.append(f"| {scenario} | {sum(r['decoded'] for r in these)} | {max(r['load_s'] for r in these):.2f} | "
                     f"{mean['pss']:.1f} | {mean['uss']:.1f} | {mean['rss']:.1f} |")
    return rows, "\n".join(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.csv, args.img_size, args.cache_dir, args.scenario)
        return
    rows, table = cache_part(args.ranks, args.images, args.img_size)
    for row in rows:
        print(json.dumps(row))
    print("\n" + table)


if __name__ == "__main__":
    main()
