"""Checkpoint manifests: the size and sha256 of every file, written before a checkpoint is published.

A save killed halfway leaves only a staging folder behind, but a file can still be damaged later
(a full disk, a copy cut short, bit rot). On load every file is checked against the manifest, so a
damaged checkpoint is named with the file at fault instead of failing deep inside a loader.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from seemore_ds.errors import UserError

MANIFEST_FILE = "manifest.json"


class DamagedCheckpoint(UserError):
    """A checkpoint file is missing, truncated or altered since the checkpoint was written."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file under ``folder`` (once all ranks have written theirs)."""
    files = {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")


def verify_checkpoint(folder: Path) -> None:
    """Raise DamagedCheckpoint naming the first damaged file. A folder without a manifest (an export,
    or a checkpoint of an older seemore-ds) is not checked."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DamagedCheckpoint(f"{manifest} is damaged (not the JSON seemore-ds writes); the checkpoint cannot be "
                                f"verified: use another checkpoint") from None
    for name, (size, sha256) in expected.items():
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{path} is missing (listed in {manifest}); use another checkpoint")
        actual_size = path.stat().st_size
        if actual_size != size:
            raise DamagedCheckpoint(f"{path} is truncated or overwritten: {actual_size} bytes, {size} when the "
                                    f"checkpoint was written; use another checkpoint")
        if sha256_of(path) != sha256:
            raise DamagedCheckpoint(f"{path} is corrupt: its sha256 differs from the one in {manifest}; "
                                    f"use another checkpoint")
