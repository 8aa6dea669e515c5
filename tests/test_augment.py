"""data.shift_px: what a moved image holds, which move each row gets, and a run that moves its images
resuming to the losses of one that never stopped (the prefetcher's moves: tests/test_data_scale.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seemore_ds.config import load_config
from seemore_ds.data.augment import ImageShifts
from seemore_ds.errors import UserError
from seemore_ds.trainer import train
from tests.conftest import TINY, read_csv_rows


def random_images(n: int, side: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def moved_by_padding(image: torch.Tensor, down: int, right: int, pad: int) -> torch.Tensor:
    """The definition: pad by repeating the edge, then cut the image's size out, offset by the move."""
    height, width = image.shape[-2:]
    padded = F.pad(image[None].float(), (pad,) * 4, mode="replicate")[0]
    return padded[:, pad - down:pad - down + height, pad - right:pad - right + width].to(torch.uint8)


def test_each_image_moves_by_its_rows_offset_and_the_edge_fills_what_moved_in():
    images, rows = random_images(6), torch.tensor([5, 0, 17, 3, 9, 11])
    shifts = ImageShifts(3, seed=1, n_rows=20)
    moved = shifts(images, rows, epoch=2)
    offsets = shifts.offsets(2)[rows]
    assert moved.dtype == torch.uint8 and moved.shape == images.shape
    assert offsets.abs().sum() > 0  # the images did move
    for image, got, (down, right) in zip(images, moved, offsets.tolist()):
        assert torch.equal(got, moved_by_padding(image, down, right, pad=3)), (down, right)


def test_moves_span_every_offset_up_to_the_limit_and_follow_seed_epoch_and_row_alone():
    shifts = ImageShifts(2, seed=7, n_rows=1000)
    offsets = shifts.offsets(0)
    assert set(offsets.flatten().tolist()) == {-2, -1, 0, 1, 2}
    assert torch.equal(offsets, ImageShifts(2, seed=7, n_rows=1000).offsets(0))
    assert not torch.equal(offsets, shifts.offsets(1))  # another epoch, other moves
    assert not torch.equal(offsets, ImageShifts(2, seed=8, n_rows=1000).offsets(0))
    images = random_images(3)
    alone = shifts(images[1:2], torch.tensor([42]), epoch=0)
    among_others = shifts(images, torch.tensor([7, 42, 900]), epoch=0)
    assert torch.equal(alone[0], among_others[1])  # a row's move does not depend on its batch


def test_a_move_of_half_the_image_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"data.shift_px \(8\) .* choose at most 7"):
        load_config(None, TINY + ["data.shift_px=8"])  # TINY's images are 16 px


def train_losses(tmp_path, name: str, max_steps: int, *overrides: str) -> list[float]:
    cfg = load_config(None, TINY + [f"train.max_steps={max_steps}", "log.every=1", "eval.every=0", "checkpoint.every=3",
                                    f"run.output_dir={tmp_path / name}", *overrides])
    train(cfg)
    return [float(row["train_loss"]) for row in read_csv_rows(tmp_path / name / "losses_log.csv")]


def test_a_run_that_moves_its_images_trains_on_them_and_resumes_to_the_same_losses(tmp_path, one_torch_thread):
    still = train_losses(tmp_path, "still", 7, "data.shift_px=0")
    moved = train_losses(tmp_path, "moved", 7, "data.shift_px=2")
    train_losses(tmp_path, "resumed", 4, "data.shift_px=2")
    resumed = train_losses(tmp_path, "resumed", 7, "data.shift_px=2", "train.resume=auto")
    assert moved[0] != still[0]  # the first step already saw moved images
    assert len(resumed) == len(moved) == 7  # 7 steps of 3 batches an epoch: the resume crosses an epoch
    assert all(math.isclose(a, b, rel_tol=0, abs_tol=1e-6) for a, b in zip(resumed, moved)), (resumed, moved)
