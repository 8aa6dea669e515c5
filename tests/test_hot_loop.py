"""The training loop reads nothing back from the device between log steps: on a GPU every such read
(``.item()``, ``bool(tensor)``, ...) waits for the queued work and leaves the GPU idle meanwhile."""

from __future__ import annotations

import torch

from seemore_ds.backends.torch_backend import TorchBackend
from seemore_ds.config import load_config
from seemore_ds.trainer import train
from tests.conftest import TINY

# Every way Python code turns a tensor into a host value.
HOST_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")


def test_steps_between_log_steps_read_no_tensor_back(monkeypatch, tmp_path, one_torch_thread):
    max_steps, log_every = 9, 4
    cfg = load_config(None, TINY + [f"train.max_steps={max_steps}", f"log.every={log_every}", "eval.every=0",
                                    "checkpoint.every=0", f"run.output_dir={tmp_path / 'run'}"])
    step = {"now": 0}  # a read belongs to the step whose train_step ran last; 0: setting up
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append((step["now"], name))
            return original(self, *args, **kwargs)
        return read

    def train_step(self, micro_batches, timed):
        step["now"] += 1
        return original_train_step(self, micro_batches, timed)

    original_train_step = TorchBackend.train_step
    monkeypatch.setattr(TorchBackend, "train_step", train_step)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    train(cfg)

    assert step["now"] == max_steps
    logged = {s for s in range(1, max_steps + 1) if s % log_every == 0 or s == max_steps}
    assert any(s in logged for s, _ in reads), "the counting saw the log steps' reads"
    assert [(s, name) for s, name in reads if s and s not in logged] == []
