"""The benchmark suite: how close seemore-ds trains to the hardware's limit, in one command.

    python -m bench [--parts throughput,mfu,data,cache,engine,scaling] [--device cpu] [--precisions fp32,bf16]
                    [--no-compile] [--steps 4] [--rounds 2] [--batch-size 16]

Prints one JSON line per figure as it is measured, then a Markdown table per part for docs/performance.md.
Loops compared with each other take turns in rounds inside one process, so machine noise hits
them alike and the ratios hold even on a busy machine; absolute figures do not. By default on a CPU
bf16 runs only where the CPU multiplies bf16 at least as fast as fp32 (see ``bench.throughput.default_precisions``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.engine_stages import engine_part
from bench.image_cache import cache_part
from bench.suite import data_part, mfu_part, scaling_part, throughput_part
from bench.throughput import default_precisions
from seemore_ds.backends.base import resolve_device

PARTS = ("throughput", "mfu", "data", "cache", "engine", "scaling")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precisions", default="", help="comma-separated fp32,bf16,fp16 (default: what pays here)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd loops")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per loop per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="the throughput, data and scaling parts")
    parser.add_argument("--mfu-batch-size", type=int, default=4, help="the ≈90M config")
    parser.add_argument("--engine-ranks", default="1,2", help="comma-separated rank counts for the engine part")
    parser.add_argument("--engine-stages", default="0,1,2,3")
    parser.add_argument("--engine-batch-size", type=int, default=8)
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    device = resolve_device(args.device)
    precisions = args.precisions.split(",") if args.precisions else default_precisions(device)
    dev = device.type
    print(json.dumps({"bench": "setup", "device": dev, "threads": torch.get_num_threads(), "precisions": precisions,
                      "torch": torch.__version__}), flush=True)
    runs = {
        "throughput": lambda: throughput_part(args.batch_size, args.steps, args.rounds, precisions,
                                              not args.no_compile, dev),
        "mfu": lambda: mfu_part(args.mfu_batch_size, max(1, args.steps // 2), args.rounds, precisions, dev),
        "data": lambda: data_part(args.batch_size, 2 * args.steps, dev),
        "cache": lambda: cache_part(2, 3000, 64),  # the built-in dataset's size, at 2 ranks
        "engine": lambda: engine_part([int(n) for n in args.engine_ranks.split(",")],
                                      [int(s) for s in args.engine_stages.split(",")], max(1, args.steps // 2),
                                      args.rounds, args.engine_batch_size, precisions[0]),
        "scaling": lambda: scaling_part(max(1, args.steps // 2), args.rounds, args.batch_size, dev),
    }
    tables = []
    for part in parts:
        start = time.perf_counter()
        rows, table = runs[part]()
        for row in rows:
            print(json.dumps(row), flush=True)
        print(json.dumps({"bench": "part_seconds", "part": part, "seconds": round(time.perf_counter() - start, 1)}),
              flush=True)
        tables.append(table)
    print("\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
