"""Where a training step's time goes: torch.profiler's CPU time of a few steps, by kind of work.

Every profiled operator's self time (its own, not its children's) goes to one kind:
- ``optimizer``: anything inside the optimizer's step (``Optimizer.step#...``), e.g. the fused AdamW;
- ``casts``: dtype conversions (``aten::_to_copy`` and the copies inside it), autocast's above all;
- ``matmuls``: ``mm``, ``addmm``, ``bmm`` and the oneDNN matmuls behind them;
- ``fused attention``: the fused scaled-dot-product attention kernels, forward and backward (the
  math path's matrix products are matmuls);
- ``convolutions``: the stem's or patch embedding's convolutions, forward and backward;
- ``elementwise and other``: the rest (GELU, LayerNorm, softmax, dropout masks, adds, copies that do
  not change the dtype, autograd's own bookkeeping).
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

KINDS = ("matmuls", "fused attention", "convolutions", "casts", "optimizer", "elementwise and other")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot"}


def kind_of(name: str, ancestors: list[str]) -> str:
    """The kind of an operator called ``name`` whose enclosing ranges (outermost first) are ``ancestors``."""
    if any(a.startswith("Optimizer.step#") for a in ancestors):
        return "optimizer"
    if name == "aten::_to_copy" or "aten::_to_copy" in ancestors:
        return "casts"
    if name in MATMULS or name.startswith("aten::mkldnn_matmul"):
        return "matmuls"
    if name.startswith(("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")) \
            and "math" not in name:
        return "fused attention"
    if "convolution" in name:
        return "convolutions"
    return "elementwise and other"


def step_breakdown(step: Callable[[], object], steps: int = 2) -> dict[str, float]:
    """The share of CPU time each kind took over ``steps`` calls of ``step`` (warm it up first); the
    shares add up to 1."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals = dict.fromkeys(KINDS, 0.0)
    for event in prof.events():
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        totals[kind_of(event.name, ancestors[::-1])] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {kind: time / whole for kind, time in totals.items()}
