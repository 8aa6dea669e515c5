"""The device's peak TFLOP/s, the denominator of MFU.

On a known GPU the peak comes from the vendor's dense tensor-core figures below; elsewhere (any CPU,
an unknown GPU) it is measured with a short square matmul, per machine, thread count and dtype, and the
best figure yet is cached in ``$XDG_CACHE_HOME/seemore_ds`` (default ``~/.cache/seemore_ds``).
"""

from __future__ import annotations

import platform
import time

import torch

from seemore_ds.measured_cache import read_cache, write_cache
from seemore_ds.precision import compute_dtype

MATMUL_CACHE = "matmul_peak.json"  # in the measured-figures cache folder
FIRST_MEASURE_S = 1.0
REMEASURE_S = 0.25  # each later run's look: enough to catch an idle machine, little added to start-up

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


def known_peak_tflops(device_name: str, precision: str) -> float | None:
    """The datasheet's dense peak of a GPU named ``device_name`` at ``precision``; None if not listed."""
    for name, peaks in KNOWN_PEAK_TFLOPS.items():
        if name in device_name:
            return peaks.get(precision)
    return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with this process's thread count (the measured peak depends on it)."""
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
    # A generator of its own: a run that measures (the cache is cold) and one that reads the cache must
    # draw the same initial weights, dropout masks and batches from the seeded global stream.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)

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
    # A peak is a maximum: every run measures again, briefly, and the cache keeps the best figure yet. A
    # first measurement taken while the machine was busy would otherwise understate the peak (and
    # overstate MFU) for good.
    key = f"{name}|{precision}"
    cache = read_cache(MATMUL_CACHE)
    cached = cache.get(key)
    measured = measure_matmul_tflops(compute_dtype(precision), device,
                                     seconds=FIRST_MEASURE_S if cached is None else REMEASURE_S)
    if cached is None or measured > cached:
        cache[key] = measured
        write_cache(MATMUL_CACHE, cache)
    return cache[key], f"measured {precision} matmul on {name}, best yet"

