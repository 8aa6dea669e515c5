"""Decoded dataset, deterministic split, tokenised tensors, a resumable sharded sampler and batches.

Images are decoded once into one uint8 tensor (with the image cache, one memory-mapped file per
node); captions are tokenised once into two int64 tensors. A split is a list of rows of that
tensor, never a copy of them, and a batch is three index operations, so the data path costs next
to nothing.
"""

from __future__ import annotations

import copy
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seemore_ds.config import Config
from seemore_ds.data.augment import ImageShifts
from seemore_ds.data.csv_reader import check_usable
from seemore_ds.data.decoding import BadRow, DecodeResult, DecodeSettings, decode_synthetic, decode_tables, default_workers
from seemore_ds.data.image_cache import cache_key, load_or_decode, map_images
from seemore_ds.data.tables import table_files
from seemore_ds.errors import UserError
from seemore_ds.tokenizer import IGNORE_INDEX, CharTokenizer


@dataclass
class CaptionData:
    images: torch.Tensor  # uint8 (M, 3, S, S), possibly shared with other splits and, mapped, with other processes
    captions: list[str]
    source: str  # data.csv as given, or "built-in synthetic (N)"
    bad_rows: list[BadRow] = field(default_factory=list)
    rows: torch.Tensor | None = None  # this data's rows of ``images``, in order; None: all of them
    decoded: bool = True  # False: this process mapped images another process decoded into the cache
    cache_file: Path | None = None  # the image cache's file ``images`` is mapped from
    decode: DecodeResult | None = None  # the decode's figures, when this process decoded

    def __len__(self) -> int:
        return len(self.captions)

    def images_at(self, indices: torch.Tensor) -> torch.Tensor:
        """The images of this data's rows ``indices``, as a new tensor."""
        return self.images[indices if self.rows is None else self.rows[indices]]

    def subset(self, indices: torch.Tensor) -> "CaptionData":
        """Rows ``indices`` of this data, sharing its images: a split of a mapped cache stays mapped."""
        rows = indices if self.rows is None else self.rows[indices]
        return CaptionData(self.images, [self.captions[i] for i in indices.tolist()], self.source, rows=rows)


def load_caption_data(cfg: Config, csv_path: str | None = None, cache_dir: Path | None = None,
                      key: str = "data.csv") -> CaptionData:
    """The configured tables (or ``csv_path``, given as ``key``: see ``tables.table_files``), else the built-in
    synthetic dataset; decoded once, and with ``cache_dir`` once per node: the first process writes the decoded
    images there, the others map them. Without it the images go to a temporary file that is mapped,
    then deleted: still paged by the OS, never held in this process's own memory."""
    spec = cfg.data.csv if csv_path is None else csv_path
    if spec:  # a missing table is refused here, named as the user gave it (the cache key and decode look again)
        table_files(spec, key)
    source = spec or synthetic_source(cfg)
    shape = (3, cfg.model.img_size, cfg.model.img_size)
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="seemore-ds-decode-") as folder:
            image_file = Path(folder) / "images.u8"
            # every rank of the node decodes at once: the cores are shared out between them
            ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            result = decode_caption_data(cfg, spec, image_file, _shows_progress(cfg), ranks_here)
            images = map_images(image_file, (result.n_images, *shape))  # the mapping outlives the file's name
        return CaptionData(images, result.captions, source, result.bad_rows, decode=result)
    key = cache_key(cfg, spec)
    images, captions, bad, result = load_or_decode(
        cache_dir, key, shape, lambda image_file: decode_caption_data(cfg, spec, image_file, cfg.log.progress))
    return CaptionData(images, captions, source, bad, decoded=result is not None, cache_file=cache_dir / f"{key}.u8",
                       decode=result)


def decode_caption_data(cfg: Config, spec: str, image_file: Path, progress: bool = False,
                        ranks_decoding: int = 1) -> DecodeResult:
    """Decode the tables ``spec`` names (empty: the built-in dataset) into ``image_file``, uint8
    (N, 3, S, S), on ``data.decode_workers`` processes (0: this process's cores, shared out between
    ``ranks_decoding`` processes of the node doing the same); a progress bar when ``progress``."""
    settings = DecodeSettings(cfg.model.img_size, cfg.model.max_caption_len, cfg.data.max_image_pixels)
    if spec:
        result = decode_tables(table_files(spec), settings, image_file, cfg.data.on_bad_row,
                               cfg.data.decode_workers or max(1, default_workers() // ranks_decoding), progress=progress)
    else:
        result = decode_synthetic(cfg.data.synth_n, cfg.train.seed, settings, image_file, cfg.data.on_bad_row,
                                  synthetic_source(cfg))
    check_usable(spec or synthetic_source(cfg), result)
    return result


def synthetic_source(cfg: Config) -> str:
    """How the built-in dataset is named where a table's file name would be."""
    return f"built-in synthetic ({cfg.data.synth_n} images)"


def _shows_progress(cfg: Config) -> bool:
    """Without the cache every rank decodes: only the first (or a lone process) shows its progress."""
    return cfg.log.progress and os.environ.get("RANK", "0") == "0"


def load_train_val(cfg: Config, cache_dir: Path | None = None) -> tuple[CaptionData, CaptionData, CaptionData]:
    """(the training data, its training rows, the held-out rows): ``data.val_csv`` when set (all of the
    training data then trains), else a split of the training data by ``data.val_fraction``."""
    data = load_caption_data(cfg, cache_dir=cache_dir)
    if cfg.data.val_csv:
        return data, data, load_caption_data(cfg, cfg.data.val_csv, cache_dir=cache_dir, key="data.val_csv")
    return data, *split_train_val(data, cfg.data.val_fraction, cfg.train.seed)


def load_held_out(cfg: Config) -> CaptionData:
    """The held-out rows alone: ``data.val_csv``, else the split of the training data."""
    if cfg.data.val_csv:
        return load_caption_data(cfg, cfg.data.val_csv, key="data.val_csv")
    return split_train_val(load_caption_data(cfg), cfg.data.val_fraction, cfg.train.seed)[1]


def split_train_val(data: CaptionData, val_fraction: float, seed: int) -> tuple[CaptionData, CaptionData]:
    """Deterministic from the seed; at least one training row, and one validation row when asked for."""
    n = len(data)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_val:]), data.subset(order[:n_val])


TOKENIZE_BLOCK = 65536  # captions tokenised at a time: bounds the temporary index arrays


def tokenize_captions(captions: list[str], tokenizer: CharTokenizer, text_len: int,
                      dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids ``<bos> c1 .. cn <pad>..`` and targets ``c1 .. cn <eos> -100..``, each (N, text_len),
    captions cut to text_len - 1 characters. Vectorised (a lookup table over code points), so that a
    million captions take seconds, not minutes."""
    n = len(captions)
    input_ids = np.full((n, text_len), tokenizer.pad_id, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    targets = np.full_like(input_ids, IGNORE_INDEX)
    input_ids[:, 0] = tokenizer.bos_id
    table = np.full(0x110000, tokenizer.unk_id, dtype=input_ids.dtype)  # every code point; unknown ones are <unk>
    for char, token in tokenizer.stoi.items():
        if len(char) == 1:  # the specials are not characters
            table[ord(char)] = token
    for start in range(0, n, TOKENIZE_BLOCK):
        kept = [c[: text_len - 1] for c in captions[start : start + TOKENIZE_BLOCK]]
        lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
        tokens = table[np.frombuffer("".join(kept).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)]
        rows = np.repeat(np.arange(start, start + len(kept)), lengths)
        cols = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        input_ids[rows, cols + 1] = tokens
        targets[rows, cols] = tokens
        targets[np.arange(start, start + len(kept)), lengths] = tokenizer.eos_id
    return torch.from_numpy(input_ids), torch.from_numpy(targets)


@dataclass
class Batch:
    images: torch.Tensor
    input_ids: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        non_blocking = device.type == "cuda"
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.images, self.input_ids, self.targets)))


class TokenizedSplit:
    """One split ready for batching: uint8 images plus token tensors, indexed together. The tokens are
    held in 16 bits where the vocabulary allows (a million captions: 200 MB, not 800) and widened per batch.

    The text is as long as the split's longest caption needs (``text_len``), at most ``max_text_len``
    (the model's): the decoder then spends nothing on padding that no caption reaches, e.g. a dataset
    of 16-character captions trains about 1.8 times as fast as at the 49 positions the default model
    allows. Causal attention makes the trimmed positions invisible to the others, so the loss is the
    same either way."""

    def __init__(self, data: CaptionData, tokenizer: CharTokenizer, max_text_len: int):
        self.data = data
        self.text_len = min(max_text_len, max(map(len, data.captions), default=0) + 1)  # + <bos> / <eos>
        dtype = torch.int16 if tokenizer.vocab_size <= torch.iinfo(torch.int16).max else torch.int32
        self.input_ids, self.targets = tokenize_captions(data.captions, tokenizer, self.text_len, dtype)

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: torch.Tensor) -> Batch:
        return Batch(self.data.images_at(indices), self.input_ids[indices].long(), self.targets[indices].long())

    def sequential_batches(self, batch_size: int, rank: int = 0, world_size: int = 1, max_batches: int = 0):
        """This rank's share of the split in order, for evaluation (the last batch may be short)."""
        indices = torch.arange(rank, len(self), world_size)
        chunks = indices.split(batch_size)
        for chunk in chunks[:max_batches] if max_batches else chunks:
            yield self.batch(chunk)


class BatchPrefetcher:
    """Each step's micro-batches, the next step's gathered by a background thread meanwhile.

    A batch of a mapped cache larger than the page cache is a few dozen reads from disk; gathered
    while the step before trains, they cost the step nothing. The sampler advances exactly as without
    prefetching (its state, saved in checkpoints, stays that of the batches handed out); a copy of it
    runs one step ahead to know which rows come next, and if the two ever disagree the batch is simply
    gathered on the spot.
    """

    def __init__(self, split: TokenizedSplit, sampler: "ResumableSampler", micro_batches: int,
                 shifts: ImageShifts | None = None):
        self.split, self.sampler, self.micro_batches, self.shifts = split, sampler, micro_batches, shifts
        self._ahead = copy.deepcopy(sampler)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="seemore-ds-prefetch")
        self._next = self._prefetch()

    @staticmethod
    def _draw(sampler: "ResumableSampler") -> tuple[torch.Tensor, int]:
        indices = sampler.next_indices()
        return indices, sampler.epoch  # the epoch these indices belong to, read after the draw that may start it

    def _gather(self, indices: torch.Tensor, epoch: int) -> Batch:
        batch = self.split.batch(indices)
        if self.shifts is not None:
            batch.images = self.shifts(batch.images, indices, epoch)
        return batch

    def _prefetch(self) -> tuple[list[tuple[torch.Tensor, int]], Future]:
        draws = [self._draw(self._ahead) for _ in range(self.micro_batches)]
        return draws, self._thread.submit(lambda: [self._gather(*draw) for draw in draws])

    def next_step(self) -> list[Batch]:
        """The micro-batches of the sampler's next step."""
        draws = [self._draw(self.sampler) for _ in range(self.micro_batches)]
        expected, gathered = self._next
        if all(torch.equal(a, b) and epoch == ahead_epoch for (a, epoch), (b, ahead_epoch) in zip(draws, expected)):
            batches = gathered.result()
        else:  # the sampler was moved by someone else (a state loaded): follow it again
            gathered.cancel()
            self._ahead = copy.deepcopy(self.sampler)
            batches = [self._gather(*draw) for draw in draws]
        self._next = self._prefetch()
        return batches


def check_enough_rows(n: int, batch_size: int, world_size: int, skipped: str = "") -> None:
    """A UserError when ``n`` training rows make no whole step of ``batch_size`` rows on each of ``world_size``
    ranks; ``skipped`` says which rows the data lost (``summarize_bad_rows``), as a reason to look there."""
    if n < batch_size * world_size:
        lost = f"; {skipped}" if skipped else ""
        raise UserError(
            f"the training split has {n} rows, fewer than train.batch_size={batch_size} x {world_size} rank(s){lost}; "
            f"lower train.batch_size or add data"
        )


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
        check_enough_rows(n, batch_size, world_size)
        self.batches_per_epoch = n // self.samples_per_step
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
