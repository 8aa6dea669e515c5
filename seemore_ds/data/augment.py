"""``data.shift_px``: each training image moved by a few pixels, another way every epoch.

A caption that says what an image shows stays true when the image moves by a few pixels, and a
model that saw each training image in one place only learns those places by heart too: on 2,700
polygons images it ends higher on held-out images when they move (docs/time_to_quality.md). The
move of a row in an epoch depends on the seed, the epoch and the row alone, so a resumed run, on any
rank count, moves every image as the uninterrupted run did. Pixels moved in from outside the image
repeat its edge. Held-out images never move.
"""

from __future__ import annotations

import torch


class ImageShifts:
    """Moves batches of uint8 (B, 3, H, W) training images by up to ``max_px`` pixels each way."""

    def __init__(self, max_px: int, seed: int, n_rows: int):
        self.max_px, self.seed, self.n_rows = max_px, seed, n_rows
        self._epoch_offsets: tuple[int, torch.Tensor] | None = None  # one tuple: swapped whole, read by two threads

    def offsets(self, epoch: int) -> torch.Tensor:
        """(n_rows, 2) moves (down, right) of every training row in ``epoch``."""
        cached = self._epoch_offsets
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            moves = torch.randint(-self.max_px, self.max_px + 1, (self.n_rows, 2), generator=generator)
            cached = self._epoch_offsets = (epoch, moves)
        return cached[1]

    def __call__(self, images: torch.Tensor, rows: torch.Tensor, epoch: int) -> torch.Tensor:
        down, right = self.offsets(epoch)[rows].unbind(1)
        height, width = images.shape[-2:]
        # Output pixel (y, x) is input pixel (y - down, x - right), clamped into the image: the edge repeats.
        ys = (torch.arange(height) - down[:, None]).clamp_(0, height - 1)  # (B, H)
        xs = (torch.arange(width) - right[:, None]).clamp_(0, width - 1)  # (B, W)
        batch = torch.arange(len(rows))[:, None, None]
        moved = images[batch, :, ys[:, :, None], xs[:, None, :]]  # (B, H, W, 3): the indexed dims come first
        return moved.permute(0, 3, 1, 2).contiguous()
