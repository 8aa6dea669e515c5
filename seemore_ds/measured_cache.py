"""Figures measured once per machine (matmul peaks, precision step times), kept as JSON files in
``$XDG_CACHE_HOME/seemore_ds`` (``~/.cache/seemore_ds`` without it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from seemore_ds.atomic_files import write_atomically


def cache_path(name: str) -> Path:
    """The file ``name`` in the cache folder, read from the environment at each call, so that a process (or
    a test) that sets XDG_CACHE_HOME after importing us is obeyed."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seemore_ds" / name


def read_cache(name: str) -> dict:
    """The cached figures of ``name``; empty when the file is missing, unreadable or not a JSON object."""
    try:
        cache = json.loads(cache_path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def write_cache(name: str, cache: dict) -> None:
    """Replace ``name``'s figures atomically; an unwritable cache only costs a measurement next time."""
    path = cache_path(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(cache, indent=1).encode("utf-8"))
    except OSError:
        pass
