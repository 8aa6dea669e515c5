"""Bytes per rank of parameters, gradients and optimizer state under ZeRO 0-3, beside the ZeRO paper.

    python -m bench.zero_memory [--ranks 2]

Launches itself under the deepspeed launcher (CPU ranks). Each rank trains a ~53M-parameter
Seemore in fp32 for one step with ds_configs/zero{0,1,2,3}.json, runs the backward of a second
step and then, before that step's optimizer update, measures the tensors it holds:

- params: the storage behind the model's parameters (under ZeRO-3 the partitions, ``ds_tensor``,
  plus any parameter currently gathered in full);
- grads: ``.grad`` of the parameters and every tensor the ZeRO optimizer keeps under an attribute
  whose name mentions gradients (partitioned gradient buffers, reduce buckets);
- optimizer: the torch optimizer's state (Adam's exp_avg, exp_avg_sq, step);
- other: every further tensor the ZeRO optimizer holds (fp32 master partitions, flat buffers),
  listed by attribute.

Storages are counted once. The paper's fp32 figures (no separate master copy): 4Ψ params, 4Ψ grads,
8Ψ Adam, divided by the rank count for what the stage partitions (1: Adam; 2: + grads; 3: + params).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections import defaultdict

import torch

from bench.launch import REPO, launch_module
from seemore_ds.profiling.memory import MIB

SIZES = dict(img_size=32, patch_size=8, image_embed_dim=512, num_blks=4, n_embd=512, n_layer=12, n_head=8, dropout=0.0)


def paper_bytes(psi: int, stage: int, n: int) -> dict[str, float]:
    """ZeRO paper, fp32 Adam: 4Ψ params + 4Ψ grads + 8Ψ optimizer state, partitioned by stage."""
    return {"params": 4 * psi / (n if stage >= 3 else 1), "grads": 4 * psi / (n if stage >= 2 else 1),
            "optimizer": 8 * psi / (n if stage >= 1 else 1)}


class StorageCounter:
    """Sums tensor bytes per category, each underlying storage once."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = defaultdict(int)

    def add(self, category: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.bytes[category] += storage.nbytes()


def tensors_in(value, depth: int = 0):
    """Tensors inside (nested) lists, tuples and dicts, and their ``.grad``."""
    if isinstance(value, torch.Tensor):
        yield value
        if value.grad is not None:
            yield value.grad
    elif depth < 4 and isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item, depth + 1)


def measure(engine) -> dict:
    count = StorageCounter()
    params = list(engine.module.parameters())
    for p in params:
        count.add("params", getattr(p, "ds_tensor", None))
        count.add("params", p.data)
    zero_optimizer = engine.optimizer
    basic = getattr(zero_optimizer, "optimizer", zero_optimizer)
    for state in basic.state.values():
        for tensor in tensors_in(state):
            count.add("optimizer", tensor)
    for p in params:
        count.add("grads", p.grad)
    if zero_optimizer is not basic:
        for name, value in vars(zero_optimizer).items():  # gradient buffers first, by name
            if "grad" in name.lower() or "ipg" in name.lower():
                for tensor in tensors_in(value):
                    count.add("grads", tensor)
        for name, value in vars(zero_optimizer).items():
            for tensor in tensors_in(value):
                count.add(f"other:{name.split('__')[-1]}", tensor)
    return dict(count.bytes)


def train_and_measure(stage: int, sizes: dict = SIZES, batch_size: int = 2) -> tuple[int, list[dict]]:
    """(parameters, every rank's measured bytes) after one fp32 step and the backward of a second with
    ds_configs/zero{stage}.json; a collective: every rank calls it."""
    from seemore_ds.backends.deepspeed_backend import DeepSpeedBackend
    from seemore_ds.config import Config, validate
    from seemore_ds.data.dataset import Batch
    from seemore_ds.model import SeemoreVLM

    cfg = Config()
    for key, value in sizes.items():
        setattr(cfg.model, key, value)
    cfg.train.batch_size, cfg.train.backend, cfg.train.precision = batch_size, "deepspeed", "fp32"
    cfg.train.deepspeed_config = str(REPO / "ds_configs" / f"zero{stage}.json")
    validate(cfg)
    torch.manual_seed(0)
    model = SeemoreVLM(cfg.model, vocab_size=40)
    psi = model.num_params()
    backend = DeepSpeedBackend(model, cfg)
    text_len, side = model.text_len, cfg.model.img_size
    batch = Batch(torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8),
                  torch.randint(0, 40, (batch_size, text_len)), torch.randint(0, 40, (batch_size, text_len)))
    backend.train_step([batch], timed=False)  # creates the optimizer state
    engine = backend.engine
    engine.train()
    _, loss = engine(batch.images, batch.input_ids, batch.targets)
    engine.backward(loss)
    measured = measure(engine)
    engine.step()
    gathered = [None] * backend.world_size
    torch.distributed.all_gather_object(gathered, measured)
    del backend, engine, model
    gc.collect()
    return psi, gathered


def worker(stages: list[int]) -> None:
    results = [(stage, *train_and_measure(stage)) for stage in stages]
    if torch.distributed.get_rank() == 0:
        report(results, torch.distributed.get_world_size())


def report(results, n: int) -> None:
    table = []
    for stage, psi, per_rank in results:
        paper = paper_bytes(psi, stage, n)
        for rank, measured in enumerate(per_rank):
            other = {k.split(":", 1)[1]: v for k, v in measured.items() if k.startswith("other:")}
            row = {"bench": "zero_memory", "stage": stage, "rank": rank, "ranks": n, "psi": psi}
            for key in ("params", "grads", "optimizer"):
                row[f"{key}_bytes"] = measured.get(key, 0)
                row[f"{key}_paper_bytes"] = int(paper[key])
                row[f"{key}_ratio"] = round(measured.get(key, 0) / paper[key], 3)
            row["other_bytes"] = dict(sorted(other.items(), key=lambda kv: -kv[1]))
            print(json.dumps(row))
            if rank == 0:
                table.append(row)
    print(f"\n| ZeRO stage | params MiB (paper) | grads MiB (paper) | Adam MiB (paper) | other ZeRO buffers MiB |  (rank 0 of {n}, Ψ={results[0][1] / 1e6:.1f}M, fp32)")
    print("|---:|---:|---:|---:|---:|")
    for r in table:
        cells = [f"{r[f'{k}_bytes'] / MIB:.1f} ({r[f'{k}_paper_bytes'] / MIB:.1f})" for k in ("params", "grads", "optimizer")]
        print(f"| {r['stage']} | {' | '.join(cells)} | {sum(r['other_bytes'].values()) / MIB:.1f} |")


def launch(ranks: int, stages: list[int]) -> int:
    return launch_module(ranks, "bench.zero_memory", ["--worker", "--stages", *map(str, stages)]).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.stages)
    else:
        sys.exit(launch(args.ranks, args.stages))


if __name__ == "__main__":
    main()
