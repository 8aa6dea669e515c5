"""Validation loss and caption exact match, shared by the trainer and the ``eval`` command."""

from __future__ import annotations

import torch

from seemore_ds.config import Config
from seemore_ds.errors import UserError
from seemore_ds.data.dataset import Batch, TokenizedSplit, load_caption_data, load_held_out
from seemore_ds.model import SeemoreVLM
from seemore_ds.tokenizer import IGNORE_INDEX, CharTokenizer


@torch.no_grad()
def token_loss_sum(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of target tokens) of one batch already on the model's device."""
    _, loss = model(batch.images, batch.input_ids, batch.targets)
    n_tokens = (batch.targets != IGNORE_INDEX).sum()
    return loss.float() * n_tokens, n_tokens


class SingleProcessEvaluator:
    """What ``split_loss`` needs of a backend, for a bare model in one process (the eval command)."""

    rank, world_size = 0, 1

    def __init__(self, model: SeemoreVLM):
        self.module = model
        self.device = next(model.parameters()).device

    def eval_loss(self, batch: Batch):
        self.module.eval()
        return token_loss_sum(self.module, batch.to(self.device))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def split_loss(backend, split: TokenizedSplit, batch_size: int, max_batches: int = 0) -> float:
    """Token-weighted mean loss over (up to ``max_batches`` of) each rank's share, averaged over ranks."""
    total = torch.zeros(2, dtype=torch.float64, device=backend.device)
    for batch in split.sequential_batches(batch_size, backend.rank, backend.world_size, max_batches):
        loss_sum, n_tokens = backend.eval_loss(batch)
        total += torch.stack([loss_sum.double(), n_tokens.double()])
    total = backend.all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def generate_captions(model: SeemoreVLM, images: torch.Tensor, tokenizer: CharTokenizer, batch_size: int = 64,
                      **sampling) -> list[str]:
    """Greedy (or sampled, see ``SeemoreVLM.generate``) captions for uint8 images (N, 3, S, S)."""
    model.eval()
    device = next(model.parameters()).device
    captions = []
    for chunk in images.split(batch_size):
        ids = model.generate(chunk.to(device), tokenizer.bos_id, tokenizer.eos_id, **sampling)
        captions.extend(tokenizer.decode(row) for row in ids)
    return captions


def caption_matches(model: SeemoreVLM, split: TokenizedSplit, tokenizer: CharTokenizer, rank: int = 0,
                    world_size: int = 1, batch_size: int = 64, max_rows: int = 0) -> tuple[int, int]:
    """(rows whose greedy caption equals the reference exactly, rows checked) on this rank's share
    of the first ``max_rows`` rows (0: all)."""
    indices = torch.arange(rank, min(len(split), max_rows or len(split)), world_size)
    predicted = generate_captions(model, split.data.images_at(indices), tokenizer, batch_size)
    references = [split.data.captions[i] for i in indices.tolist()]
    return sum(p == r for p, r in zip(predicted, references)), len(references)


def held_out_data(cfg: Config):
    """The run's own held-out set: data.val_csv, or the split its training split it off."""
    data = load_held_out(cfg)
    if not len(data):
        raise UserError("the run has no held-out split (data.val_fraction=0, no data.val_csv); pass --data FILE.csv")
    return data


def evaluate_checkpoint(model: SeemoreVLM, tokenizer: CharTokenizer, cfg: Config, csv_path: str | None,
                        batch_size: int) -> dict:
    """val_loss, caption_exact_match and n on a CSV (bad rows skipped and counted) or the run's held-out split."""
    if csv_path:
        cfg.data.on_bad_row = "skip"
        data = load_caption_data(cfg, csv_path)
        source = csv_path
    else:
        data = held_out_data(cfg)
        source = data.source if cfg.data.val_csv else f"held-out split of {data.source}"
    split = TokenizedSplit(data, tokenizer, model.text_len)
    val_loss = split_loss(SingleProcessEvaluator(model), split, batch_size)
    matches, n = caption_matches(model, split, tokenizer, batch_size=batch_size)
    return {"val_loss": val_loss, "caption_exact_match": matches / n, "n": n,
            "skipped_rows": len(data.bad_rows), "source": source}
