"""seemore's CSV format: columns ``b64string_images`` and ``caption``; every image decoded once.

Other columns are ignored in any order; UTF-8 with or without BOM; CRLF or LF; quoted fields.
A row that cannot be used is either skipped and reported (``data.on_bad_row=skip``) or stops the
run with its row number (``error``). Row numbers count data rows from 1, the header excluded.
"""

from __future__ import annotations

import base64
import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from seemore_ds.data.images import BadImage, decode_base64_image
from seemore_ds.errors import UserError

IMAGE_COLUMN, CAPTION_COLUMN = "b64string_images", "caption"


class BadCaption(ValueError):
    """A caption cell that cannot be used; the message is the reason reported."""


@dataclass
class BadRow:
    row: int
    reason: str


Decoded = tuple[np.ndarray, list[str], list[BadRow]]  # uint8 images (N, 3, S, S), captions, skipped rows


def csv_file(path: str) -> Path:
    """data.csv as a path, or a one-line UserError when there is no such file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data.csv: {path} does not exist")
    return file


def read_caption_csv(path: str, img_size: int, max_caption_len: int, max_pixels: int,
                     on_bad_row: str = "skip") -> Decoded:
    """Read and decode a seemore CSV: (uint8 images (N, 3, S, S), captions, skipped rows)."""
    file = csv_file(path)
    csv.field_size_limit(2**31 - 1)  # a base64 image is one long field
    images, captions, bad = [], [], []
    try:
        with open(file, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in (IMAGE_COLUMN, CAPTION_COLUMN) if c not in columns]
            if missing:
                raise UserError(
                    f"{path} has no {' and no '.join(repr(c) for c in missing)} column "
                    f"(found: {', '.join(map(repr, columns)) or 'no header'}); "
                    f"a seemore CSV needs the columns {IMAGE_COLUMN!r} and {CAPTION_COLUMN!r}"
                )
            reader.fieldnames = columns
            for row_number, row in enumerate(reader, start=1):
                try:
                    caption = (row.get(CAPTION_COLUMN) or "").strip()
                    if not caption:
                        raise BadCaption("empty caption")
                    if len(caption) > max_caption_len:
                        raise BadCaption(f"caption of {len(caption)} characters exceeds model.max_caption_len={max_caption_len}")
                    image = decode_base64_image(row.get(IMAGE_COLUMN) or "", img_size, max_pixels)
                except (BadCaption, BadImage) as err:
                    if on_bad_row == "error":
                        raise UserError(f"{path} row {row_number}: {err} (set data.on_bad_row=skip to skip such rows)") from None
                    bad.append(BadRow(row_number, str(err)))
                    continue
                images.append(image)
                captions.append(caption)
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except csv.Error as err:
        raise UserError(f"{path} is not a readable CSV: {err}") from None
    if not images:
        summary = f"; {summarize_bad_rows(bad)}" if bad else ""
        raise UserError(f"{path} has no usable rows{summary}")
    return np.stack(images), captions, bad


def summarize_bad_rows(bad: list[BadRow]) -> str:
    """'3 rows skipped (2 not valid base64, 1 empty caption)'."""
    counts = Counter(b.reason for b in bad)
    kinds = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
    return f"{len(bad)} row{'s' if len(bad) != 1 else ''} skipped ({kinds})"


def write_bad_rows(bad: list[BadRow], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "reason"])
        writer.writerows((b.row, b.reason) for b in bad)


def encode_png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_caption_csv(path: str, images: list[Image.Image], captions: list[str]) -> None:
    """Write images and captions in seemore's CSV format (with its leading index column)."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", IMAGE_COLUMN, CAPTION_COLUMN])
        for i, (image, caption) in enumerate(zip(images, captions)):
            writer.writerow([i, encode_png_base64(image), caption])
