"""The checkpoint manager on the engine-free backend: run folders never clobbered, ``best`` only improves,
pruning spares it, ``checkpoint info``/``convert``, and ``export`` refusing a bad ``--out``."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seemore_ds.backends.torch_backend import TorchBackend
from seemore_ds.checkpoint import CheckpointManager, list_checkpoints, read_checkpoint_record, read_pointer
from seemore_ds.config import load_config
from seemore_ds.data.dataset import ResumableSampler
from seemore_ds.model import SeemoreVLM
from seemore_ds.tokenizer import CharTokenizer
from tests.conftest import REPO, TINY, settled_running_stats

RUN = [*TINY, "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=0", "eval.every=1", "log.every=1"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_run_into_an_occupied_folder_is_refused_and_overwrite_moves_it_aside(cli, tmp_path):
    cli.ok(cli("train", *RUN, "run.output_dir=run", cwd=tmp_path))
    before = snapshot(tmp_path / "run")
    assert any(name.startswith("checkpoints/step_") for name in before) and "losses_log.csv" in before

    refused = cli("train", *RUN, "train.max_steps=1", "run.output_dir=run", cwd=tmp_path)
    cli.user_error(refused, "holds the checkpoints of another run", "train.resume=auto", "run.output_dir=",
                   "run.overwrite=true")
    assert snapshot(tmp_path / "run") == before  # logs, best, checkpoints: byte for byte

    moved = cli.ok(cli("train", *RUN, "train.max_steps=1", "run.output_dir=run", "run.overwrite=true", cwd=tmp_path))
    assert f"moved the previous run in run to {Path('run.old-1')}" in moved.stdout
    assert snapshot(tmp_path / "run.old-1") == before  # moved, never deleted
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000001"]


@pytest.fixture
def manager_and_backend(tmp_path, monkeypatch):
    """A real manager and engine-free backend, saving as the trainer does."""
    monkeypatch.setenv("RANK", "0")

    def build(resume: str = "none", keep_last: int = 0):
        cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path / 'run'}", "train.device=cpu",
                                 f"train.resume={resume}", f"checkpoint.keep_last={keep_last}"])
        tokenizer = CharTokenizer.from_captions(["a red square", "a blue circle"])
        backend = TorchBackend(SeemoreVLM(cfg.model, tokenizer.vocab_size), cfg)
        manager = CheckpointManager(cfg, say=lambda message: None)
        sampler = ResumableSampler(64, cfg.train.batch_size, cfg.train.seed)
        return manager, backend, sampler, tokenizer

    return build


def test_best_only_moves_to_a_better_checkpoint_and_pruning_spares_it(manager_and_backend, tmp_path):
    manager, backend, sampler, tokenizer = manager_and_backend(keep_last=1)
    for step, val_loss in [(1, 2.0), (2, 1.0), (3, 3.0), (4, None)]:
        manager.state.step = step
        manager.save(backend, sampler, val_loss, tokenizer)
    root = tmp_path / "run" / "checkpoints"
    assert read_pointer(root / "best") == "step_000002"
    assert [p.name for p in list_checkpoints(root)] == ["step_000002", "step_000004"]  # pruned, best kept
    assert read_checkpoint_record(root / "step_000004")["state"]["best_val_loss"] == 1.0

    resumed, backend, sampler, tokenizer = manager_and_backend(resume="auto", keep_last=1)
    resumed.find_resume()
    assert resumed.state.step == 4 and resumed.state.best_val_loss == 1.0  # the recorded best survives a restart
    resumed.state.step = 5
    resumed.save(backend, sampler, 1.5, tokenizer)  # worse than the recorded best
    assert read_pointer(root / "best") == "step_000002"
    resumed.state.step = 6
    resumed.save(backend, sampler, 0.5, tokenizer)
    assert read_pointer(root / "best") == "step_000006" and resumed.state.best_val_loss == 0.5
    assert not math.isinf(read_checkpoint_record(root / "step_000006")["state"]["best_val_loss"])


def test_checkpoint_info_and_convert_resume_and_caption_alike(cli, tiny_run, synth_data, tmp_path):
    checkpoint = tiny_run.run_dir / "checkpoints" / "step_000006"
    info = cli.ok(cli("checkpoint", "info", checkpoint, cwd=tmp_path)).stdout
    batch_size = load_config(str(checkpoint / "config.yaml")).train.batch_size
    for line in ("step           6", "world size     1", "zero stage     -", "precision      fp32", "backend        torch",
                 f"samples seen   {6 * batch_size}", "MiB in"):
        assert line in info, info

    converted = tmp_path / "converted"
    cli.ok(cli("checkpoint", "convert", "--checkpoint", tiny_run.run_dir, "--out", converted, cwd=tmp_path))
    assert "backend        universal" in cli.ok(cli("checkpoint", "info", converted, cwd=tmp_path)).stdout
    cli.user_error(cli("checkpoint", "convert", "--checkpoint", checkpoint, "--out", converted, cwd=tmp_path),
                   "is not an empty folder")
    _, pngs, _ = synth_data
    images = sorted(str(p) for p in pngs.iterdir())[:3]
    captions = [cli.ok(cli("generate", "--checkpoint", c, "--image", *images, cwd=tmp_path)).stdout
                for c in (checkpoint, converted)]
    assert captions[0] == captions[1] and captions[0].strip()

    resumed = cli.ok(cli("train", *tiny_run.overrides, "train.max_steps=7", f"train.resume={converted}",
                         "run.output_dir=resumed", cwd=tmp_path))
    assert f"resuming {converted} (universal, 1 rank(s), fp32) through its universal form" in resumed.stdout
    assert "done: 7 steps" in resumed.stdout


def test_export_refuses_an_out_under_a_file_in_one_line(cli, tiny_run, tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    cli.user_error(cli("export", "--checkpoint", tiny_run.run_dir, "--out", tmp_path / "file.txt" / "export",
                       cwd=tmp_path), "is a file")
    assert (tmp_path / "file.txt").read_text() == "not a folder"



def test_export_never_writes_into_a_checkpoint_or_a_runs_checkpoints_folder(cli, tiny_run, tmp_path):
    """Files added to a checkpoint are not in its manifest: eval would read them unchecked, resume would pass
    the checkpoint over as damaged. Every such --out is refused and leaves the run byte for byte."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    before = snapshot(run)
    older, newest = list_checkpoints(run / "checkpoints")  # the best and the latest
    for out, says in [(older, f"is checkpoint {older}"), (newest, "is the checkpoint being exported"),
                      (older / "model.safetensors", f"is checkpoint {older}"), (older / "sub", "lies inside checkpoint"),
                      (run / "checkpoints", "is the checkpoints folder"), (run / "checkpoints" / "x", "lies inside the checkpoints"),
                      (run, "is the run folder")]:
        cli.user_error(cli("export", "--checkpoint", newest, "--out", out, cwd=tmp_path), says, "RUN/export")
    assert snapshot(run) == before
    cli.ok(cli("export", "--checkpoint", run, "--out", run / "export", cwd=tmp_path))
    cli.ok(cli("export", "--checkpoint", older, "--out", run / "export", cwd=tmp_path))  # an export may be replaced


def test_checkpoint_info_describes_an_export_and_resuming_one_says_what_to_resume(cli, tiny_run, tmp_path):
    export = tmp_path / "export"
    cli.ok(cli("export", "--checkpoint", tiny_run.run_dir, "--out", export, cwd=tmp_path))
    info = cli.ok(cli("checkpoint", "info", export, cwd=tmp_path)).stdout
    assert f"export         {export}" in info and "model.safetensors:" in info and "(F32" in info, info
    assert "training state none: eval and generate read it" in info, info
    for command in (["checkpoint", "convert", "--checkpoint", export, "--out", tmp_path / "converted"],
                    ["train", *tiny_run.overrides, f"train.resume={export}", "run.output_dir=resumed"]):
        line = cli.user_error(cli(*command, cwd=tmp_path), "is an export", "the checkpoint it was exported from")
        assert "seemore_ds export" not in line

KILLED_CONVERSION = """
import os, sys
from pathlib import Path
from seemore_ds.universal import publish_universal

def killed(out):
    (out / "zero" / "vit.cls_token").mkdir(parents=True)
    os._exit(9)  # as SIGKILL: no cleanup of any kind runs

publish_universal(Path(sys.argv[1]), killed)
"""


def test_a_conversion_killed_halfway_is_never_trusted(tmp_path):
    """Only a renamed ``universal/`` counts; what a killed conversion leaves is removed by the next one."""
    from seemore_ds.universal import intact_universal, publish_universal

    folder = tmp_path / "step_000002"
    folder.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLED_CONVERSION, str(folder)], cwd=REPO, timeout=120)
    assert killed.returncode == 9 and list(folder.iterdir()), "the conversion was killed halfway"
    assert intact_universal(folder) is None
    publish_universal(folder, lambda out: (out / "zero").mkdir(parents=True))
    assert intact_universal(folder) == folder / "universal" and not list(folder.glob(".tmp-*"))


def test_a_checkpoint_holds_batchnorm_statistics_recomputed_for_its_weights(tiny_run):
    """Evaluation, export and inference read the statistics the checkpoint holds; the averages training
    keeps trail the weights, so the run recomputes them before it evaluates and saves."""
    root = tiny_run.run_dir / "checkpoints"
    saved, settled = settled_running_stats(root / read_pointer(root / "latest") / "config.yaml",
                                           root / read_pointer(root / "latest") / "model.safetensors")
    assert len(saved) == 8  # mean and variance of the stem's four BatchNorms (full resolution, then three halvings)
    torch.testing.assert_close(saved, settled)
