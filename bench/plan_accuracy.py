"""How close ``python -m seemore_ds plan`` comes to what DeepSpeed really holds per rank.

    python -m bench.plan_accuracy [--ranks 2] [--sizes small medium]

Launches itself under the deepspeed launcher (CPU ranks, fp32). For each model size and ZeRO stage
0-3 every rank trains one step and runs the backward of a second with ds_configs/zero{N}.json, and
the tensors it then holds are measured as bench.zero_memory measures them (params, grads, Adam
state, other ZeRO buffers); the activations of the micro-batch are measured through saved-tensor
hooks. Beside each figure: the plan's prediction for the same model, stage, micro-batch and ranks.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.activation_memory import saved_activation_bytes, tiny_model_and_batch
from bench.launch import launch_module
from bench.zero_memory import SIZES, train_and_measure
from seemore_ds.config import ModelConfig
from seemore_ds.plan import Choice, activation_bytes, estimate
from seemore_ds.profiling.memory import MIB

MODEL_SIZES = {
    "small": dict(img_size=32, patch_size=8, image_embed_dim=128, num_blks=2, n_embd=128, n_layer=4, n_head=4, dropout=0.0),
    "medium": SIZES,  # bench.zero_memory's ~53M
}
MICRO_BATCH = 2
VOCAB = 40  # as bench.zero_memory builds its model


def compare(name: str, stage: int, psi: int, measured: dict, measured_activations: int, ranks: int) -> dict:
    """One row: measured and predicted bytes of one rank, by category, and their ratio."""
    sizes = MODEL_SIZES[name]
    per_sample = activation_bytes(ModelConfig(**sizes), VOCAB, 1, "fp32")
    e = estimate(psi, per_sample, Choice(stage), MICRO_BATCH, ranks, "fp32", sizes["n_embd"])
    got = {"params": measured.get("params", 0), "grads": measured.get("grads", 0), "optimizer": measured.get("optimizer", 0),
           "other": sum(v for k, v in measured.items() if k.startswith("other:")), "activations": measured_activations}
    predicted = {"params": e.params, "grads": e.grads, "optimizer": e.optimizer, "other": e.master + e.buffers,
                 "activations": e.activations}
    got["total"], predicted["total"] = sum(got.values()), sum(predicted.values())
    return {"bench": "plan_accuracy", "model": name, "psi": psi, "stage": stage, "ranks": ranks,
            **{f"{k}_bytes": got[k] for k in got}, **{f"{k}_predicted_bytes": int(predicted[k]) for k in predicted},
            "total_error": round(predicted["total"] / got["total"] - 1, 4)}


def worker(names: list[str]) -> None:
    rows = []
    for name in names:
        model, batch = tiny_model_and_batch({k: v for k, v in MODEL_SIZES[name].items() if k != "dropout"}, MICRO_BATCH)
        activations, _ = saved_activation_bytes(model, batch)  # the bare model: ZeRO does not change what autograd saves
        del model
        for stage in (0, 1, 2, 3):
            psi, per_rank = train_and_measure(stage, MODEL_SIZES[name], MICRO_BATCH)
            rows.append(compare(name, stage, psi, per_rank[0], activations, len(per_rank)))
    if torch.distributed.get_rank() == 0:
        report(rows)


def report(rows: list[dict]) -> None:
    for row in rows:
        print(json.dumps(row))
    print(f"\n| model | Ψ | ZeRO | params MiB | grads | Adam | other ZeRO | activations | total | plan error |  "
          f"(rank 0 of {rows[0]['ranks']}, fp32, micro-batch {MICRO_BATCH}; each cell: measured / predicted)")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[f'{k}_bytes'] / MIB:.1f} / {r[f'{k}_predicted_bytes'] / MIB:.1f}"
                 for k in ("params", "grads", "optimizer", "other", "activations", "total")]
        print(f"| {r['model']} | {r['psi'] / 1e6:.1f}M | {r['stage']} | {' | '.join(cells)} | {100 * r['total_error']:+.1f} % |")
    worst = max(rows, key=lambda r: abs(r["total_error"]))
    print(f"\nworst total: {100 * worst['total_error']:+.1f} % ({worst['model']}, ZeRO-{worst['stage']}); goal: within 10 %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", choices=sorted(MODEL_SIZES), default=list(MODEL_SIZES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.sizes)
    else:
        sys.exit(launch_module(args.ranks, "bench.plan_accuracy", ["--worker", "--sizes", *args.sizes]).returncode)


if __name__ == "__main__":
    main()
