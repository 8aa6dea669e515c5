"""This process's memory for the memory log: peak CUDA allocated/reserved, resident set now and at peak."""

from __future__ import annotations

import os
import resource
import sys

import torch

MIB = 2**20


def memory_mib(device: torch.device) -> dict:
    """This process's memory: peak CUDA allocated/reserved since start on a GPU; resident set (now, peak) always."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    row = {
        "max_allocated_mib": None, "max_reserved_mib": None, "rss_mib": None,
        "max_rss_mib": max_rss / (MIB if sys.platform == "darwin" else 1024),
    }
    try:  # Linux; elsewhere only the peak is known
        with open("/proc/self/statm", encoding="ascii") as handle:
            row["rss_mib"] = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        pass
    if device.type == "cuda":
        row["max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        row["max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / MIB
    return row
