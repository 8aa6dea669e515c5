"""Where a command writes: the check that a folder the user named can be made."""

from __future__ import annotations

from pathlib import Path


def file_in_the_way(folder: Path) -> Path | None:
    """The existing file, if any, at ``folder`` or above it: where a folder would have to be made."""
    for part in (folder, *folder.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None
