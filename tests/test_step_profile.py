"""The benchmark's breakdown of a step's CPU time by kind of work (``bench.step_profile``)."""

from __future__ import annotations

import torch

from bench.step_profile import KINDS, kind_of, step_breakdown


def test_each_kind_of_work_lands_in_its_own_share(one_torch_thread):
    weight = torch.nn.Parameter(torch.randn(256, 256))
    optimizer = torch.optim.AdamW([weight], foreach=False)
    x = torch.randn(256, 256)

    def step():
        loss = (x @ weight).to(torch.bfloat16).float().relu().sum()
        loss.backward()
        optimizer.step()

    step()
    shares = step_breakdown(step, steps=2)
    assert set(shares) == set(KINDS)
    assert abs(sum(shares.values()) - 1) < 1e-9
    for kind in ("matmuls", "casts", "optimizer", "elementwise and other"):
        assert shares[kind] > 0, kind
    assert shares["fused attention"] == shares["convolutions"] == 0


def test_an_operator_takes_the_kind_of_what_encloses_it():
    assert kind_of("aten::mul_", ["Optimizer.step#AdamW.step", "aten::_foreach_mul_"]) == "optimizer"
    assert kind_of("aten::copy_", ["aten::to", "aten::_to_copy"]) == "casts"
    assert kind_of("aten::copy_", ["aten::contiguous", "aten::clone"]) == "elementwise and other"
    assert kind_of("aten::mm", ["autograd::engine::evaluate_function: MmBackward0", "MmBackward0"]) == "matmuls"
    assert kind_of("aten::_scaled_dot_product_flash_attention_for_cpu", []) == "fused attention"
    assert kind_of("aten::_scaled_dot_product_attention_math", []) == "elementwise and other"
    assert kind_of("aten::convolution_backward", []) == "convolutions"
