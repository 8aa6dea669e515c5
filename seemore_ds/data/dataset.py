"""Decoded dataset, deterministic split, tokenised tensors, a resumable sharded sampler and batches.

Images are decoded once into one uint8 tensor (with the image cache, one memory-mapped file per
node); captions are tokenised once into two int64 tensors. A split is a list of rows of that
tensor, never a copy of them, and a batch is three index operations, so the data path costs next
to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seemore_ds.config import Config
from seemore_ds.data.csv_reader import BadRow, Decoded, read_caption_csv
from seemore_ds.data.image_cache import cache_key, load_or_decode
from seemore_ds.data.images import to_rgb_array
from seemore_ds.data.synthetic import synthetic_dataset
from seemore_ds.errors import UserError
from seemore_ds.model import IGNORE_INDEX
from seemore_ds.tokenizer import CharTokenizer


@dataclass
class CaptionData:
    images: torch.Tensor  # uint8 (M, 3, S, S), possibly shared with other splits and, mapped, with other processes
    captions: list[str]
    source: str  # the CSV path, or "built-in synthetic (N)"
    bad_rows: list[BadRow] = field(default_factory=list)
    rows: torch.Tensor | None = None  # this data's rows of ``images``, in order; None: all of them
    decoded: bool = True  # False: this process mapped images another process decoded into the cache
    cache_file: Path | None = None  # the image cache's file ``images`` is mapped from

    def __len__(self) -> int:
        return len(self.captions)

    def images_at(self, indices: torch.Tensor) -> torch.Tensor:
        """The images of this data's rows ``indices``, as a new tensor."""
        return self.images[indices if self.rows is None else self.rows[indices]]

    def subset(self, indices: torch.Tensor) -> "CaptionData":
        """Rows ``indices`` of this data, sharing its images: a split of a mapped cache stays mapped."""
        rows = indices if self.rows is None else self.rows[indices]
        return CaptionData(self.images, [self.captions[i] for i in indices.tolist()], self.source, rows=rows)


def load_caption_data(cfg: Config, csv_path: str | None = None, cache_dir: Path | None = None) -> CaptionData:
    """The configured CSV (or ``csv_path``), else the built-in synthetic dataset; decoded once, and with
    ``cache_dir`` once per node: the first process writes the decoded images there, the others map them."""
    path = cfg.data.csv if csv_path is None else csv_path
    source = path or f"built-in synthetic ({cfg.data.synth_n} images)"
    if cache_dir is None:
        images, captions, bad = decode_caption_data(cfg, path)
        return CaptionData(torch.from_numpy(images), captions, source, bad)
    key = cache_key(cfg, path)
    images, captions, bad, decoded = load_or_decode(cache_dir, key, lambda: decode_caption_data(cfg, path))
    return CaptionData(images, captions, source, bad, decoded=decoded, cache_file=cache_dir / f"{key}.u8")


def decode_caption_data(cfg: Config, csv_path: str) -> Decoded:
    """(uint8 images (N, 3, S, S), captions, skipped rows) of the CSV; empty ``csv_path``: the built-in dataset."""
    if csv_path:
        return read_caption_csv(csv_path, cfg.model.img_size, cfg.model.max_caption_len, cfg.data.max_image_pixels,
                                cfg.data.on_bad_row)
    pil_images, captions = synthetic_dataset(cfg.data.synth_n, seed=cfg.train.seed, size_px=cfg.model.img_size)
    return np.stack([to_rgb_array(img, cfg.model.img_size) for img in pil_images]), captions, []


def split_train_val(data: CaptionData, val_fraction: float, seed: int) -> tuple[CaptionData, CaptionData]:
    """Deterministic from the seed; at least one training row, and one validation row when asked for."""
    n = len(data)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_val:]), data.subset(order[:n_val])


def tokenize_captions(captions: list[str], tokenizer: CharTokenizer, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids ``<bos> c1 .. cn <pad>..`` and targets ``c1 .. cn <eos> -100..``, each (N, text_len)."""
    input_ids = torch.full((len(captions), text_len), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(captions), text_len), IGNORE_INDEX, dtype=torch.long)
    for row, caption in enumerate(captions):
        ids = tokenizer.encode(caption)[: text_len - 1]
        input_ids[row, : len(ids) + 1] = torch.tensor([tokenizer.bos_id, *ids])
        targets[row, : len(ids) + 1] = torch.tensor([*ids, tokenizer.eos_id])
    return input_ids, targets


@dataclass
class Batch:
    images: torch.Tensor
    input_ids: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        non_blocking = device.type == "cuda"
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.images, self.input_ids, self.targets)))


class TokenizedSplit:
    """One split ready for batching: uint8 images plus token tensors, indexed together."""

    def __init__(self, data: CaptionData, tokenizer: CharTokenizer, text_len: int):
        self.data = data
        self.input_ids, self.targets = tokenize_captions(data.captions, tokenizer, text_len)

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: torch.Tensor) -> Batch:
        return Batch(self.data.images_at(indices), self.input_ids[indices], self.targets[indices])

    def sequential_batches(self, batch_size: int, rank: int = 0, world_size: int = 1, max_batches: int = 0):
        """This rank's share of the split in order, for evaluation (the last batch may be short)."""
        indices = torch.arange(rank, len(self), world_size)
        chunks = indices.split(batch_size)
        for chunk in chunks[:max_batches] if max_batches else chunks:
            yield self.batch(chunk)


class ResumableSampler:
    """Per-epoch shuffled, rank-sharded batches of indices whose position survives a restart on any rank count.

    Every rank draws the same permutation (seed + epoch), the epoch's global order. Each step takes the
    next ``batch_size x world_size`` samples of it, rank r the r-th ``batch_size`` of them, so the
    shards are disjoint; a tail too short for a whole step is dropped. The position is the number of
    samples of the global order already drawn, which means the same at every rank count: a run resumed
    on another one continues the epoch without repeating or skipping a sample.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.samples_per_step = batch_size * world_size
        self.batches_per_epoch = n // self.samples_per_step
        if self.batches_per_epoch == 0:
            raise UserError(
                f"the training split has {n} rows, fewer than train.batch_size={batch_size} x {world_size} rank(s); "
                f"lower train.batch_size or add data"
            )
        self.epoch, self.position = 0, 0  # position: samples of this epoch's global order drawn by all ranks
        self._order = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            self._order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return self._order

    def next_indices(self) -> torch.Tensor:
        if self.position + self.samples_per_step > self.n:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        start = self.position + self.rank * self.batch_size
        self.position += self.samples_per_step
        return self._epoch_order()[start : start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_seen_in_epoch": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = state["epoch"], state["samples_seen_in_epoch"], None
