"""Files replaced whole: written under a temporary name, flushed to disk, then renamed over the old one."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Replace ``path`` with ``data`` so that a reader, or a crash, finds the old file or the whole new one.

    The temporary name is unique per host and process: writers of the same file at the same time (ranks,
    or nodes on a shared filesystem) never write into each other's file, and the last rename wins.
    """
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # and the rename itself survives a power cut
    finally:
        os.close(folder)
