"""Training samples/s of the default model beside variants of it, the models taking turns.

    python -m bench.step_rate "model.n_layer=4" "model.patch_size=16 model.image_embed_dim=128 model.n_head=8"
        [--caption-len 48] [--steps 8] [--rounds 3]

Each argument is one variant: space-separated ``key=value`` overrides of the defaults, as on the train
command line. The defaults and every variant train engine-free in fp32 on the CPU (a variant may name
another ``train.precision``) on the built-in images at the model's size, captions cut to
``--caption-len`` characters; they take turns in rounds so that machine noise hits all alike. Prints one
JSON line per model with its samples/s and the ratio to the defaults', then a Markdown table.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.throughput import OurLoop, bench_data, rates_table, time_in_turns
from seemore_ds.config import load_config

ENGINE_FREE_FP32 = ["train.backend=torch", "train.device=cpu", "train.precision=fp32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help='e.g. "model.patch_size=16 model.n_head=8"')
    parser.add_argument("--caption-len", type=int, default=48, help="captions cut to this many characters")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    overrides = {"defaults": [], **{variant: variant.split() for variant in args.variants}}
    configs = {name: load_config(None, ENGINE_FREE_FP32 + keys) for name, keys in overrides.items()}
    data_by_size = {size: bench_data(512, img_size=size, caption_len=args.caption_len)
                    for size in {cfg.model.img_size for cfg in configs.values()}}
    loops = {name: OurLoop(cfg, *data_by_size[cfg.model.img_size]) for name, cfg in configs.items()}
    elapsed = time_in_turns(loops, args.steps, args.rounds)
    rates = {name: args.steps * args.rounds * configs[name].train.batch_size / seconds
             for name, seconds in elapsed.items()}
    for name, rate in rates.items():
        print(json.dumps({"bench": "step_rate", "model": name, "caption_len": args.caption_len,
                          "samples_per_s": round(rate, 2), "ratio_vs_defaults": round(rate / rates["defaults"], 3)}))
    print("\n" + rates_table(rates, f"model (captions up to {args.caption_len} characters, "
                                    f"{torch.get_num_threads()} threads)", "defaults", "× defaults"))


if __name__ == "__main__":
    main()
