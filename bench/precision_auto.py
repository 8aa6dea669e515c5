"""Does train.precision=auto pick the faster precision? Its pick beside measured fp32 and bf16 samples/s.

    python -m bench.precision_auto [--steps 8] [--rounds 3] [--sizes default,seemore]

For each model size, auto's own short measurement (``seemore_ds.precision.measure_step_s``, run
afresh, the cache neither read nor written) and its pick, then the engine-free backend training in
fp32 and in bf16 autocast for ``steps x rounds`` steps each, taking turns (``bench.throughput``).
The pick is right when it names the precision with the higher samples/s, or fp32 when bf16 is less
than BF16_MIN_SPEEDUP faster. On a GPU the pick is the GPU rule, not a measurement.
One JSON line per size, then a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from bench.throughput import SEEMORE_SIZES, OurLoop, bench_data, seemore_config, time_in_turns
from seemore_ds.config import ModelConfig
from seemore_ds.precision import BF16_MIN_SPEEDUP, cpu_choice, measure_step_s

# name -> (model config values, micro-batch): the defaults, and seemore's own sizes as bench.throughput runs them
SIZES = {
    "default": (dataclasses.asdict(ModelConfig()), 32),
    "seemore": ({**SEEMORE_SIZES, "image_tokens": "cls"}, 16),
}


def bench_size(name: str, steps: int, rounds: int) -> dict:
    """auto's pick and the measured samples/s of fp32 and bf16 at the sizes called ``name``."""
    sizes, batch_size = SIZES[name]
    sizes = dict(sizes)
    image_tokens = sizes.pop("image_tokens")
    data, tokenizer = bench_data(max(256, batch_size * 8), img_size=sizes["img_size"], caption_len=sizes["max_caption_len"])
    loops = {precision: OurLoop(seemore_config(batch_size, precision, image_tokens, **sizes), data, tokenizer)
             for precision in ("fp32", "bf16")}
    times = measure_step_s(loops["fp32"].backend.module, batch_size)
    choice = cpu_choice(times["fp32_step_s"], times["bf16_step_s"])
    elapsed = time_in_turns(loops, steps, rounds)
    rates = {precision: steps * rounds * batch_size / seconds for precision, seconds in elapsed.items()}
    faster = "bf16" if rates["bf16"] >= BF16_MIN_SPEEDUP * rates["fp32"] else "fp32"
    return {"bench": "precision_auto", "sizes": name, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "fp32_samples_per_s": round(rates["fp32"], 1), "bf16_samples_per_s": round(rates["bf16"], 1),
            "bf16_over_fp32": round(rates["bf16"] / rates["fp32"], 3),
            "auto_step_s": {k: round(v, 4) for k, v in times.items()}, "auto_pick": choice.precision,
            "auto_reason": choice.reason, "auto_right": choice.precision == faster}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per precision per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    args = parser.parse_args()
    rows = []
    for name in args.sizes.split(","):
        rows.append(bench_size(name, args.steps, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| sizes (threads {torch.get_num_threads()}) | batch | fp32 samples/s | bf16 samples/s | bf16 / fp32 | auto's pick | right |")
    print("|---|---:|---:|---:|---:|---|---|")
    for row in rows:
        print(f"| {row['sizes']} | {row['batch_size']} | {row['fp32_samples_per_s']} | {row['bf16_samples_per_s']} | "
              f"{row['bf16_over_fp32']:.2f} | {row['auto_pick']} ({row['auto_reason']}) | {'yes' if row['auto_right'] else 'no'} |")


if __name__ == "__main__":
    main()
