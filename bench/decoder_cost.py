"""What computing the image tokens in every decoder block costs a training step, at the default sizes.

    python -m bench.decoder_cost [--patch-sizes 16,8] [--caption-lens 48,16] [--steps 8] [--rounds 3]

Trains the default model (batch 32, fp32, engine-free) with ``model.decoder_updates_images`` true (every
decoder block computes the image tokens, LLaVA style) and false (the blocks read them as keys and values
only, the default), per patch size (16: 17 image tokens; 8: 65) and per caption length (the built-in
captions cut to that many characters: 48 is the default model's, 16 as long as the glyphs family's). The
models of one caption length take turns in rounds so that machine noise hits all alike; each prints one
JSON line with its samples/s and the ratio of reading to computing, then a Markdown table for docs/design.md.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.throughput import OurLoop, bench_data, default_config, time_in_turns
from seemore_ds.config import Config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch-sizes", default="16,8")
    parser.add_argument("--caption-lens", default="48,16")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    patch_sizes = [int(p) for p in args.patch_sizes.split(",")]
    batch_size = Config().train.batch_size

    lines = [f"| patch, captions ({torch.get_num_threads()} threads) | computed: samples/s | read: samples/s | "
             "read / computed |", "|---|---:|---:|---:|"]
    for caption_len in (int(n) for n in args.caption_lens.split(",")):
        data, tokenizer = bench_data(512, img_size=Config().model.img_size, caption_len=caption_len)
        loops = {(patch, updates): OurLoop(default_config(patch_size=patch, decoder_updates_images=updates),
                                           data, tokenizer)
                 for patch in patch_sizes for updates in (True, False)}
        elapsed = time_in_turns(loops, args.steps, args.rounds)
        rate = {key: args.steps * args.rounds * batch_size / seconds for key, seconds in elapsed.items()}
        for patch in patch_sizes:
            computed, read = rate[patch, True], rate[patch, False]
            print(json.dumps({"bench": "decoder_cost", "patch_size": patch, "caption_len": caption_len,
                              "computed_samples_per_s": round(computed, 2), "read_samples_per_s": round(read, 2),
                              "ratio": round(read / computed, 3)}))
            lines.append(f"| {patch}, up to {caption_len} characters | {computed:.1f} | {read:.1f} | "
                         f"{read / computed:.2f} |")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
