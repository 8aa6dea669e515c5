"""Step time of the DeepSpeed engine (one rank, ZeRO stage 0) beside the engine-free backend.

    python -m bench.engine_overhead [--steps 5] [--rounds 2] [--batch-size 16] [--precision fp32]

Both backends train the same model at seemore's default sizes (bench.throughput.SEEMORE_SIZES)
from the same initial weights on the same batches. They take turns in rounds so that machine
noise hits both alike. Prints one JSON line per backend and one with the ratio engine / engine-free
(target: <= 1.10). The engine runs as a single process: the backend makes its own one-rank world.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.throughput import OurLoop, bench_data, seemore_config, time_in_turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per backend per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()

    data, tokenizer = bench_data(max(512, args.batch_size * 8))
    loops = {}
    for name in ("torch", "deepspeed"):
        cfg = seemore_config(args.batch_size, args.precision, "patches")
        cfg.train.backend = name
        loops[name] = OurLoop(cfg, data, tokenizer)
    elapsed = time_in_turns(loops, args.steps, args.rounds)

    n_steps = args.steps * args.rounds
    step_s = {name: seconds / n_steps for name, seconds in elapsed.items()}
    common = {"batch_size": args.batch_size, "precision": args.precision, "threads": torch.get_num_threads(),
              "steps": n_steps}
    for name, seconds in step_s.items():
        print(json.dumps({"bench": "step_s", "backend": name, **common, "step_s": round(seconds, 4)}))
    print(json.dumps({"bench": "engine_overhead", **common,
                      "ratio_deepspeed_over_torch": round(step_s["deepspeed"] / step_s["torch"], 3)}))


if __name__ == "__main__":
    main()
