"""The headline figures of one profiled optimizer step, as the console line and ``flops_profile.txt``."""

from __future__ import annotations

from dataclasses import dataclass

FLOPS_PROFILE_FILE = "flops_profile.txt"  # in the run folder


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
        """The figures by name, as ``flops_profile.txt`` and W&B's ``flops_profile/*`` hold them."""
        return {
            "params": self.params, "forward_gflops": self.forward_flops / 1e9,
            "backward_gflops": 2 * self.forward_flops / 1e9, "micro_batch": self.micro_batch,
            "step_latency_s": self.step_s, "achieved_tflops": self.step_flops / self.step_s / 1e12,
        }

    def line(self) -> str:
        """The console line of the report."""
        h = self.headline()
        return (f"flops ({self.source}): {h['params'] / 1e6:.2f}M params, forward {h['forward_gflops']:.3f} GFLOP and "
                f"backward {h['backward_gflops']:.3f} GFLOP per micro-batch of {self.micro_batch}; step "
                f"{h['step_latency_s'] * 1000:.1f} ms, {h['achieved_tflops']:.4f} TFLOP/s per rank")
