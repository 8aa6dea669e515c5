"""Shared helpers: a tiny model configuration, the CLI run as a user runs it, and one tiny trained run.

Everything here is sized to train in seconds on two CPU cores; the engine-free (torch) backend
on the CPU is pinned so that the numbers are reproducible on any machine.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# A model of a few thousand parameters on 16x16 images; a step takes milliseconds.
TINY = [
    "model.img_size=16", "model.patch_size=8", "model.image_embed_dim=32", "model.n_embd=32",
    "model.n_layer=1", "model.num_blks=1", "model.n_head=2",
    "data.synth_n=32", "train.batch_size=8", "train.backend=torch", "train.device=cpu", "log.progress=false",
    "train.precision=fp32",  # pinned: precision=auto would pick by this machine's speed
]
# The shared run: every step logged, evaluated and checkpointed. lr=0.3 makes the validation loss
# rise at the last step, so the best checkpoint is not the latest one and keep_last=1 must spare it.
# warmup_steps stays at its default (50), so the LR of steps 1..6 does not depend on max_steps.
# Dropout draws from the generators at every step, so a resume that lost their state (or Adam's
# moments, which lr=0.3 makes count) no longer reproduces the straight run.
TINY_RUN = TINY + [
    "train.max_steps=6", "train.lr=0.3", "model.dropout=0.05", "train.precision=fp32", "log.every=1", "eval.every=1",
    "checkpoint.every=1", "checkpoint.keep_last=1",
]


def pytest_sessionstart(session):
    """A lock file that a killed op build left behind hangs every DeepSpeed launch (see
    deepspeed_compat.stale_op_build_locks): the suite removes such locks before its first test, when none
    of its own builds can be running. Only the controlling process does, not each xdist worker."""
    if hasattr(session.config, "workerinput"):
        return
    from seemore_ds.backends.deepspeed_compat import stale_op_build_locks

    for lock, age_s in stale_op_build_locks():
        lock.unlink(missing_ok=True)
        print(f"removed {lock}, left {age_s / 60:.0f} min ago by a killed op build", file=sys.stderr)


class CLI:
    """``python -m seemore_ds ...`` in a subprocess, from a folder of the test's choosing."""

    def __call__(self, *args, cwd: Path, timeout_s: float = 600) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        # Many small processes on few shared cores: one thread each avoids oversubscription.
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return subprocess.run(
            [sys.executable, "-m", "seemore_ds", *map(str, args)],
            cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=timeout_s,
        )

    @staticmethod
    def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
        assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        return result

    @staticmethod
    def user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
        """Assert the CLI refused with exit 2 and one ``error: ...`` line naming ``fragments``; return it."""
        detail = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        assert result.returncode == 2, detail
        assert "Traceback" not in result.stderr, detail
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, detail
        assert lines[0].startswith("error: "), detail
        for fragment in fragments:
            assert fragment in lines[0], detail
        return lines[0]


@pytest.fixture(scope="session")
def cli() -> CLI:
    return CLI()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread than on several contending for shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny() -> list[str]:
    """Overrides for a tiny, reproducible CPU run (add run.output_dir and train.max_steps)."""
    return list(TINY)


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def trained_text_len(run_dir: Path) -> int:
    """The text positions a run trained: its training split's longest caption + 1 (<bos> / <eos>), worked
    out from its saved config's data, not from anything the run reported."""
    from seemore_ds.config import load_config
    from seemore_ds.data.dataset import load_train_val

    _, train_data, _ = load_train_val(load_config(str(run_dir / "config.yaml")))
    return max(map(len, train_data.captions)) + 1


def settled_running_stats(config_file: Path, weights_file: Path) -> tuple[dict, dict]:
    """(the BatchNorm running statistics in ``weights_file``, the same recomputed for its weights from the
    training images the trainer settles them on): a checkpoint or export must hold the second."""
    from safetensors.torch import load_file

    from seemore_ds.config import load_config
    from seemore_ds.data.dataset import load_train_val
    from seemore_ds.model import SeemoreVLM
    from seemore_ds.tokenizer import CharTokenizer
    from seemore_ds.trainer import running_stats_images

    cfg = load_config(str(config_file))
    _, train, _ = load_train_val(cfg)
    weights = load_file(str(weights_file))
    model = SeemoreVLM(cfg.model, CharTokenizer.load(config_file.parent / "tokenizer.json").vocab_size)
    model.load_state_dict({name: tensor.float() for name, tensor in weights.items()})
    saved = {name: weights[name].float() for name, _ in model.named_buffers() if "running_" in name}
    model.settle_running_stats(running_stats_images(train), cfg.train.batch_size)
    return saved, {name: stats for name, stats in model.named_buffers() if name in saved}


@dataclass
class TrainedRun:
    work_dir: Path  # the user's current folder
    run_dir: Path
    overrides: list[str]
    result: subprocess.CompletedProcess

    def losses(self) -> list[dict]:
        return read_csv_rows(self.run_dir / "losses_log.csv")

    def timings(self) -> list[dict]:
        return read_csv_rows(self.run_dir / "timing_logs.csv")


@pytest.fixture(scope="session")
def tiny_run(cli, tmp_path_factory) -> TrainedRun:
    """One 6-step training run through the CLI, shared by the tests that only read what it wrote."""
    work = tmp_path_factory.mktemp("user")
    overrides = TINY_RUN + ["run.output_dir=runs/tiny"]
    result = cli.ok(cli("train", *overrides, cwd=work))
    return TrainedRun(work, work / "runs" / "tiny", overrides, result)


@pytest.fixture(scope="session")
def synth_data(cli, tmp_path_factory):
    """``data synth``: 20 captioned images as a seemore CSV plus one PNG per image."""
    work = tmp_path_factory.mktemp("synth")
    result = cli.ok(cli("data", "synth", "--out", "synth.csv", "--n", 20, "--png-dir", "pngs", cwd=work))
    return work / "synth.csv", work / "pngs", result
