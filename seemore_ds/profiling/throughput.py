"""The throughput columns of a log row: samples/s, tokens/s, achieved TFLOP/s and MFU.

MFU = achieved model FLOP/s ÷ the devices' peak (``profiling.peak``)."""

from __future__ import annotations


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
