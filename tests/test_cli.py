"""End to end through ``python -m seemore_ds``: train, generate, eval, plot, data synth; determinism and resume."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from seemore_ds.data.csv_reader import read_caption_csv
from seemore_ds.tokenizer import CharTokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOSS_COLUMNS = ["step", "epoch", "train_loss", "val_loss", "lr", "grad_norm", "samples_per_s"]
TIMING_COLUMNS = ["step", "data_s", "forward_s", "backward_s", "optimizer_s", "step_s", "backward_allreduce_s"]


def header(path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle))


def read_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_png(path):
    raw = path.read_bytes()
    assert raw.startswith(PNG_SIGNATURE) and len(raw) > 1000, path
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100


def column(rows: list[dict], name: str) -> list[float]:
    return [float(row[name]) for row in rows]


def assert_same_numbers(ours: list[float], theirs: list[float]):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert math.isclose(a, b, rel_tol=0, abs_tol=1e-6), (ours, theirs)


# --- train -------------------------------------------------------------------------------------

def test_train_fills_the_run_folder(tiny_run):
    run = tiny_run.run_dir
    for name in ("config.yaml", "tokenizer.json", "losses_log.csv", "timing_logs.csv", "loss_curve.png", "timing_curve.png"):
        assert (run / name).is_file(), name

    assert header(run / "losses_log.csv")[: len(LOSS_COLUMNS)] == LOSS_COLUMNS
    losses = tiny_run.losses()
    assert [int(r["step"]) for r in losses] == [1, 2, 3, 4, 5, 6]  # log.every=1
    assert all(math.isfinite(v) and v > 0 for v in column(losses, "train_loss") + column(losses, "val_loss"))
    assert all(float(r["samples_per_s"]) > 0 and float(r["grad_norm"]) > 0 and float(r["lr"]) > 0 for r in losses)
    assert column(losses, "train_loss")[-1] < column(losses, "train_loss")[0], "six steps at lr 0.3 should learn something"

    assert header(run / "timing_logs.csv") == TIMING_COLUMNS
    timings = tiny_run.timings()
    assert [int(r["step"]) for r in timings] == [1, 2, 3, 4, 5, 6]
    assert all(float(r[c]) >= 0 for r in timings for c in TIMING_COLUMNS[1:])

    assert_png(run / "loss_curve.png")
    assert_png(run / "timing_curve.png")

    latest = (run / "checkpoints" / "latest").read_text(encoding="utf-8").strip()
    assert latest == "step_000006"
    assert (run / "checkpoints" / latest / "model.safetensors").is_file()
    assert CharTokenizer.load(run / "tokenizer.json").vocab_size > 4

    out = tiny_run.result.stdout
    assert "data: built-in synthetic (32 images): 32 rows used, 29 train / 3 val" in out
    assert "parameters" in out and "GFLOP per training sample" in out
    assert "done: 6 steps" in out and "caption exact match" in out


def test_keep_last_bounds_the_checkpoints_but_spares_the_best(tiny_run):
    root = tiny_run.run_dir / "checkpoints"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    latest = (root / "latest").read_text(encoding="utf-8").strip()
    best = (root / "best").read_text(encoding="utf-8").strip()

    losses = tiny_run.losses()
    best_step = min(losses, key=lambda r: float(r["val_loss"]))["step"]
    assert best == f"step_{int(best_step):06d}"
    assert folders == sorted({latest, best})  # keep_last=1, plus the best when it is older
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


@pytest.fixture(scope="module")
def resumed_run(cli, tiny_run, tmp_path_factory):
    """The shared run's settings again, stopped after 3 steps and resumed to 6 with train.resume=auto."""
    work = tmp_path_factory.mktemp("resume")
    first = cli.ok(cli("train", *tiny_run.overrides, "run.output_dir=resumed", "train.max_steps=3", cwd=work))
    first_losses = read_rows(work / "resumed" / "losses_log.csv")
    second = cli.ok(cli("train", *tiny_run.overrides, "run.output_dir=resumed", "train.max_steps=6", "train.resume=auto",
                        cwd=work))
    return work / "resumed", first, first_losses, second


def test_same_seed_same_losses(tiny_run, resumed_run):
    _, first, first_losses, _ = resumed_run
    assert "done: 3 steps" in first.stdout
    straight = tiny_run.losses()[:3]
    for name in ("train_loss", "val_loss", "grad_norm"):
        assert [r[name] for r in first_losses] == [r[name] for r in straight], name


def test_resume_continues_exactly_where_it_stopped(tiny_run, resumed_run):
    run, _, _, second = resumed_run
    assert "resuming from" in second.stdout and "at step 3" in second.stdout and "done: 6 steps" in second.stdout

    resumed, straight = read_rows(run / "losses_log.csv"), tiny_run.losses()
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for name in ("train_loss", "val_loss", "lr", "grad_norm"):
        assert_same_numbers(column(resumed, name), column(straight, name))

    ours = load_file(str(run / "checkpoints" / "step_000006" / "model.safetensors"))
    theirs = load_file(str(tiny_run.run_dir / "checkpoints" / "step_000006" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "resumed weights differ from the straight run's"


def test_fp16_on_cpu_is_refused_pointing_at_bf16(cli, tiny, tmp_path):
    result = cli("train", *tiny, "train.precision=fp16", "train.max_steps=2", "run.output_dir=runs/fp16", cwd=tmp_path)
    assert "bf16" in cli.user_error(result, "fp16")


def test_bf16_on_cpu_trains(cli, tiny, tmp_path):
    cli.ok(cli("train", *tiny, "train.precision=bf16", "train.max_steps=2", "log.every=1", "run.output_dir=runs/bf16",
               cwd=tmp_path))
    rows = read_rows(tmp_path / "runs" / "bf16" / "losses_log.csv")
    assert len(rows) == 2 and all(math.isfinite(float(r["train_loss"])) for r in rows)


# --- using the trained run ---------------------------------------------------------------------

def test_generate_prints_a_caption(cli, tiny_run, synth_data):
    _, pngs, _ = synth_data
    result = cli.ok(cli("generate", "--checkpoint", "runs/tiny", "--image", pngs / "00.png", cwd=tiny_run.work_dir))
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    known = set(CharTokenizer.load(tiny_run.run_dir / "tokenizer.json").chars) | {"\ufffd"}
    assert set(lines[0]) <= known


def test_generate_several_images_prints_one_line_each(cli, tiny_run, synth_data):
    _, pngs, _ = synth_data
    images = [pngs / "01.png", pngs / "02.png"]
    result = cli.ok(cli("generate", "--checkpoint", tiny_run.run_dir, "--image", *images, cwd=tiny_run.work_dir))
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]


def test_generate_with_a_missing_image_is_one_line(cli, tiny_run):
    result = cli("generate", "--checkpoint", "runs/tiny", "--image", "nope.png", cwd=tiny_run.work_dir)
    cli.user_error(result, "cannot read image nope.png")


def test_eval_on_the_held_out_split(cli, tiny_run):
    result = cli.ok(cli("eval", "--checkpoint", "runs/tiny", "--json", cwd=tiny_run.work_dir))
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    assert metrics["n"] == 3  # round(32 x 0.1) held-out rows
    assert 0.0 <= metrics["caption_exact_match"] <= 1.0
    # The same split and weights the trainer evaluated at its last step.
    assert math.isclose(metrics["val_loss"], float(tiny_run.losses()[-1]["val_loss"]), rel_tol=1e-5)


def test_eval_on_a_csv(cli, tiny_run, synth_data):
    csv_path, _, _ = synth_data
    result = cli.ok(cli("eval", "--checkpoint", "runs/tiny", "--data", csv_path, "--json", cwd=tiny_run.work_dir))
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 20 and metrics["skipped_rows"] == 0
    assert math.isfinite(metrics["val_loss"]) and 0.0 <= metrics["caption_exact_match"] <= 1.0


def test_eval_of_a_folder_without_checkpoints_is_one_line(cli, tmp_path):
    (tmp_path / "empty_run").mkdir()
    cli.user_error(cli("eval", "--checkpoint", "empty_run", cwd=tmp_path), "neither a checkpoint folder nor a run folder")


def test_plot_writes_pngs(cli, tiny_run, tmp_path):
    result = cli.ok(cli("plot", tiny_run.run_dir, "--out", tmp_path / "plots", cwd=tmp_path))
    written = [tmp_path / "plots" / name for name in
               ("loss_curve.png", "lr_curve.png", "throughput_curve.png", "timing_curve.png", "memory_curve.png",
                "captions.png")]
    assert result.stdout.splitlines() == [str(p) for p in written]
    for path in written:
        assert_png(path)


def test_data_synth_writes_a_csv_and_pngs(synth_data):
    csv_path, pngs, result = synth_data
    assert result.stdout.strip() == "wrote 20 captioned images to synth.csv and PNGs to pngs"
    assert header(csv_path) == ["", "b64string_images", "caption"]
    assert sorted(p.name for p in pngs.iterdir()) == [f"{i:02d}.png" for i in range(20)]
    images, captions, bad = read_caption_csv(str(csv_path), img_size=16, max_caption_len=48, max_pixels=10**6)
    assert len(images) == 20 and bad == []
    assert all(c.startswith(("a small ", "a large ")) for c in captions)
    with Image.open(pngs / "00.png") as img:
        assert img.size == (64, 64)


def test_a_checkpoint_older_than_the_conv_stem_still_captions(cli, tiny, synth_data, tmp_path):
    """Checkpoints from before model.patch_embed and model.patch_norm existed were trained with the
    single patch conv and no patch LayerNorm."""
    _, pngs, _ = synth_data
    cli.ok(cli("train", *tiny, "model.patch_embed=patch", "model.patch_norm=false", "train.max_steps=1",
               "run.output_dir=old", cwd=tmp_path))
    checkpoint = tmp_path / "old" / "checkpoints" / "step_000001"
    config = checkpoint / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if "patch_embed" not in line and "patch_norm" not in line))
    (checkpoint / "manifest.json").unlink()  # such checkpoints had no manifest either
    result = cli.ok(cli("generate", "--checkpoint", "old", "--image", pngs / "00.png", cwd=tmp_path))
    assert len(result.stdout.splitlines()) == 1
    assert cli.ok(cli("export", "--checkpoint", "old", "--out", "old_export", cwd=tmp_path))
    assert (tmp_path / "old_export" / "model.safetensors").is_file()
