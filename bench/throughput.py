"""Training samples/s of seemore-ds beside the straightforward loop, at seemore's default sizes.

    python -m bench.throughput [--steps 12] [--rounds 3] [--batch-size 16]

Both loops train the same sizes (img_size 96, patch_size 16, image_embed_dim 512, num_blks 3,
n_embd 128, n_layer 8, n_head 8, captions of at most 32 characters) on the same images. The
loops take turns in rounds so that machine noise hits both alike; each prints one JSON line and
the ratios come from the same run. Ends with a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image

from bench.straightforward import Base64CaptionDataset, StraightforwardVLM
from seemore_ds.backends import build_backend
from seemore_ds.config import Config, ModelConfig, validate
from seemore_ds.data.csv_reader import encode_png_base64
from seemore_ds.data.dataset import CaptionData, ResumableSampler, TokenizedSplit
from seemore_ds.data.images import to_rgb_array
from seemore_ds.data.synthetic import synthetic_dataset
from seemore_ds.model import SeemoreVLM
from seemore_ds.profiling.peak import peak_tflops
from seemore_ds.tokenizer import CharTokenizer

# seemore's own model: its sizes, its single patch_size convolution and a decoder that computes the image token
# as it does the text (what the straightforward loop runs).
SEEMORE_SIZES = dict(img_size=96, patch_size=16, image_embed_dim=512, num_blks=3, n_embd=128, n_layer=8, n_head=8,
                     dropout=0.1, max_caption_len=32, patch_embed="patch",
                     patch_norm=False, decoder_updates_images=True)

# What the default model does otherwise, at the same sizes: its stem, LayerNormed patches, decoder and dropout.
DEFAULT_STRUCTURE = {key: getattr(ModelConfig(), key)
                     for key in ("patch_embed", "patch_norm", "decoder_updates_images", "dropout")}


def default_precisions(device: torch.device) -> list[str]:
    """fp32, and the reduced precisions the device multiplies faster than fp32 (a CPU without bf16
    instructions emulates bf16 matmuls, two orders of magnitude slower: not worth a benchmark's time)."""
    if device.type == "cuda":
        return ["fp32", "bf16", "fp16"]
    fp32_peak, _ = peak_tflops(device, "fp32")
    bf16_peak, _ = peak_tflops(device, "bf16")
    return ["fp32", "bf16"] if bf16_peak >= fp32_peak else ["fp32"]


def seemore_config(batch_size: int, precision: str, image_tokens: str, compile: bool = False, device: str = "cpu",
                   **sizes) -> Config:
    """seemore's sizes (``sizes`` override some) on the engine-free backend."""
    return default_config(dict(batch_size=batch_size, precision=precision, compile=compile, device=device),
                          **{**SEEMORE_SIZES, **sizes, "image_tokens": image_tokens})


def default_config(train: dict | None = None, **model) -> Config:
    """The defaults on the engine-free backend, in fp32 on the CPU, with ``model`` and ``train`` keys changed."""
    cfg = Config()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    for key, value in {"backend": "torch", "device": "cpu", "precision": "fp32", **(train or {})}.items():
        setattr(cfg.train, key, value)
    validate(cfg)
    return cfg


class OurLoop:
    """seemore-ds as the trainer runs it: decoded-once uint8 images, index batches, the configured backend."""

    def __init__(self, cfg: Config, data: CaptionData, tokenizer: CharTokenizer):
        torch.manual_seed(0)
        self.backend = build_backend(SeemoreVLM(cfg.model, tokenizer.vocab_size), cfg)
        self.split = TokenizedSplit(data, tokenizer, self.backend.module.text_len)
        self.sampler = ResumableSampler(len(data), cfg.train.batch_size, seed=0)

    def step(self) -> float:
        stats = self.backend.train_step([self.split.batch(self.sampler.next_indices())], timed=False)
        return stats.loss.item()


class StraightforwardLoop:
    """The notebook's loop: per-head attention modules, base64 decoded in every __getitem__."""

    def __init__(self, data: CaptionData, tokenizer: CharTokenizer, batch_size: int, device: str = "cpu"):
        torch.manual_seed(0)
        split = TokenizedSplit(data, tokenizer, SEEMORE_SIZES["max_caption_len"] + 1)
        pngs = [encode_png_base64(_to_pil(img)) for img in data.images]
        dataset = Base64CaptionDataset(pngs, split.input_ids.long(), split.targets.long(), SEEMORE_SIZES["img_size"])
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
        self.batches = iter(self.loader)
        sizes = {k: v for k, v in SEEMORE_SIZES.items()
                 if k not in ("max_caption_len", "patch_embed", "patch_norm", "decoder_updates_images")}
        self.device = torch.device(device)
        self.model = StraightforwardVLM(**sizes, vocab_size=tokenizer.vocab_size, block_size=split.input_ids.shape[1]).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    def step(self) -> float:
        try:
            images, input_ids, targets = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            images, input_ids, targets = next(self.batches)
        images, input_ids, targets = (t.to(self.device) for t in (images, input_ids, targets))
        self.model.train()
        loss = self.model(images, input_ids, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def _to_pil(chw_uint8: torch.Tensor) -> Image.Image:
    return Image.fromarray(chw_uint8.permute(1, 2, 0).numpy())


def time_in_turns(loops: dict, steps: int, rounds: int) -> dict[str, float]:
    """Seconds each loop spent on ``steps x rounds`` steps, the loops taking turns after a warm-up,
    so that machine noise hits all of them alike."""
    elapsed = dict.fromkeys(loops, 0.0)
    for loop in loops.values():  # warm-up: allocator, kernels, first-batch costs
        for _ in range(2):
            loop.step()
    for _ in range(rounds):
        for name, loop in loops.items():
            start = time.perf_counter()
            for _ in range(steps):
                loop.step()
            elapsed[name] += time.perf_counter() - start
    return elapsed


def bench_data(n: int, img_size: int = SEEMORE_SIZES["img_size"],
               caption_len: int = SEEMORE_SIZES["max_caption_len"]) -> tuple[CaptionData, CharTokenizer]:
    """The built-in images at ``img_size`` with captions cut to ``caption_len`` characters."""
    pil_images, captions = synthetic_dataset(n, seed=0, size_px=img_size)
    captions = [c[:caption_len].strip() for c in captions]
    images = torch.stack([torch.from_numpy(to_rgb_array(img, img_size)) for img in pil_images])
    return CaptionData(images, captions, "bench"), CharTokenizer.from_captions(captions)


def rates_table(rates: dict[str, float], first_column: str, base: str, ratio_column: str) -> str:
    """Markdown: each loop's samples/s and its ratio to the samples/s of loop ``base``."""
    lines = [f"| {first_column} | samples/s | {ratio_column} |", "|---|---:|---:|"]
    lines += [f"| {name} | {rate:.1f} | {rate / rates[base]:.2f} |" for name, rate in rates.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per loop per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    data, tokenizer = bench_data(max(512, args.batch_size * 8))
    loops = {
        "straightforward fp32": StraightforwardLoop(data, tokenizer, args.batch_size),
        **{f"seemore-ds {precision} (cls token)": OurLoop(seemore_config(args.batch_size, precision, "cls"), data, tokenizer)
           for precision in default_precisions(torch.device("cpu"))},
        "seemore-ds fp32 (patch tokens)": OurLoop(seemore_config(args.batch_size, "fp32", "patches"), data, tokenizer),
        # The default model (its stem, LayerNormed patches, decoder and dropout) at seemore's widths.
        "seemore-ds fp32 (default model, patch tokens)": OurLoop(
            seemore_config(args.batch_size, "fp32", "patches", **DEFAULT_STRUCTURE), data, tokenizer),
        "seemore-ds fp32 (default model, pooled tokens)": OurLoop(
            seemore_config(args.batch_size, "fp32", "pooled", **DEFAULT_STRUCTURE), data, tokenizer),
        # The default stem's stride-2 convolutions stop widening at 128 channels; here they widen to the ViT's 512.
        "seemore-ds fp32 (default model, patch tokens, stem widening to 512)": OurLoop(
            seemore_config(args.batch_size, "fp32", "patches", **DEFAULT_STRUCTURE, stem_max_width=0), data, tokenizer),
    }
    elapsed = time_in_turns(loops, args.steps, args.rounds)
    samples = args.steps * args.rounds * args.batch_size
    rates = {name: samples / seconds for name, seconds in elapsed.items()}
    base = rates["straightforward fp32"]
    for name, rate in rates.items():
        print(json.dumps({"bench": "train_samples_per_s", "loop": name, "batch_size": args.batch_size,
                          "samples_per_s": round(rate, 2), "ratio_vs_straightforward": round(rate / base, 3)}))
    print("\n" + rates_table(rates, f"loop (batch {args.batch_size}, {torch.get_num_threads()} threads)",
                             "straightforward fp32", "× straightforward"))


if __name__ == "__main__":
    main()
