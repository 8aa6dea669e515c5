"""seemore's CSV format (columns ``b64string_images`` and ``caption``), and the report of bad rows.

Other columns are ignored in any order; UTF-8 with or without BOM; CRLF or LF; quoted fields (see
``tables`` for every table format read). A row that cannot be used is either skipped and reported
(``data.on_bad_row=skip``) or stops the run with its row number (``error``). Row numbers count data
rows from 1, the header excluded.
"""

from __future__ import annotations

import base64
import csv
import io
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from seemore_ds.data import tables
from seemore_ds.data.decoding import BadRow, DecodeResult, DecodeSettings, decode_tables
from seemore_ds.data.tables import BASE64_COLUMN
from seemore_ds.errors import UserError

IMAGE_COLUMN, CAPTION_COLUMN = BASE64_COLUMN, tables.CAPTION_COLUMN

Decoded = tuple[np.ndarray, list[str], list[BadRow]]  # uint8 images (N, 3, S, S), captions, skipped rows


def read_caption_csv(path: str, img_size: int, max_caption_len: int, max_pixels: int,
                     on_bad_row: str = "skip", workers: int = 1) -> Decoded:
    """Read and decode a captions table (or several: see ``tables.table_files``) into memory:
    (uint8 images (N, 3, S, S), captions, skipped rows). The run itself decodes into the image cache
    instead (``image_cache``); this is for tools and tests."""
    files = tables.table_files(path)
    settings = DecodeSettings(img_size, max_caption_len, max_pixels)
    with tempfile.TemporaryDirectory(prefix="seemore-ds-decode-") as folder:
        out = Path(folder) / "images.u8"
        result = decode_tables(files, settings, out, on_bad_row, workers)
        check_usable(path, result)
        images = np.fromfile(out, dtype=np.uint8).reshape(result.n_images, 3, img_size, img_size)
    return images, result.captions, result.bad_rows


def check_usable(source: str, result: DecodeResult) -> None:
    """A one-line UserError when no row at all could be used."""
    if not result.n_images:
        summary = f"; {summarize_bad_rows(result.bad_rows)}" if result.bad_rows else ""
        raise UserError(f"{source} has no usable rows{summary}")


def summarize_bad_rows(bad: list[BadRow]) -> str:
    """'3 rows skipped (2 not valid base64, 1 empty caption)'."""
    counts = Counter(b.reason for b in bad)
    kinds = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
    return f"{len(bad)} row{'s' if len(bad) != 1 else ''} skipped ({kinds})"


SHOWN_BAD_ROWS = 5  # on the console; the result lists all of them


def first_bad_rows(bad: list[BadRow]) -> str:
    """'a.csv row 49: image file not found, a.csv row 50: empty caption, ... (and 5 more)'."""
    shown = ", ".join(f"{b.file} row {b.row}: {b.reason}" for b in bad[:SHOWN_BAD_ROWS])
    return shown + (f" (and {len(bad) - SHOWN_BAD_ROWS} more)" if len(bad) > SHOWN_BAD_ROWS else "")


def write_bad_rows(bad: list[BadRow], path: Path) -> None:
    """The skipped rows as a CSV: row, reason, and first the file when they come from several tables."""
    several = len({b.file for b in bad}) > 1
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "row", "reason"] if several else ["row", "reason"])
        writer.writerows((b.file, b.row, b.reason) if several else (b.row, b.reason) for b in bad)


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
