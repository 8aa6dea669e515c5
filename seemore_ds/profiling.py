"""How close a run is to the hardware and where its time and memory go.

MFU = achieved model FLOP/s ÷ the device's peak. On a known GPU the peak comes from the vendor's
dense tensor-core figures below; elsewhere (any CPU, an unknown GPU) it is measured with a short
square matmul, once per machine, thread count and dtype, and cached in ``~/.cache/seemore_ds``.
Also here: the per-step throughput and memory figures of the logs, the headline figures of a
FLOPs profile, and the torch.profiler trace of a window of steps.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from seemore_ds.atomic_files import write_atomically
from seemore_ds.backends.base import PRECISION_DTYPES

# Dense (no sparsity) peak TFLOP/s by precision. fp32 is plain FP32, not TF32.
# Longer names first: "H100 PCIe" must match before "H100".
KNOWN_PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}

FLOPS_PROFILE_FILE = "flops_profile.txt"  # in the run folder
CACHE_FILE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "seemore_ds" / "matmul_peak.json"


def known_peak_tflops(device_name: str, precision: str) -> float | None:
    for name, peaks in KNOWN_PEAK_TFLOPS.items():
        if name in device_name:
            return peaks.get(precision)
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def measure_matmul_tflops(dtype: torch.dtype, device: torch.device, size: int | None = None, seconds: float = 1.0) -> float:
    """Best TFLOP/s of ``size``-square matmuls over about ``seconds`` (after one warm-up)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def timed_matmul() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed_matmul()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        elapsed = timed_matmul()
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size**3 / best / 1e12


def peak_tflops(device: torch.device, precision: str, override: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s, where it came from) for ``precision`` on ``device``."""
    if override > 0:
        return override, "set by profile.peak_tflops"
    name = device_name(device)
    known = known_peak_tflops(name, precision) if device.type == "cuda" else None
    if known:
        return known, f"{name} datasheet, {precision}"
    key = f"{name}|{precision}"
    cache = _read_cache()
    if key not in cache:
        cache[key] = measure_matmul_tflops(PRECISION_DTYPES.get(precision, torch.float32), device)
        _write_cache(cache)
    return cache[key], f"measured {precision} matmul on {name}"


def mfu(samples_per_s: float, flops_per_sample: float, peak: float, n_devices: int = 1) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the peak (TFLOP/s per device) of all devices."""
    return samples_per_s * flops_per_sample / (peak * 1e12 * n_devices)


def throughput(samples_per_s: float | None, tokens_per_sample: int, flops_per_sample: float, peak: float,
               n_devices: int) -> dict:
    """The throughput columns of a log row; ``samples_per_s`` counts the samples of every rank.
    None (the interval held only a compiling step) leaves every column empty."""
    if samples_per_s is None:
        return dict.fromkeys(("samples_per_s", "tokens_per_s", "achieved_tflops", "mfu"))
    return {
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * tokens_per_sample,
        "achieved_tflops": samples_per_s * flops_per_sample / 1e12,
        "mfu": mfu(samples_per_s, flops_per_sample, peak, n_devices),
    }


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


@dataclass
class FlopsReport:
    """Headline figures of one profiled optimizer step on one rank."""

    source: str  # who counted the FLOPs
    params: int
    forward_flops: float  # one micro-batch's forward
    micro_batch: int
    grad_accum: int
    step_s: float  # the whole optimizer step: every micro-batch's forward and backward, reduction, update

    @property
    def step_flops(self) -> float:
        """Forward + backward (2 x forward) of every micro-batch of the step."""
        return 3 * self.forward_flops * self.grad_accum

    def headline(self) -> dict:
        return {
            "params": self.params, "forward_gflops": self.forward_flops / 1e9,
            "backward_gflops": 2 * self.forward_flops / 1e9, "micro_batch": self.micro_batch,
            "step_latency_s": self.step_s, "achieved_tflops": self.step_flops / self.step_s / 1e12,
        }

    def line(self) -> str:
        h = self.headline()
        return (f"flops ({self.source}): {h['params'] / 1e6:.2f}M params, forward {h['forward_gflops']:.3f} GFLOP and "
                f"backward {h['backward_gflops']:.3f} GFLOP per micro-batch of {self.micro_batch}; step "
                f"{h['step_latency_s'] * 1000:.1f} ms, {h['achieved_tflops']:.4f} TFLOP/s per rank")


class TorchTrace:
    """A torch.profiler Chrome trace of optimizer steps START..END (counted from 1), written to ``path``."""

    def __init__(self, steps: tuple[int, int] | None, path: Path, device: torch.device):
        self.steps, self.path, self.profiler = steps, path, None
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)

    def before_step(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            self.profiler = torch.profiler.profile(activities=self.activities)
            self.profiler.__enter__()

    def after_step(self, step: int) -> None:
        if self.profiler is not None and step >= self.steps[1]:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run ends inside the window)."""
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler.export_chrome_trace(str(self.path))
            self.profiler = None


def _read_cache() -> dict:
    try:
        return json.loads(CACHE_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    try:
        CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(CACHE_FILE, json.dumps(cache, indent=1).encode("utf-8"))
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time
