"""What the conv stem's full-resolution convolution costs a training step, at the default sizes.

    python -m bench.stem_cost [--widths 0,8,16,32] [--steps 10] [--rounds 5]

Trains the default model (built-in images, 64 px, captions of up to 48 characters, batch 32, fp32,
engine-free) once per ``model.stem_full_res_width``, and once more at the default width with the stem
fed plain NCHW images instead of channels-last ones; the models take turns in rounds so that machine
noise hits all alike, and each prints one JSON line with its samples/s and their ratio to the stem's
without that convolution (width 0), then a Markdown table for docs/design.md.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.throughput import OurLoop, bench_data, default_config, rates_table, time_in_turns
from seemore_ds.config import Config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="0,8,16,32", help="model.stem_full_res_width values; 0 first: the base")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]

    base_cfg = Config()  # the defaults' sizes and stem width
    data, tokenizer = bench_data(512, img_size=base_cfg.model.img_size, caption_len=base_cfg.model.max_caption_len)
    loops = {str(width): OurLoop(default_config(stem_full_res_width=width), data, tokenizer) for width in widths}
    nchw = OurLoop(default_config(), data, tokenizer)
    stem = nchw.backend.module.vit.patch_embed
    stem.forward = lambda images: stem.layers(images)  # the stem's convolutions on the images as they come, NCHW
    loops[f"{base_cfg.model.stem_full_res_width}, NCHW input"] = nchw
    elapsed = time_in_turns(loops, args.steps, args.rounds)
    samples = args.steps * args.rounds * base_cfg.train.batch_size
    rates = {name: samples / seconds for name, seconds in elapsed.items()}
    base = str(widths[0])
    for name, rate in rates.items():
        print(json.dumps({"bench": "stem_cost", "stem": name, "samples_per_s": round(rate, 2),
                          "ratio_vs_width_" + base: round(rate / rates[base], 3)}))
    print("\n" + rates_table(rates, f"`model.stem_full_res_width` ({torch.get_num_threads()} threads)", base,
                             f"× width {base}"))


if __name__ == "__main__":
    main()
