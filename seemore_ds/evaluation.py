"""Validation loss and caption exact match, shared by the trainer and the ``eval`` command."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

import torch
from torch.distributed import ReduceOp

from seemore_ds.config import Config
from seemore_ds.errors import UserError
from seemore_ds.data.csv_reader import first_bad_rows, summarize_bad_rows
from seemore_ds.data.dataset import Batch, TokenizedSplit, load_caption_data, load_held_out
from seemore_ds.model import SeemoreVLM
from seemore_ds.tokenizer import IGNORE_INDEX, CharTokenizer

if TYPE_CHECKING:
    from seemore_ds.backends.base import Backend


@torch.no_grad()
def token_loss_sum(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of target tokens) of one batch already on the model's device."""
    _, loss = model(batch.images, batch.input_ids, batch.targets)
    n_tokens = (batch.targets != IGNORE_INDEX).sum()
    return loss.float() * n_tokens, n_tokens


def _summed_loss(batches: Iterable[Batch], eval_loss: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device) -> torch.Tensor:
    """(sum of token losses, number of tokens) over ``batches``, as float64 on ``device``."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        loss_sum, n_tokens = eval_loss(batch)
        total += torch.stack([loss_sum.double(), n_tokens.double()])
    return total


def split_loss(backend: Backend, split: TokenizedSplit, batch_size: int, max_batches: int = 0) -> float:
    """Token-weighted mean loss over (up to ``max_batches`` of) each rank's share, averaged over ranks.
    Every rank calls it, inside ``backend.full_model()``."""
    batches = split.sequential_batches(batch_size, backend.rank, backend.world_size, max_batches)
    total = backend.all_reduce(_summed_loss(batches, backend.eval_loss, backend.device), ReduceOp.SUM)
    return (total[0] / total[1].clamp(min=1)).item()


def model_loss(model: SeemoreVLM, split: TokenizedSplit, batch_size: int) -> float:
    """Token-weighted mean loss of a bare model over the whole split, in this one process (the eval command)."""
    device = next(model.parameters()).device
    model.eval()
    total = _summed_loss(split.sequential_batches(batch_size, 0, 1), lambda b: token_loss_sum(model, b.to(device)), device)
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
    """val_loss, caption_exact_match and n on a CSV (bad rows skipped, counted and listed) or the run's held-out
    split. The skipped rows' reasons go to stderr (stdout may be JSON) and are listed in the result."""
    if csv_path:
        data = load_caption_data(replace(cfg, data=replace(cfg.data, on_bad_row="skip")), csv_path, key="--data")
        source = csv_path
    else:
        data = held_out_data(cfg)
        source = data.source if cfg.data.val_csv else f"held-out split of {data.source}"
    if data.bad_rows:
        print(f"data: {summarize_bad_rows(data.bad_rows)}; first: {first_bad_rows(data.bad_rows)}", file=sys.stderr)
    split = TokenizedSplit(data, tokenizer, model.text_len)
    val_loss = model_loss(model, split, batch_size)
    matches, n = caption_matches(model, split, tokenizer, batch_size=batch_size)
    return {"val_loss": val_loss, "caption_exact_match": matches / n, "n": n,
            "skipped_rows": len(data.bad_rows), "bad_rows": [asdict(b) for b in data.bad_rows], "source": source}
