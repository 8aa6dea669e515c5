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
import time

import torch

from bench.throughput import bench_data, seemore_config
from seemore_ds.data.dataset import ResumableSampler, TokenizedSplit
from seemore_ds.model import SeemoreVLM


class BackendLoop:
    """One backend stepping through its own (identically seeded) sampler."""

    def __init__(self, backend_name: str, precision: str, batch_size: int, data, tokenizer):
        from seemore_ds.backends import build_backend

        cfg = seemore_config(batch_size, precision, "patches")
        cfg.train.backend = backend_name
        torch.manual_seed(0)
        self.backend = build_backend(SeemoreVLM(cfg.model, tokenizer.vocab_size), cfg)
        self.split = TokenizedSplit(data, tokenizer, self.backend.module.text_len)
        self.sampler = ResumableSampler(len(data), batch_size, seed=0)

    def step(self) -> float:
        stats = self.backend.train_step([self.split.batch(self.sampler.next_indices())], timed=False)
        return stats.loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per backend per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()

    data, tokenizer = bench_data(max(512, args.batch_size * 8))
    loops = {name: BackendLoop(name, args.precision, args.batch_size, data, tokenizer) for name in ("torch", "deepspeed")}
    elapsed = dict.fromkeys(loops, 0.0)
    for loop in loops.values():  # warm-up: allocator, kernels, first-batch costs
        for _ in range(2):
            loop.step()
    for _ in range(args.rounds):
        for name, loop in loops.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                loop.step()
            elapsed[name] += time.perf_counter() - start

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
