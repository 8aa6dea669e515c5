"""Tables of captioned images decoded straight into a uint8 file, on every core, in bounded memory.

The main process reads the tables a chunk of rows at a time and hands each chunk to a worker
process, which decodes it and writes its pixels into the output file at the chunk's own slot (the
file grows a chunk at a time, as a sparse file, so no row count is needed first). Chunks are taken
back in order: captions and bad rows are gathered in file order, and where bad rows left a chunk
short its pixels are moved down to follow the previous chunk's, so the file ends up dense, row i of
it being the i-th usable row. Only a few chunks are ever in flight, so memory is bounded by the
chunk size and the worker count, whatever the number of rows.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from seemore_ds.data.images import BadImage, decode_base64_image, decode_image_bytes, to_rgb_array
from seemore_ds.data.synthetic import synthetic_dataset
from seemore_ds.data.tables import Row, TableReader
from seemore_ds.errors import UserError

CHUNK_BYTES = 4 * 2**20  # decoded pixels per chunk; with the encoded rows, what one worker holds at a time
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker: enough to keep every worker busy


class BadCaption(ValueError):
    """A caption cell that cannot be used; the message is the reason reported."""


@dataclass
class BadRow:
    row: int
    reason: str
    file: str = ""  # the table the row is in


@dataclass(frozen=True)
class DecodeSettings:
    """Everything a row's decoded pixels and its verdict depend on."""

    img_size: int
    max_caption_len: int
    max_pixels: int


@dataclass
class DecodeResult:
    n_images: int
    captions: list[str]
    bad_rows: list[BadRow]
    seconds: float
    workers: int  # processes that decoded: 1 is this process alone
    peak_rss_anon: int = 0  # bytes: this process's RssAnon plus its workers', sampled at every chunk
    rss_samples: list[int] = field(default_factory=list)  # that sum at every chunk, in order

    @property
    def rows_per_s(self) -> float:
        return (self.n_images + len(self.bad_rows)) / max(self.seconds, 1e-9)


def default_workers() -> int:
    """The cores this process may run on (its affinity, not the machine's core count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def checked_caption(caption: str, max_caption_len: int) -> str:
    """The caption without surrounding blanks, or BadCaption when it is empty or longer than the model takes."""
    caption = caption.strip()
    if not caption:
        raise BadCaption("empty caption")
    if len(caption) > max_caption_len:
        raise BadCaption(f"caption of {len(caption)} characters exceeds model.max_caption_len={max_caption_len}")
    return caption


def bad_row_error(file: str | Path, number: int, reason: str) -> UserError:
    """What stops a run at its first bad row under ``data.on_bad_row=error``."""
    return UserError(f"{file} row {number}: {reason} (set data.on_bad_row=skip to skip such rows)")


def decode_row(row: Row, settings: DecodeSettings) -> tuple[np.ndarray, str]:
    """(uint8 (3, S, S), caption) of one row, or BadCaption / BadImage saying why it cannot be used."""
    caption = checked_caption(row.caption, settings.max_caption_len)
    if row.kind == "bad":
        raise BadImage(row.image)
    if row.kind == "base64":
        return decode_base64_image(row.image, settings.img_size, settings.max_pixels), caption
    if row.kind == "bytes":
        return decode_image_bytes(row.image, settings.img_size, settings.max_pixels), caption
    if not row.image:
        raise BadImage("empty image cell")
    try:
        raw = Path(row.image).read_bytes()
    except FileNotFoundError:
        raise BadImage("image file not found") from None
    except OSError as err:
        raise BadImage(f"unreadable image file ({err.strerror})") from None
    return decode_image_bytes(raw, settings.img_size, settings.max_pixels), caption


def decode_chunk(rows: list[Row], settings: DecodeSettings) -> tuple[np.ndarray, list[str], list[tuple[int, str]]]:
    """(pixels of the usable rows (M, 3, S, S), their captions, (position in ``rows``, reason) of the others)."""
    s = settings.img_size
    pixels = np.empty((len(rows), 3, s, s), dtype=np.uint8)
    captions, bad = [], []
    for position, row in enumerate(rows):
        try:
            pixels[len(captions)], caption = decode_row(row, settings)
        except (BadCaption, BadImage) as err:
            bad.append((position, str(err)))
            continue
        captions.append(caption)
    return pixels[: len(captions)], captions, bad


def decode_synthetic(n: int, seed: int, settings: DecodeSettings, out_path: Path, on_bad_row: str,
                     source: str) -> DecodeResult:
    """The built-in dataset (``synthetic``) drawn into ``out_path`` as ``decode_tables`` decodes a table, under the
    same rule for captions: one longer than ``model.max_caption_len`` is a bad row of ``source``."""
    start = time.perf_counter()
    pil_images, captions = synthetic_dataset(n, seed=seed, size_px=settings.img_size)
    kept, bad = [], []
    for number, (image, caption) in enumerate(zip(pil_images, captions), start=1):
        try:
            kept.append((image, checked_caption(caption, settings.max_caption_len)))
        except BadCaption as err:
            if on_bad_row == "error":
                raise bad_row_error(source, number, str(err)) from None
            bad.append(BadRow(number, str(err), source))
    pixels = [to_rgb_array(image, settings.img_size) for image, _ in kept]
    np.array(pixels, dtype=np.uint8).reshape(len(kept), 3, settings.img_size, settings.img_size).tofile(out_path)
    return DecodeResult(len(kept), [caption for _, caption in kept], bad, time.perf_counter() - start, 1)


def rss_anon() -> int:
    """This process's anonymous resident memory in bytes (file-backed pages, such as a mapped cache,
    do not count); 0 where /proc does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _write_at(fd: int, pixels: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(pixels).reshape(-1))
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _decode_chunk_into_file(path: str, offset: int, rows: list[Row], settings: DecodeSettings):
    """A worker's task: decode ``rows`` and write their pixels at ``offset`` of the file ``path``."""
    pixels, captions, bad = decode_chunk(rows, settings)
    fd = os.open(path, os.O_WRONLY)
    try:
        _write_at(fd, pixels, offset)
    finally:
        os.close(fd)
    return captions, bad, os.getpid(), rss_anon()


def _chunks(reader: TableReader, size: int) -> Iterator[tuple[list[Row], int]]:
    """Chunks of ``size`` rows, each with the bytes of the tables read up to its end (for the progress bar:
    the reader runs a few chunks ahead of the rows decoded)."""
    rows = reader.rows()
    while chunk := list(itertools.islice(rows, size)):
        yield chunk, reader.bytes_read


class _Decode:
    """One decode's bookkeeping: rows taken back in order, bad rows, memory, the progress bar."""

    def __init__(self, files: list[Path], reader: TableReader, on_bad_row: str, progress: bool, row_bytes: int):
        self.files, self.on_bad_row, self.row_bytes = files, on_bad_row, row_bytes
        self.captions: list[str] = []
        self.bad_rows: list[BadRow] = []
        self.worker_rss: dict[int, int] = {}
        self.rss_samples: list[int] = []
        self.start = time.perf_counter()
        self.bar = tqdm(total=reader.total_bytes, disable=not progress, desc="decode", dynamic_ncols=True,
                        mininterval=0.5, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def take(self, rows: list[Row], bytes_read: int, captions: list[str], bad: list[tuple[int, str]],
             worker_rss: tuple[int, int] | None):
        for position, reason in bad:
            row = rows[position]
            if self.on_bad_row == "error":
                raise bad_row_error(self.files[row.table], row.number, reason)
            self.bad_rows.append(BadRow(row.number, reason, str(self.files[row.table])))
        self.captions.extend(captions)
        if worker_rss:
            self.worker_rss[worker_rss[0]] = worker_rss[1]
        self.rss_samples.append(rss_anon() + sum(self.worker_rss.values()))
        done = len(self.captions) + len(self.bad_rows)
        self.bar.update(bytes_read - self.bar.n)
        self.bar.set_postfix_str(f"{done} rows, {done / (time.perf_counter() - self.start):.0f} rows/s, "
                                 f"{len(self.bad_rows)} bad", refresh=False)

    def result(self, workers: int) -> DecodeResult:
        return DecodeResult(len(self.captions), self.captions, self.bad_rows, time.perf_counter() - self.start, workers,
                            max(self.rss_samples, default=0), self.rss_samples)


def decode_tables(files: list[Path], settings: DecodeSettings, out_path: Path, on_bad_row: str = "skip",
                  workers: int = 1, chunk_rows: int = 0, progress: bool = False) -> DecodeResult:
    """Decode every row of ``files`` into ``out_path`` (created or emptied): uint8 (N, 3, S, S) in C
    order, N the usable rows, in file order. ``workers`` > 1 decodes in that many processes;
    ``chunk_rows`` (0: about CHUNK_BYTES of pixels) rows go to a worker at a time. With
    ``on_bad_row="error"`` the first bad row in file order is a UserError naming it."""
    row_bytes = 3 * settings.img_size**2
    chunk_rows = chunk_rows or max(16, min(1024, CHUNK_BYTES // row_bytes))
    reader = TableReader(files)
    chunks = _chunks(reader, chunk_rows)
    first = list(itertools.islice(chunks, 2))
    parallel = workers > 1 and len(first) > 1  # one chunk of data is not worth starting processes for
    decode = _Decode(files, reader, on_bad_row, progress, row_bytes)
    with open(out_path, "w+b") as out:
        try:
            if parallel:
                _decode_in_workers(itertools.chain(first, chunks), settings, out_path, out.fileno(), workers, decode)
            else:
                for rows, bytes_read in itertools.chain(first, chunks):
                    pixels, captions, bad = decode_chunk(rows, settings)
                    _write_at(out.fileno(), pixels, len(decode.captions) * row_bytes)
                    decode.take(rows, bytes_read, captions, bad, None)
            os.ftruncate(out.fileno(), len(decode.captions) * row_bytes)
            os.fsync(out.fileno())  # the pixels are on disk before any name points at them
        finally:
            decode.bar.close()
    return decode.result(workers if parallel else 1)


def _decode_in_workers(chunks: Iterator[tuple[list[Row], int]], settings: DecodeSettings, out_path: Path, fd: int, workers: int,
                       decode: _Decode) -> None:
    # forkserver, not fork: a forked worker would count the trainer's memory (torch and all) as its own
    # and inherit its threads; these start from a small process that has imported only this module.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    row_bytes = decode.row_bytes
    pool = ProcessPoolExecutor(workers, mp_context=context)
    pending: deque = deque()  # (slot, rows, bytes read, future), in file order
    slot = 0  # rows handed out so far: the next chunk's place in the file before compaction

    def take_oldest() -> None:
        chunk_slot, rows, bytes_read, future = pending.popleft()
        captions, bad, pid, worker_rss = future.result()
        dense = len(decode.captions)  # where this chunk's pixels belong
        if dense != chunk_slot and captions:  # earlier bad rows left a gap: close it
            moved = os.pread(fd, len(captions) * row_bytes, chunk_slot * row_bytes)
            os.pwrite(fd, moved, dense * row_bytes)
        decode.take(rows, bytes_read, captions, bad, (pid, worker_rss))

    try:
        for rows, bytes_read in chunks:
            os.ftruncate(fd, (slot + len(rows)) * row_bytes)  # grows the file (sparse) to hold this chunk
            task = pool.submit(_decode_chunk_into_file, str(out_path), slot * row_bytes, rows, settings)
            pending.append((slot, rows, bytes_read, task))
            slot += len(rows)
            while len(pending) > IN_FLIGHT_PER_WORKER * workers:
                take_oldest()
        while pending:
            take_oldest()
    except BrokenProcessPool:
        raise UserError("a decode worker died (out of memory?); lower data.decode_workers or free memory") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
