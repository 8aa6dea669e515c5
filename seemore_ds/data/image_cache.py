"""Decoded images written once per node to a uint8 file that every rank memory-maps.

Without the cache every rank decodes every image itself and holds its own copy. With it the first
process of a node to take the entry's lock decodes straight into ``KEY.u8`` (the images, uint8
(N, 3, S, S) in C order; see ``decoding``), then writes ``KEY.json`` (shape, captions, skipped
rows); the other processes wait on the lock, then every process maps ``KEY.u8`` read-only, so the
OS page cache holds the pixels once per node however many ranks read them.

KEY hashes everything the decoded result depends on (see ``cache_key``), so a changed CSV or
setting never meets a stale entry; an entry no longer asked for is left alone. The images are
decoded under a temporary name, flushed to disk and renamed, the metadata written atomically last,
and an entry is trusted only when its image file has exactly the bytes its metadata names: a build
killed at any point leaves no entry or a whole one, and a truncated image file is decoded again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import PIL
import torch

from seemore_ds.atomic_files import write_atomically
from seemore_ds.config import Config
from seemore_ds.data import csv_reader, decoding, images, synthetic, tables
from seemore_ds.data.decoding import BadRow, DecodeResult
from seemore_ds.errors import UserError

FORMAT_VERSION = 2  # of the two files; a new layout must not read an old one
DECODING_MODULES = (csv_reader, decoding, images, synthetic, tables)  # a change to how pixels are made is a new entry


def cache_key(cfg: Config, spec: str) -> str:
    """A hash of the data's source and of every setting and piece of code that changes the decoded
    images, captions or skipped rows. A table is known by its path, size and modification time (in
    ns), read from the file system without reading the table: a warm start costs a stat per table
    however big the data (the image files a path column names are not looked at). The built-in
    dataset is known by its parameters."""
    if spec:
        identities = []
        for file in tables.table_files(spec):
            stat = file.stat()
            identities.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
        source = {"tables": identities, "max_image_pixels": cfg.data.max_image_pixels}
    else:
        source = {"synth_n": cfg.data.synth_n, "seed": cfg.train.seed}
    code = hashlib.sha256(b"".join(Path(module.__file__).read_bytes() for module in DECODING_MODULES))
    # The caption rules decide the skipped rows of the built-in dataset as of a table's.
    inputs = {**source, "max_caption_len": cfg.model.max_caption_len, "on_bad_row": cfg.data.on_bad_row,
              "img_size": cfg.model.img_size, "format": FORMAT_VERSION, "pillow": PIL.__version__,
              "code_sha256": code.hexdigest()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def load_or_decode(folder: Path, key: str, image_shape: tuple[int, int, int], decode: Callable[[Path], DecodeResult]
                   ) -> tuple[torch.Tensor, list[str], list[BadRow], DecodeResult | None]:
    """(images mapped from ``folder/KEY.u8``, captions, skipped rows, the decode's figures when this
    process decoded them), calling ``decode(file)`` to write the images (each ``image_shape``) into
    ``file`` only when no whole entry exists yet."""
    found = _map_entry(folder, key)
    if found:
        return (*found, None)
    with _node_lock(key) as locked:
        found = _map_entry(folder, key)  # written while this process waited
        if found:
            return (*found, None)
        tmp = folder / f".{key}.u8.{socket.gethostname()}.{os.getpid()}.tmp"
        created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if the data is refused
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if locked:
                _remove_stale_temporaries(folder, key)
            tmp.touch()
        except OSError as err:
            raise _unwritable(folder, err) from None
        try:
            result = decode(tmp)
            _publish(folder, key, tmp, (result.n_images, *image_shape), result.captions, result.bad_rows)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            for empty in created:
                with contextlib.suppress(OSError):
                    empty.rmdir()
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _unwritable(folder, err) from None
            raise
        return (*_map_entry(folder, key), result)


@contextlib.contextmanager
def _node_lock(key: str):
    """Held by one process of this node at a time: the others wait here while it decodes. A file lock
    needs no process group (there is none yet when the data loads) and the kernel releases it if its
    holder dies, so the next process decodes instead. It lives in the node's temporary folder, not in
    the cache folder, so that data refused while decoding leaves no folder behind. Where no lock can
    be taken every process decodes: still correct, each writes its own temporary file and the renames
    replace equal files. Yields whether the lock is held."""
    with contextlib.ExitStack() as held:
        try:
            handle = held.enter_context(open(Path(tempfile.gettempdir()) / f"seemore-ds-image-cache-{key}.lock", "a"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        yield True


def _remove_stale_temporaries(folder: Path, key: str) -> None:
    """A build of this node that was killed left its temporary file; with the node's lock held no other
    process of this node is writing one (another node's, on shared storage, is left alone)."""
    for stale in folder.glob(f".{key}.u8.{socket.gethostname()}.*.tmp"):
        stale.unlink(missing_ok=True)


def _unwritable(folder: Path, err: OSError) -> UserError:
    return UserError(f"cannot write the image cache in {folder}: {err.strerror}; set data.cache_dir to a writable "
                     f"folder with room for the decoded images, or data.cache=false")


def _publish(folder: Path, key: str, tmp: Path, shape: tuple[int, ...], captions: list[str], bad_rows: list[BadRow]) -> None:
    """The decoded file (already on disk) takes its name, then the metadata is written: the entry is
    whole only once both are there."""
    (folder / f"{key}.json").unlink(missing_ok=True)
    os.replace(tmp, folder / f"{key}.u8")
    meta = {"format": FORMAT_VERSION, "shape": list(shape), "captions": captions,
            "bad_rows": [[b.row, b.reason, b.file] for b in bad_rows]}
    write_atomically(folder / f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))


def map_images(image_file: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 images of ``shape`` mapped from ``image_file`` (copy-on-write: writes to the tensor would
    stay private to this process), advised as randomly accessed: a batch is scattered rows, and
    without the advice every page missing from the page cache reads the device's whole readahead
    window around it (8 MiB here: a batch of 32 rows read 256 MiB, and took seconds)."""
    nbytes = math.prod(shape)
    if not nbytes:
        return torch.empty(shape, dtype=torch.uint8)
    with open(image_file, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), nbytes, access=mmap.ACCESS_COPY)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_RANDOM)
    return torch.frombuffer(mapped, dtype=torch.uint8).view(shape)  # the tensor keeps the mapping alive


def _map_entry(folder: Path, key: str) -> tuple[torch.Tensor, list[str], list[BadRow]] | None:
    """The entry mapped, or None when it is missing, of another format, or its image file does not
    hold exactly its bytes."""
    image_file = folder / f"{key}.u8"
    try:
        meta = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
        shape = tuple(int(n) for n in meta["shape"])
        if meta["format"] != FORMAT_VERSION or len(meta["captions"]) != shape[0] or image_file.stat().st_size != math.prod(shape):
            return None
        return map_images(image_file, shape), meta["captions"], [BadRow(int(r), str(why), str(f)) for r, why, f in meta["bad_rows"]]
    except (OSError, RuntimeError, ValueError, KeyError, TypeError):
        return None
