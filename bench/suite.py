"""The parts of ``python -m bench``: each measures in one process, in turns, and returns its figures as rows.

A row is a dict printed as one JSON line; ``bench`` names the figure. Every part also returns a
Markdown table for docs/performance.md.
"""

from __future__ import annotations

import contextlib
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.step_profile import KINDS, step_breakdown
from bench.throughput import SEEMORE_SIZES, OurLoop, StraightforwardLoop, bench_data, seemore_config, time_in_turns
from seemore_ds.metrics.csv_log import TIMING_FILE
from seemore_ds.profiling.peak import peak_tflops
from seemore_ds.profiling.throughput import mfu
from seemore_ds.trainer import train

# image_embed_dim = n_embd = 768, 6 + 6 blocks, 12 heads, patch 8 on 96 px images: 89M parameters.
NINETY_M_SIZES = dict(SEEMORE_SIZES, image_embed_dim=768, n_embd=768, num_blks=6, n_layer=6, n_head=12, patch_size=8)


def utilisation(loop: OurLoop, samples_per_s: float, precision: str) -> dict:
    """Model FLOPs per sample, the device's peak for ``precision`` and the MFU it makes."""
    device = loop.backend.device
    peak, source = peak_tflops(device, precision)
    flops = loop.backend.module.flops_per_sample(loop.split.text_len)
    return {"gflop_per_sample": round(flops / 1e9, 3), "peak_tflops": round(peak, 4), "peak_source": source,
            "mfu": round(mfu(samples_per_s, flops, peak), 4)}


def first_step_s(loop) -> float:
    """Seconds of a loop's first step: compilation for a compiled model, allocation otherwise."""
    start = time.perf_counter()
    loop.step()
    return time.perf_counter() - start


def throughput_part(batch_size: int, steps: int, rounds: int, precisions: list[str], compiled: bool,
                    device: str) -> tuple[list[dict], str]:
    """seemore-ds (cls token, as seemore) per precision, eager and compiled, beside the straightforward loop."""
    data, tokenizer = bench_data(max(512, batch_size * 8))
    loops, meta = {"straightforward fp32": StraightforwardLoop(data, tokenizer, batch_size, device)}, {}
    for precision in precisions:
        for compile in (False, True) if compiled else (False,):
            name = f"seemore-ds {precision}{' compiled' if compile else ''}"
            loops[name] = OurLoop(seemore_config(batch_size, precision, "cls", compile, device), data, tokenizer)
            meta[name] = {"precision": precision, "compiled": compile}
    first_s = {name: first_step_s(loop) for name, loop in loops.items()}
    elapsed = time_in_turns(loops, steps, rounds)
    samples = steps * rounds * batch_size
    rates = {name: samples / seconds for name, seconds in elapsed.items()}
    base = rates["straightforward fp32"]
    rows = [{"bench": "train_samples_per_s", "loop": "straightforward fp32", "batch_size": batch_size,
             "samples_per_s": round(base, 2), "ratio_vs_straightforward": 1.0}]
    for name, info in meta.items():
        step_s = batch_size / rates[name]
        rows.append({"bench": "train_samples_per_s", "loop": name, **info, "batch_size": batch_size,
                     "samples_per_s": round(rates[name], 2), "ratio_vs_straightforward": round(rates[name] / base, 3),
                     "first_step_s": round(first_s[name], 2),
                     "compile_s": round(first_s[name] - step_s, 2) if info["compiled"] else None,
                     **utilisation(loops[name], rates[name], info["precision"])})
    table = [f"| loop (seemore sizes, cls token, batch {batch_size}, {torch.get_num_threads()} threads) "
             "| samples/s | × straightforward | MFU | compile s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        compile_s = "" if r.get("compile_s") is None else f"{r['compile_s']:.0f}"
        mfu_cell = f"{100 * r['mfu']:.0f} %" if "mfu" in r else ""
        table.append(f"| {r['loop']} | {r['samples_per_s']:.1f} | {r['ratio_vs_straightforward']:.2f} | {mfu_cell} | {compile_s} |")
    return rows, "\n".join(table)


def mfu_part(batch_size: int, steps: int, rounds: int, precisions: list[str], device: str) -> tuple[list[dict], str]:
    """MFU of the ≈90M-parameter config (the default sizes' MFU is in the throughput part), and where a
    profiled step of each precision spends its time (``bench.step_profile``)."""
    data, tokenizer = bench_data(max(64, batch_size * 4))
    loops = {precision: OurLoop(seemore_config(batch_size, precision, "cls", device=device, **NINETY_M_SIZES), data, tokenizer)
             for precision in precisions}
    elapsed = time_in_turns(loops, steps, rounds)
    rows, table = [], [f"| config (batch {batch_size}) | precision | params | samples/s | GFLOP/sample | peak TFLOP/s | MFU |",
                       "|---|---|---:|---:|---:|---:|---:|"]
    shares = ["| precision | " + " | ".join(KINDS) + " |", "|---|" + "---:|" * len(KINDS)]
    for precision, loop in loops.items():
        rate = steps * rounds * batch_size / elapsed[precision]
        breakdown = step_breakdown(loop.step)
        row = {"bench": "mfu", "config": "90M", "precision": precision, "batch_size": batch_size,
               "params": loop.backend.module.num_params(), "samples_per_s": round(rate, 3), **utilisation(loop, rate, precision),
               "step_time_shares": {kind: round(share, 3) for kind, share in breakdown.items()}}
        rows.append(row)
        table.append(f"| ≈90M (768/768, 6/6 blocks, 12 heads, patch 8) | {precision} | {row['params'] / 1e6:.1f}M | "
                     f"{rate:.2f} | {row['gflop_per_sample']:.1f} | {row['peak_tflops']:.3f} | {100 * row['mfu']:.0f} % |")
        shares.append(f"| {precision} | " + " | ".join(f"{100 * breakdown[kind]:.0f} %" for kind in KINDS) + " |")
    return rows, "\n".join(table) + "\n\nWhere a profiled step's CPU time goes:\n\n" + "\n".join(shares)


def data_part(batch_size: int, steps: int, device: str) -> tuple[list[dict], str]:
    """The trainer's own timing log: images/s the data path delivers, images/s the steps consume, data-wait;
    beside the images/s of the straightforward DataLoader that decodes every image at every step."""
    cfg = seemore_config(batch_size, "fp32", "cls", device=device)
    cfg.data.synth_n, cfg.data.val_fraction = max(256, 4 * batch_size), 0.0
    cfg.train.max_steps, cfg.log.every, cfg.log.progress, cfg.eval.every = steps + 1, 1, False, 0
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run.output_dir = str(Path(tmp) / "run")
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's console lines are not figures
            train(cfg)
        with open(Path(cfg.run.output_dir) / TIMING_FILE, newline="", encoding="utf-8") as handle:
            timings = list(csv.DictReader(handle))[1:]  # the first step also allocates
    data_s = sum(float(t["data_s"]) for t in timings)
    step_s = sum(float(t["step_s"]) for t in timings)
    n_images = len(timings) * batch_size
    data, tokenizer = bench_data(max(256, 4 * batch_size))
    straightforward = StraightforwardLoop(data, tokenizer, batch_size)
    start, n_batches = time.perf_counter(), min(steps, len(straightforward.loader))
    for _ in zip(range(n_batches), straightforward.loader):
        pass
    decode_images_per_s = n_batches * batch_size / (time.perf_counter() - start)
    row = {"bench": "data_path", "batch_size": batch_size, "steps": len(timings),
           "loader_images_per_s": round(n_images / data_s, 1), "step_images_per_s": round(n_images / (step_s - data_s), 2),
           "data_wait_fraction": round(data_s / step_s, 5),
           "straightforward_loader_images_per_s": round(decode_images_per_s, 1)}
    table = "\n".join([
        f"| data path (batch {batch_size}) | images/s |", "|---|---:|",
        f"| seemore-ds loader (decoded once, index batches) | {row['loader_images_per_s']:.0f} |",
        f"| straightforward DataLoader (decode + resize every access) | {row['straightforward_loader_images_per_s']:.0f} |",
        f"| training step consumes | {row['step_images_per_s']:.1f} |",
        f"| data-wait share of step time | {100 * row['data_wait_fraction']:.3f} % |",
    ])
    return [row], table


SCALING = {  # the variable, and its values; everything else stays at seemore's sizes
    "batch_size": (4, 8, 16, 32),
    "max_caption_len": (16, 32, 64),
    "img_size": (48, 96, 192),
}


def scaling_part(steps: int, rounds: int, batch_size: int, device: str) -> tuple[list[dict], str]:
    """Step time against batch size, caption length and image size, beside the model FLOPs of the step."""
    loops, flops = {}, {}
    for variable, values in SCALING.items():
        for value in values:
            batch = value if variable == "batch_size" else batch_size
            sizes = {} if variable == "batch_size" else {variable: value}
            data, tokenizer = bench_data(max(128, 4 * batch), sizes.get("img_size", SEEMORE_SIZES["img_size"]),
                                         sizes.get("max_caption_len", SEEMORE_SIZES["max_caption_len"]))
            loop = OurLoop(seemore_config(batch, "fp32", "cls", device=device, **sizes), data, tokenizer)
            loops[(variable, value)] = loop
            flops[(variable, value)] = batch * loop.backend.module.flops_per_sample(loop.split.text_len)
    elapsed = time_in_turns(loops, steps, rounds)
    rows, table = [], ["| varied | value | step ms | GFLOP/step | ms per GFLOP |", "|---|---:|---:|---:|---:|"]
    for (variable, value), seconds in elapsed.items():
        step_ms = 1000 * seconds / (steps * rounds)
        gflop = flops[(variable, value)] / 1e9
        rows.append({"bench": "step_scaling", "varied": variable, "value": value, "step_ms": round(step_ms, 2),
                     "gflop_per_step": round(gflop, 3), "ms_per_gflop": round(step_ms / gflop, 3)})
        table.append(f"| {variable} | {value} | {step_ms:.1f} | {gflop:.2f} | {step_ms / gflop:.2f} |")
    return rows, "\n".join(table)
