"""captions.png: what it draws (the model's own captions, wrong ones marked beside the reference),
written at a run's last evaluation (and at earlier ones minutes apart) and by ``plot RUN`` from the run's latest
checkpoint."""

from __future__ import annotations

import io
import json
import unicodedata
import warnings

import numpy as np
import torch
from PIL import Image

from seemore_ds.checkpoint import load_model_for_inference
from seemore_ds.evaluation import generate_captions, held_out_data
from seemore_ds.metrics import caption_grid
from seemore_ds.metrics.caption_grid import (CAPTIONS_FILE, CAPTIONS_METADATA_KEY, WRONG_COLOR, caption_grid_figure,
                                             font_families, write_caption_grid)
from seemore_ds import validator
from seemore_ds.config import load_config
from seemore_ds.validator import CAPTION_SAMPLES, CAPTIONS_REDRAW_S, Validator


def solid_images(n: int, size: int = 8) -> np.ndarray:
    """n flat-coloured uint8 images (n, 3, S, S), each one distinct."""
    images = np.zeros((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        images[i, i % 3] = 40 + 30 * i
    return images


def drawn_captions(png) -> list[dict]:
    return json.loads(Image.open(png).text[CAPTIONS_METADATA_KEY])


def red_pixels(png) -> int:
    """Pixels of the colour wrong captions are drawn in (anti-aliasing spares their cores)."""
    want = np.array([int(WRONG_COLOR[i:i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(pixels - want).sum(axis=-1) < 30).sum())


def test_the_grid_shows_each_image_with_its_caption_and_marks_the_wrong_ones():
    images = solid_images(5)
    predicted = ["a red circle", "two blue squares", "a green cross", "", "a star"]
    references = ["a red circle", "three blue squares", "a green cross", "a dot", "a star"]
    fig = caption_grid_figure(images, predicted, references, "run")
    axes = fig.axes
    assert len(axes) == 8  # two rows of four; the last three left blank
    for ax, image, caption, reference in zip(axes, images, predicted, references):
        np.testing.assert_array_equal(ax.images[0].get_array(), image.transpose(1, 2, 0))
        title = ax.get_title().replace("\n", " ")
        if caption == reference:
            assert title == caption and ax.get_xlabel() == "" and ax.title.get_color() != WRONG_COLOR
        else:
            assert title == (f"✗ {caption}" if caption else "✗") and ax.title.get_color() == WRONG_COLOR
            assert ax.get_xlabel().replace("\n", " ") == f"ref: {reference}"
    assert all(not ax.images and not ax.axison for ax in axes[5:])
    assert fig._suptitle.get_text() == "run: 3 of 5 captions right"


def test_the_png_is_red_only_where_a_caption_is_wrong(tmp_path):
    images = solid_images(4)
    references = ["a red circle", "two blue squares", "a green cross", "a dot"]
    predicted = ["a red circle", "two blue squares", "three green crosses", "a dot"]
    right = write_caption_grid(images, references, references, tmp_path / "right.png", "run")
    wrong = write_caption_grid(images, predicted, references, tmp_path / "wrong.png", "run")
    assert red_pixels(right) == 0 and red_pixels(wrong) > 20
    assert [c["right"] for c in drawn_captions(wrong)] == [True, True, False, True]


def glyph_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_characters_the_default_font_lacks_come_from_another_installed_font():
    """Matplotlib ships STIX beside DejaVu Sans; a letter only STIX has is drawn in STIX, not as a box."""
    default, stix = (caption_grid._upright_regular_fonts()[name] for name in ("DejaVu Sans", "STIXGeneral"))
    letter = next(chr(c) for c in sorted(caption_grid._characters_of(stix) - caption_grid._characters_of(default))
                  if unicodedata.category(chr(c)).startswith("L"))
    families, missing = font_families([f"a {letter} b", "plain"])
    assert missing == "" and families[-1] == "STIXGeneral"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = caption_grid_figure(solid_images(1), [f"a {letter} b"], ["a b"], "run")
        fig.savefig(io.BytesIO(), format="png")
    assert glyph_warnings(caught) == []
    assert "STIXGeneral" in fig.axes[0].title.get_fontfamily()


def test_characters_no_font_has_are_named_once_not_warned_per_glyph(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(caption_grid, "_reported_missing", set())
    unassigned = "\u0378"  # no character has this code point, so no font draws it
    predicted, references = [f"x{unassigned}", "a b"], ["x", "a b"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("first.png", "second.png"):
            write_caption_grid(solid_images(2), predicted, references, tmp_path / name, "run")
    assert glyph_warnings(caught) == []
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: no installed font has 1 character(s)") and unassigned in notes[0]
    assert drawn_captions(tmp_path / "first.png")[0]["predicted"] == f"x{unassigned}"  # the metadata keeps the text
    fig = caption_grid_figure(solid_images(2), predicted, references, "run")
    assert fig._suptitle.get_text() == "run: 1 of 2 captions right\n(□: 1 character(s) no installed font has)"


def test_a_run_and_plot_draw_the_models_own_captions(tiny_run, cli, tmp_path):
    """The run's captions.png (last evaluation) and plot's (latest checkpoint) hold exactly the captions
    the final model writes for the first held-out images, beside their references."""
    model, tokenizer, cfg = load_model_for_inference(tiny_run.run_dir)
    data = held_out_data(cfg)
    n = min(CAPTION_SAMPLES, len(data))
    expected = [{"predicted": p, "reference": r, "right": p == r}
                for p, r in zip(generate_captions(model, data.images_at(torch.arange(n)), tokenizer), data.captions[:n])]
    assert n == len(data) > 0 and len({c["predicted"] for c in expected}) >= 1
    assert drawn_captions(tiny_run.run_dir / CAPTIONS_FILE) == expected
    result = cli.ok(cli("plot", tiny_run.run_dir, "--out", "again", cwd=tmp_path))
    assert result.stdout.splitlines()[-1] == f"again/{CAPTIONS_FILE}"
    assert drawn_captions(tmp_path / "again" / CAPTIONS_FILE) == expected


def test_the_grid_is_drawn_at_the_last_evaluation_and_minutes_apart_before_it_or_every_time_for_wandb(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(validator.time, "monotonic", lambda: clock[0])
    quiet = Validator(load_config(None, []), backend=None, split=None, tokenizer=None, is_main=True)
    with_wandb = Validator(load_config(None, ["wandb.enabled=true"]), backend=None, split=None, tokenizer=None, is_main=True)
    clock[0] += 60
    assert not quiet._draws_captions(last=False) and quiet._draws_captions(last=True)
    assert with_wandb._draws_captions(last=False)
    clock[0] += CAPTIONS_REDRAW_S
    assert quiet._draws_captions(last=False)
