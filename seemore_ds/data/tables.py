"""Captions tables: which files ``data.csv`` names, and their rows, read a chunk at a time.

A table is a CSV, a JSONL file (one JSON object a line) or a Parquet file, told apart by the file's
suffix (anything else is read as CSV). It has a ``caption`` column and one image column:
``b64string_images`` (the image, base64-encoded: seemore's format) or ``image``, ``file_name`` or
``path`` (an image file's path, relative to the table's folder). Parquet may also hold the image's
bytes in that column, or a ``{bytes, path}`` struct as Hugging Face datasets write it.

Rows are yielded one by one, never gathered: a table of any size costs the memory of one row (one
Parquet record batch). Row numbers count data rows from 1 (a CSV's header excluded; a JSONL file's
lines); a row that cannot be used is the decoder's to report, a file that cannot be used at all is
a one-line UserError.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from seemore_ds.errors import UserError

CAPTION_COLUMN = "caption"
BASE64_COLUMN = "b64string_images"
PATH_COLUMNS = ("image", "file_name", "path")
IMAGE_COLUMNS = (BASE64_COLUMN, *PATH_COLUMNS)  # the first one a table has is its image column
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Row:
    """One data row, not yet decoded. ``kind`` says what ``image`` holds: "base64" text, a "path"
    (relative paths already joined to the table's folder), raw "bytes", or, for a row that could not
    even be read ("bad"), the reason."""

    table: int  # index of the row's table in the list of tables
    number: int
    kind: str
    image: str | bytes
    caption: str


def table_files(spec: str, key: str = "data.csv") -> list[Path]:
    """The tables a ``data.csv``-style value names: files and globs separated by commas, in the order
    given, each glob's matches sorted; a file named twice is read once. One-line UserErrors, naming
    ``key`` (the setting or argument the user wrote), for a file that does not exist, a folder and a glob
    that matches no file."""
    files: list[Path] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"{key}: {item} matches no file")
            files.extend(matches)
        elif Path(item).is_file():
            files.append(Path(item))
        elif Path(item).is_dir():
            raise UserError(f"{key}: {item} is a folder; name a table file, or a glob such as "
                            f"{os.path.join(item, '*.csv')}")
        else:
            raise UserError(f"{key}: {item} does not exist")
    if not files:
        raise UserError(f"{key} names no file")
    return list(dict.fromkeys(files))


def absolute_spec(spec: str) -> str:
    """A ``data.csv``-style value with every file and glob made absolute, so that a saved config finds
    the data from any working directory."""
    return ",".join(os.path.abspath(part.strip()) for part in spec.split(",") if part.strip())


def table_format(file: Path) -> str:
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "csv"


class TableReader:
    """The rows of several tables in order, with how many of their bytes have been read so far
    (for a progress bar's estimate of what is left)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.total_bytes = sum(f.stat().st_size for f in files)
        self._done_bytes = 0  # of the tables already read whole
        self._current = lambda: 0  # bytes read of the table being read

    @property
    def bytes_read(self) -> int:
        return self._done_bytes + self._current()

    def rows(self) -> Iterator[Row]:
        """Every row of every table, in order."""
        for index, file in enumerate(self.files):
            read = {"csv": self._csv_rows, "jsonl": self._jsonl_rows, "parquet": self._parquet_rows}[table_format(file)]
            yield from read(index, file)
            self._done_bytes += file.stat().st_size
            self._current = lambda: 0

    def _csv_rows(self, index: int, file: Path) -> Iterator[Row]:
        csv.field_size_limit(2**31 - 1)  # a base64 image is one long field
        try:
            with open(file, "rb") as raw:
                counted = _CountingReader(raw)
                self._current = lambda: counted.count
                handle = io.TextIOWrapper(io.BufferedReader(counted), encoding="utf-8-sig", newline="")
                reader = csv.DictReader(handle)
                columns = [c.strip() for c in (reader.fieldnames or [])]
                _check_unique_columns(file, columns)
                image_column = _image_column(file, columns)
                reader.fieldnames = columns
                for number, row in enumerate(reader, start=1):
                    yield _row(index, file, number, image_column, row.get(image_column), row.get(CAPTION_COLUMN))
        except UnicodeDecodeError as err:
            raise UserError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
        except csv.Error as err:
            raise UserError(f"{file} is not a readable CSV: {err}") from None

    def _jsonl_rows(self, index: int, file: Path) -> Iterator[Row]:
        """A line that is not a JSON object is a row with an unreadable image, reported, not fatal;
        the image column is the first of IMAGE_COLUMNS the first object has."""
        image_column = None
        with open(file, "rb") as handle:
            self._current = handle.tell
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    yield Row(index, number, "bad", "not a JSON object", "")
                    continue
                if image_column is None:  # a first object without a caption is a bad row, not a bad file
                    image_column = _image_column(file, [*record, CAPTION_COLUMN])
                yield _row(index, file, number, image_column, record.get(image_column), record.get(CAPTION_COLUMN))
        if image_column is None:
            raise UserError(f"{file} has no JSON object with an image and a caption")

    def _parquet_rows(self, index: int, file: Path) -> Iterator[Row]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{file} is not a readable Parquet file: {err}") from None
        _check_unique_columns(file, table.schema_arrow.names)
        image_column = _image_column(file, table.schema_arrow.names)
        total_rows, size, rows_read = max(table.metadata.num_rows, 1), file.stat().st_size, 0
        self._current = lambda: size * rows_read // total_rows
        number = 0
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[image_column, CAPTION_COLUMN]):
            for image, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                number += 1
                yield _row(index, file, number, image_column, image, caption)
            rows_read = number


class _CountingReader(io.RawIOBase):
    """A binary file that counts the bytes read through it."""

    def __init__(self, raw):
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.count += n or 0
        return n


def _check_unique_columns(file: Path, columns: list[str]) -> None:
    """Refuse a header that names a column twice: which of the two is meant cannot be told."""
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise UserError(f"{file} has more than one column named {', '.join(map(repr, repeated))}; "
                        f"rename or remove the extra one(s) so that each name is used once")


def _image_column(file: Path, columns: list[str]) -> str:
    found = [c for c in IMAGE_COLUMNS if c in columns]
    missing = ([] if found else [repr(BASE64_COLUMN)]) + ([] if CAPTION_COLUMN in columns else [repr(CAPTION_COLUMN)])
    if missing:
        raise UserError(
            f"{file} has no {' and no '.join(missing)} column (found: {', '.join(map(repr, columns)) or 'no header'}); "
            f"a table needs {CAPTION_COLUMN!r} and an image column: {BASE64_COLUMN!r} (base64) or "
            f"{', '.join(map(repr, PATH_COLUMNS))} (a file path relative to the table)"
        )
    return found[0]


def _row(index: int, file: Path, number: int, image_column: str, image, caption) -> Row:
    caption = caption if isinstance(caption, str) else "" if caption is None else str(caption)
    if isinstance(image, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return Row(index, number, "bytes", bytes(image), caption)
    image = "" if image is None else str(image)
    if image_column == BASE64_COLUMN:
        return Row(index, number, "base64", image, caption)
    return Row(index, number, "path", str(file.parent / image.strip()) if image.strip() else "", caption)
