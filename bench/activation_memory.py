"""Activation memory and step time with and without DeepSpeed's activation checkpointing.

    python -m bench.activation_memory [--repeats 5]

One process, CPU. The activations are what autograd saves for the backward, counted through
saved-tensor hooks (parameters excluded, each storage once); the time is the best of ``--repeats``
forward + backward passes of one micro-batch. Checkpointing wraps every ViT and decoder block in
``deepspeed.checkpointing.checkpoint``, as a JSON's ``activation_checkpointing`` block does in training.
"""

from __future__ import annotations

import argparse
import time

import torch

from seemore_ds.backends.deepspeed_compat import select_accelerator
from seemore_ds.config import ModelConfig
from seemore_ds.data.dataset import Batch
from seemore_ds.model import SeemoreVLM
from seemore_ds.profiling.memory import MIB

VOCAB = 40
TINY = dict(img_size=16, patch_size=8, image_embed_dim=32, num_blks=1, n_embd=32, n_layer=1, n_head=2)
# bench.zero_memory's model (~53M parameters) at a caption length that makes activations count.
MEDIUM = dict(img_size=32, patch_size=8, image_embed_dim=512, num_blks=4, n_embd=512, n_layer=12, n_head=8)


def tiny_model_and_batch(sizes: dict = TINY, batch_size: int = 4, seed: int = 0) -> tuple[SeemoreVLM, Batch]:
    """A model of ``sizes`` in training mode and one random batch for it."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**sizes)
    model = SeemoreVLM(cfg, VOCAB).train()
    shape = (batch_size, model.text_len)
    batch = Batch(torch.randint(0, 256, (batch_size, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8),
                  torch.randint(0, VOCAB, shape), torch.randint(0, VOCAB, shape))
    return model, batch


def saved_activation_bytes(model: torch.nn.Module, batch: Batch) -> tuple[int, list[torch.Tensor]]:
    """(bytes autograd saves in one forward for the backward, the parameters' gradients after it)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes; saved tensors stay alive until the backward, so no address repeats

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and tensor.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(batch.images, batch.input_ids, batch.targets)
    loss.backward()
    return sum(saved.values()), [p.grad.clone() for p in model.parameters()]


def step_s(model: torch.nn.Module, batch: Batch, repeats: int) -> float:
    """Best forward + backward time of one micro-batch over ``repeats``, after a warm-up."""
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(batch.images, batch.input_ids, batch.targets)[1].backward()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    select_accelerator(torch.device("cpu"))
    import deepspeed  # checkpoint() with its module defaults, as an empty block gives: configure() needs a process group

    print(f"| model | params | batch | activations MiB plain | checkpointed | saved | step s plain | checkpointed | cost |  "
          f"({torch.get_num_threads()} threads, fp32)")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, sizes in (("tiny", TINY), ("medium", MEDIUM)):
        model, batch = tiny_model_and_batch(sizes, args.batch_size)
        plain, _ = saved_activation_bytes(model, batch)
        plain_s = step_s(model, batch, args.repeats)
        model.checkpoint_blocks(deepspeed.checkpointing.checkpoint)
        checkpointed, _ = saved_activation_bytes(model, batch)
        checkpointed_s = step_s(model, batch, args.repeats)
        print(f"| {name} | {model.num_params() / 1e6:.2f}M | {args.batch_size} | {plain / MIB:.1f} | {checkpointed / MIB:.1f} | "
              f"{1 - checkpointed / plain:.0%} | {plain_s:.3f} | {checkpointed_s:.3f} | {checkpointed_s / plain_s - 1:+.0%} |")


if __name__ == "__main__":
    main()
