"""Step time of the DeepSpeed engine per ZeRO stage beside the engine-free backend, at 1 and 2 ranks.

    python -m bench.engine_stages [--ranks 1 2] [--stages 0 1 2 3] [--steps 3] [--rounds 2] [--batch-size 8]

Launches itself under the deepspeed launcher (CPU ranks over gloo, or GPUs). In every rank the
engine and an engine-free backend of the same model train the same per-rank batches, taking turns,
so the ratio engine / engine-free is measured in one run: at 2 ranks it includes the gradient
communication the engine adds. Rank 0 prints one JSON line per stage. ``python -m bench --parts engine``
runs the same. The engine overhead at one rank (target <= 1.10), stage 0 being the built-in config:

    python -m bench.engine_stages --ranks 1 --stages 0 --batch-size 16 --steps 5 --rounds 2 [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import torch

from bench.launch import REPO, launch_module
from bench.throughput import OurLoop, bench_data, seemore_config, time_in_turns


def worker(stages: list[int], steps: int, rounds: int, batch_size: int, precision: str) -> None:
    if not torch.cuda.is_available():  # CPU ranks share the cores: more threads than cores only contend
        ranks_here = int(os.environ.get("LOCAL_SIZE", 1))  # set by the deepspeed launcher
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))
    data, tokenizer = bench_data(max(128, batch_size * 8))
    torch_loop = OurLoop(seemore_config(batch_size, precision, "patches", device="auto"), data, tokenizer)
    for stage in stages:
        cfg = seemore_config(batch_size, precision, "patches", device="auto")
        cfg.train.backend, cfg.train.deepspeed_config = "deepspeed", str(REPO / "ds_configs" / f"zero{stage}.json")
        engine_loop = OurLoop(cfg, data, tokenizer)
        elapsed = time_in_turns({"torch": torch_loop, "deepspeed": engine_loop}, steps, rounds)
        if engine_loop.backend.rank == 0:
            step_s = {name: seconds / (steps * rounds) for name, seconds in elapsed.items()}
            print(json.dumps({"bench": "engine_overhead", "zero_stage": stage, "ranks": engine_loop.backend.world_size,
                              "batch_size_per_rank": batch_size, "precision": precision,
                              "threads_per_rank": torch.get_num_threads(), "torch_step_s": round(step_s["torch"], 4),
                              "deepspeed_step_s": round(step_s["deepspeed"], 4),
                              "ratio_deepspeed_over_torch": round(step_s["deepspeed"] / step_s["torch"], 3)}), flush=True)


def engine_part(ranks: list[int], stages: list[int], steps: int, rounds: int, batch_size: int,
                precision: str) -> tuple[list[dict], str]:
    """Launch the worker once per rank count and collect rank 0's rows."""
    rows = []
    for n in ranks:
        args = ["--worker", "--stages", *map(str, stages), "--steps", str(steps), "--rounds", str(rounds),
                "--batch-size", str(batch_size), "--precision", precision]
        result = launch_module(n, "bench.engine_stages", args, stdout=subprocess.PIPE)
        if result.returncode:
            raise SystemExit(f"bench.engine_stages: the {n}-rank launch failed (exit {result.returncode})")
        rows += [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"bench": "engine_overhead"')]
    table = [f"| ZeRO stage | ranks | engine-free step s | engine step s | engine / engine-free |  (batch {batch_size} per rank, {precision})",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['zero_stage']} | {r['ranks']} | {r['torch_step_s']:.3f} | {r['deepspeed_step_s']:.3f} | "
                     f"{r['ratio_deepspeed_over_torch']:.3f} |")
    return rows, "\n".join(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per backend per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.stages, args.steps, args.rounds, args.batch_size, args.precision)
        return
    rows, table = engine_part(args.ranks, args.stages, args.steps, args.rounds, args.batch_size, args.precision)
    for row in rows:
        print(json.dumps(row))
    print("\n" + table)


if __name__ == "__main__":
    main()
