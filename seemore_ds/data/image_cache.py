"""Decoded images written once per node to a uint8 file that every rank memory-maps.

Without the cache every rank decodes every image itself and holds its own copy. With it the first
process of a node to take the entry's lock decodes and writes ``KEY.u8`` (the images, uint8
(N, 3, S, S) in C order) and ``KEY.json`` (shape, captions, skipped rows); the other processes wait
on the lock, then every process maps ``KEY.u8`` read-only, so the OS page cache holds the pixels
once per node however many ranks read them.

KEY hashes everything the decoded result depends on (see ``cache_key``), so a changed CSV or
setting never meets a stale entry; an entry no longer asked for is left alone. Both files are
replaced atomically, the metadata last, and an entry is trusted only when its image file has
exactly the bytes its metadata names: a build killed at any point leaves no entry or a whole one,
and a truncated image file is decoded again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torch

from seemore_ds.atomic_files import write_atomically
from seemore_ds.config import Config
from seemore_ds.data import csv_reader, images, synthetic
from seemore_ds.data.csv_reader import BadRow, Decoded, csv_file
from seemore_ds.errors import UserError
from seemore_ds.manifest import sha256_of

FORMAT_VERSION = 1  # of the two files; a new layout must not read an old one
DECODING_MODULES = (csv_reader, images, synthetic)  # a change to how pixels are made is a new entry


def cache_key(cfg: Config, csv_path: str) -> str:
    """A hash of the data's source (the CSV's bytes, or the built-in dataset's parameters) and of
    every setting and piece of code that changes the decoded images, captions or skipped rows."""
    if csv_path:
        source = {"csv_sha256": sha256_of(csv_file(csv_path)), "max_image_pixels": cfg.data.max_image_pixels,
                  "max_caption_len": cfg.model.max_caption_len, "on_bad_row": cfg.data.on_bad_row}
    else:
        source = {"synth_n": cfg.data.synth_n, "seed": cfg.train.seed}
    code = hashlib.sha256(b"".join(Path(module.__file__).read_bytes() for module in DECODING_MODULES))
    inputs = {**source, "img_size": cfg.model.img_size, "format": FORMAT_VERSION, "pillow": PIL.__version__,
              "code_sha256": code.hexdigest()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def load_or_decode(folder: Path, key: str,
                   decode: Callable[[], Decoded]) -> tuple[torch.Tensor, list[str], list[BadRow], bool]:
    """(images mapped from ``folder/KEY.u8``, captions, skipped rows, whether this process decoded them),
    calling ``decode`` only when no whole entry exists yet."""
    found = _map_entry(folder, key)
    if found:
        return (*found, False)
    with _node_lock(key):
        found = _map_entry(folder, key)  # written while this process waited
        if found:
            return (*found, False)
        pixels, captions, bad_rows = decode()
        try:
            _write_entry(folder, key, pixels, captions, bad_rows)
        except OSError as err:
            raise _unwritable(folder, err) from None
        return (*_map_entry(folder, key), True)


@contextlib.contextmanager
def _node_lock(key: str):
    """Held by one process of this node at a time: the others wait here while it decodes. A file lock
    needs no process group (there is none yet when the data loads) and the kernel releases it if its
    holder dies, so the next process decodes instead. It lives in the node's temporary folder, not in
    the cache folder, so that data refused while decoding leaves no folder behind. Where no lock can
    be taken every process decodes: still correct, each writes its own temporary file and the renames
    replace equal files."""
    with contextlib.ExitStack() as held:
        try:
            handle = held.enter_context(open(Path(tempfile.gettempdir()) / f"seemore-ds-image-cache-{key}.lock", "a"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def _unwritable(folder: Path, err: OSError) -> UserError:
    return UserError(f"cannot write the image cache in {folder}: {err.strerror}; set data.cache_dir to a writable "
                     f"folder with room for the decoded images, or data.cache=false")


def _write_entry(folder: Path, key: str, pixels: np.ndarray, captions: list[str], bad_rows: list[BadRow]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / f"{key}.u8", memoryview(np.ascontiguousarray(pixels)).cast("B"))
    meta = {"format": FORMAT_VERSION, "shape": list(pixels.shape), "captions": captions,
            "bad_rows": [[b.row, b.reason] for b in bad_rows]}
    write_atomically(folder / f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))


def _map_entry(folder: Path, key: str) -> tuple[torch.Tensor, list[str], list[BadRow]] | None:
    """The entry mapped read-only (writes to the tensor would stay private to this process), or None
    when it is missing, of another format, or its image file does not hold exactly its bytes."""
    image_file = folder / f"{key}.u8"
    try:
        meta = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
        shape = tuple(int(n) for n in meta["shape"])
        nbytes = math.prod(shape)
        if meta["format"] != FORMAT_VERSION or len(meta["captions"]) != shape[0] or image_file.stat().st_size != nbytes:
            return None
        pixels = torch.from_file(str(image_file), shared=False, size=nbytes, dtype=torch.uint8).view(shape)
        return pixels, meta["captions"], [BadRow(int(row), str(reason)) for row, reason in meta["bad_rows"]]
    except (OSError, RuntimeError, ValueError, KeyError, TypeError):
        return None
