"""End to end through ``python -m seemore_ds``: train, generate, eval, plot, data synth; determinism and resume."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from seemore_ds.__main__ import main
from seemore_ds.checkpoint import load_model_for_inference
from seemore_ds.data.csv_reader import read_caption_csv
from seemore_ds.manifest import write_manifest
from seemore_ds.tokenizer import CharTokenizer
from tests.conftest import REPO

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


def test_a_run_piped_into_head_goes_on_after_head_has_its_lines(tiny, tmp_path):
    """`train ... | head -1`: the later lines are dropped, the run is not killed by a broken pipe."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "seemore_ds", "train", *tiny, "train.max_steps=4", "eval.every=2",
               "run.output_dir=runs/piped"]
    with subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as run:
        assert run.stdout.readline().startswith("data: ")
        run.stdout.close()  # what head does once it has printed its lines
        stderr = run.stderr.read()
        assert run.wait(timeout=600) == 0, stderr
    assert "Error" not in stderr
    assert (tmp_path / "runs" / "piped" / "checkpoints" / "step_000004").is_dir()


def test_fp16_on_cpu_is_refused_pointing_at_bf16(cli, tiny, tmp_path):
    result = cli("train", *tiny, "train.precision=fp16", "train.max_steps=2", "run.output_dir=runs/fp16", cwd=tmp_path)
    assert "bf16" in cli.user_error(result, "fp16")


def test_bf16_on_cpu_computes_in_bf16(tiny_run, tmp_path):
    """The training steps' layers really compute in bf16 under train.precision=bf16 (seen by a forward hook
    on every module), in float32 under fp32; a run that ignored the setting would train in float32."""
    def linear_output_dtypes(precision: str) -> set[torch.dtype]:
        seen = set()

        def record(module, inputs, output):
            if isinstance(module, torch.nn.Linear) and module.training:  # not the captioning at evaluations
                seen.add(output.dtype)

        hook = torch.nn.modules.module.register_module_forward_hook(record)
        try:
            assert main(["train", *tiny_run.overrides, f"train.precision={precision}", "train.max_steps=2",
                         f"run.output_dir={tmp_path / precision}"]) == 0
        finally:
            hook.remove()
        rows = read_rows(tmp_path / precision / "losses_log.csv")
        assert len(rows) == 2 and all(math.isfinite(float(r["train_loss"])) for r in rows)
        return seen

    assert linear_output_dtypes("bf16") == {torch.bfloat16}
    assert linear_output_dtypes("fp32") == {torch.float32}


# --- the optimizer: schedule and clipping --------------------------------------------------------

SCHEDULE = ["train.precision=fp32", "train.max_steps=8", "train.warmup_steps=3", "train.lr=0.01", "train.min_lr_ratio=0.1",
            # Adam divides out the gradients' scale, so a clip would not show with the usual eps; 1e-3 is
            # comparable to these gradients' entries.
            "train.eps=1e-3", "log.every=1", "eval.every=0", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def clipped_and_not(cli, tiny, tmp_path_factory) -> tuple[list[dict], list[dict]]:
    """The same 8 steps with train.grad_clip=0.05 (below every gradient norm here) and with clipping off."""
    work = tmp_path_factory.mktemp("clip")
    for name, clip in (("clipped", "0.05"), ("unclipped", "0")):
        cli.ok(cli("train", *tiny, *SCHEDULE, f"train.grad_clip={clip}", f"run.output_dir={name}", cwd=work))
    return read_rows(work / "clipped" / "losses_log.csv"), read_rows(work / "unclipped" / "losses_log.csv")


def expected_lr(step: int, lr=0.01, warmup=3, max_steps=8, min_ratio=0.1) -> float:
    """The rate of optimizer step ``step`` (from 1): linear warm-up over ``warmup`` steps, then a cosine
    from lr down to lr * min_ratio at max_steps (written out here, apart from seemore_ds/optim.py)."""
    done = step - 1  # updates before this one
    if done < warmup:
        return lr * (done + 1) / (warmup + 1)
    progress = (done - warmup) / (max_steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2)


def test_the_lr_column_follows_warm_up_then_cosine_decay(clipped_and_not):
    for rows in clipped_and_not:
        assert [int(r["step"]) for r in rows] == list(range(1, 9))
        for row in rows:
            assert float(row["lr"]) == pytest.approx(expected_lr(int(row["step"])), rel=1e-5), row


def test_grad_clip_changes_the_update_and_the_log_shows_the_norm_before_clipping(clipped_and_not):
    clipped, unclipped = clipped_and_not
    # Step 1 starts from the same weights and batch: the same gradient, whose norm is logged before clipping.
    assert float(clipped[0]["grad_norm"]) == pytest.approx(float(unclipped[0]["grad_norm"]), rel=1e-5)
    assert all(float(r["grad_norm"]) > 0.05 * 1.5 for r in clipped)  # so the clip binds at every step
    assert clipped[0]["train_loss"] == unclipped[0]["train_loss"]
    assert abs(float(clipped[1]["train_loss"]) - float(unclipped[1]["train_loss"])) > 1e-3  # the first update differed


# --- refusals --------------------------------------------------------------------------------------

def test_resuming_with_other_model_sizes_is_one_line(cli, tiny_run, tmp_path):
    checkpoint = tiny_run.run_dir / "checkpoints" / "step_000006"
    result = cli("train", *tiny_run.overrides, "model.n_embd=64", f"train.resume={checkpoint}", "run.output_dir=other",
                 cwd=tmp_path)
    cli.user_error(result, f"checkpoint {checkpoint} was trained with model.n_embd=32, but the config says 64",
                   "use the same model sizes to resume")


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_latest_pointer_naming_a_missing_checkpoint_is_one_line(cli, tiny_run, tmp_path, command):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step_000099\n")
    args = {"train": ["train", *tiny_run.overrides, f"train.resume={run_dir}", "run.output_dir=elsewhere"],
            "eval": ["eval", "--checkpoint", run_dir]}[command]
    cli.user_error(cli(*args, cwd=tmp_path), f"{run_dir / 'checkpoints' / 'latest'} names step_000099, which is missing")


# --- using the trained run ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def memorised(cli, tiny, synth_data, tmp_path_factory):
    """The tiny model trained 400 steps on synth.csv's 20 images, held out too, never moved: it learns every
    caption by heart (exact match 1.000; 200 steps left one or two rows wrong on one thread, with the stem's
    full-resolution convolution). Returns (run folder, the PNGs, synth.csv's captions in row order)."""
    csv_path, pngs, _ = synth_data
    work = tmp_path_factory.mktemp("memorised")
    result = cli.ok(cli("train", *tiny, f"data.csv={csv_path}", f"data.val_csv={csv_path}", "data.shift_px=0",
                        "train.batch_size=20", "train.max_steps=400", "train.lr=0.01", "train.warmup_steps=10",
                        "train.precision=fp32", "log.every=50", "eval.every=0", "checkpoint.every=0",
                        "run.output_dir=run", cwd=work))
    assert "caption exact match 1.000 on 20 held-out rows" in result.stdout
    return work / "run", pngs, [row["caption"] for row in read_rows(csv_path)]


def generated(capsys, *args) -> list[str]:
    """``generate ARGS`` in this process (the flags' parsing included); one caption per image."""
    assert main(["generate", *map(str, args)]) == 0
    return [line.split("\t")[-1] for line in capsys.readouterr().out.splitlines()]


def test_generate_prints_the_caption_a_memorised_image_was_trained_with(cli, memorised):
    run_dir, pngs, captions = memorised
    result = cli.ok(cli("generate", "--checkpoint", run_dir.name, "--image", pngs / "00.png", cwd=run_dir.parent))
    assert result.stdout == captions[0] + "\n"


def test_generate_several_images_prints_one_line_each(cli, memorised):
    run_dir, pngs, captions = memorised
    images = [pngs / "01.png", pngs / "02.png", pngs / "03.png"]
    result = cli.ok(cli("generate", "--checkpoint", run_dir, "--image", *images, cwd=run_dir.parent))
    assert result.stdout.splitlines() == [f"{path}\t{caption}" for path, caption in zip(images, captions[1:4])]


def test_generate_flags_sample_bound_and_seed_the_captions(memorised, capsys):
    run_dir, pngs, captions = memorised
    images = [pngs / f"{i:02d}.png" for i in range(4)]
    greedy = generated(capsys, "--checkpoint", run_dir, "--image", *images)
    assert greedy == captions[:4]
    assert generated(capsys, "--checkpoint", run_dir, "--image", *images, "--max-new-tokens", 5) == [c[:5] for c in greedy]
    hot = ["--checkpoint", run_dir, "--image", *images, "--temperature", 3]
    seed0 = generated(capsys, *hot, "--seed", 0)
    assert generated(capsys, *hot, "--seed", 0) == seed0  # a seed gives the same samples again
    assert generated(capsys, *hot, "--seed", 1) != seed0
    assert seed0 != greedy  # temperature 3 flattens the model's certainty enough to stray
    assert generated(capsys, *hot, "--top-k", 1) == greedy  # sampling from the one most likely character


def test_generate_with_a_missing_image_is_one_line(cli, tiny_run):
    result = cli("generate", "--checkpoint", "runs/tiny", "--image", "nope.png", cwd=tiny_run.work_dir)
    cli.user_error(result, "cannot read image nope.png")


@pytest.mark.parametrize("flag, says", [
    (["--temperature", "nan"], "argument --temperature: expected a finite number of 0 or more, got nan"),
    (["--temperature", "-1"], "argument --temperature: expected a finite number of 0 or more, got -1"),
    (["--top-k", "0"], "argument --top-k: expected a positive integer, got 0"),
    (["--top-k", "two"], "argument --top-k: expected a positive integer, got two"),
])
def test_generate_refuses_a_temperature_or_top_k_it_cannot_sample_with(cli, tmp_path, flag, says):
    cli.user_error(cli("generate", "--checkpoint", "run", "--image", "a.png", *flag, cwd=tmp_path), says,
                   "generate --help")


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


def test_eval_flags_choose_the_data_and_the_output_but_not_the_figures(cli, memorised, tmp_path, capsys):
    run_dir, _, _ = memorised
    assert main(["eval", "--checkpoint", str(run_dir), "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert (own["n"], own["caption_exact_match"], own["skipped_rows"]) == (20, 1.0, 0) and own["val_loss"] < 0.01
    # --batch-size bounds the memory only: the same figures in batches of 3.
    assert main(["eval", "--checkpoint", str(run_dir), "--json", "--batch-size", "3"]) == 0
    batched = json.loads(capsys.readouterr().out)
    assert batched["n"] == 20 and batched["caption_exact_match"] == 1.0
    assert batched["val_loss"] == pytest.approx(own["val_loss"], rel=1e-5)
    # Without --json: one line with the same figures.
    assert main(["eval", "--checkpoint", str(run_dir)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.endswith(f": val_loss {own['val_loss']:.4f}, caption_exact_match 1.000 on 20 rows"), line
    # --data: images the model never saw, 6 of them, which it cannot caption as well.
    assert main(["data", "synth", "--out", str(tmp_path / "unseen.csv"), "--n", "6", "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir), "--data", str(tmp_path / "unseen.csv"), "--json"]) == 0
    unseen = json.loads(capsys.readouterr().out)
    assert unseen["n"] == 6 and unseen["val_loss"] > 10 * own["val_loss"]


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


def test_data_synth_makes_the_missing_folder_of_its_csv(cli, tmp_path):
    cli.ok(cli("data", "synth", "--n", 2, "--size", 8, "--out", "new/synth.csv", cwd=tmp_path))
    assert header(tmp_path / "new" / "synth.csv") == ["", "b64string_images", "caption"]


@pytest.mark.parametrize("args, says", [
    (["data", "synth", "--out", "folder"], "argument --out: folder is a folder; name a file"),
    (["data", "synth", "--out", "file/s.csv"], "argument --out: cannot write file/s.csv: file is a file"),
    (["data", "synth", "--out", "s.csv", "--png-dir", "file"], "argument --png-dir: file is a file; name a folder"),
    (["plot", "run", "--out", "file"], "argument --out: file is a file; name a folder"),
    (["plan", "--out", "folder"], "argument --out: folder is a folder; name a file"),
])
def test_an_output_path_with_a_file_or_folder_in_the_way_is_one_line(cli, tmp_path, args, says):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("mine\n", encoding="utf-8")
    cli.user_error(cli(*args, cwd=tmp_path), says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"], "nothing is written"


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


def test_a_checkpoint_older_than_decoder_updates_images_loads_with_the_decoder_it_was_trained_with(cli, tiny, tmp_path):
    """Such checkpoints had every decoder block compute the image tokens: the same weights read the other way
    give other logits, silently, so the missing key must load as true."""
    cli.ok(cli("train", *tiny, "model.n_layer=2", "model.decoder_updates_images=true", "train.max_steps=1",
               "run.output_dir=old", cwd=tmp_path))
    checkpoint = tmp_path / "old" / "checkpoints" / "step_000001"
    images, ids = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), torch.randint(4, 10, (2, 8))
    trained, _, _ = load_model_for_inference(checkpoint)
    config = checkpoint / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if "decoder_updates_images" not in line))
    write_manifest(checkpoint)  # as such a checkpoint was written: its manifest agrees with its config
    old, _, cfg = load_model_for_inference(checkpoint)

    assert cfg.model.decoder_updates_images is True
    with torch.no_grad():
        torch.testing.assert_close(old(images, ids)[0], trained(images, ids)[0])
        old.cfg.decoder_updates_images = False  # what the key's default would have made of it
        assert not torch.allclose(old(images, ids)[0], trained(images, ids)[0])


@pytest.mark.parametrize("key, trained_with", [
    ("stem_full_res_width", ["model.stem_full_res_width=0"]),  # no full-resolution convolution
    ("stem_max_width", ["model.stem_max_width=0", "model.image_embed_dim=256"]),  # widening to the ViT's width
])
def test_a_conv_stem_checkpoint_older_than_a_stem_key_still_captions(cli, tiny, synth_data, tmp_path, key,
                                                                     trained_with):
    """Conv-stem checkpoints from before a stem key existed load with the stem they were trained with."""
    _, pngs, _ = synth_data
    cli.ok(cli("train", *tiny, *trained_with, "train.max_steps=1", "run.output_dir=old", cwd=tmp_path))
    checkpoint = tmp_path / "old" / "checkpoints" / "step_000001"
    config = checkpoint / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True) if key not in line))
    write_manifest(checkpoint)  # as such a checkpoint was written: its manifest agrees with its config
    result = cli.ok(cli("generate", "--checkpoint", "old", "--image", pngs / "00.png", cwd=tmp_path))
    assert len(result.stdout.splitlines()) == 1
