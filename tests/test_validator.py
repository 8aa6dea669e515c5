"""The advice a run leaves when its held-out exact match ended low and still climbing, or near zero: when it is
given, and that a real run prints it."""

from __future__ import annotations

import pytest

from seemore_ds.config import load_config
from seemore_ds.trainer import train
from seemore_ds.validator import Validator

from conftest import TINY


# The model the glyphs measurements quoted below were made with: 16-pixel patches on a ViT twice as wide.
SIXTEEN_PIXEL_MODEL = ["model.patch_size=16", "model.image_embed_dim=128", "model.n_head=8", "model.num_blks=3",
                       "model.n_layer=4"]


def advice(history: list[tuple[int, float]], max_steps: int = 1000,
           model: list[str] = SIXTEEN_PIXEL_MODEL) -> str | None:
    validator = Validator(load_config(None, [f"train.max_steps={max_steps}", *model]), backend=None, split=None,
                          tokenizer=None, is_main=True)
    validator.exact_matches = history
    return validator.longer_run_advice()


def test_a_run_that_ends_low_and_climbing_is_told_to_train_longer():
    # polygons with the 16-pixel model, seed 1 (docs/time_to_quality.md)
    said = advice([(200, 0.237), (400, 0.34), (600, 0.547), (800, 0.703), (1000, 0.8)])
    assert said == ("held-out exact match was still climbing (0.703 at step 800, 0.800 at step 1000): a longer run "
                    "should caption better, e.g. train.max_steps=2000 (docs/time_to_quality.md)")
    assert "train.max_steps=600" in advice([(200, 0.4), (300, 0.6)], max_steps=300)


def test_no_advice_for_a_run_that_learned_stalled_or_did_not_reach_its_end():
    assert advice([(800, 0.9), (1000, 0.95)]) is None  # learned: 0.95 is enough
    assert advice([(800, 0.31), (1000, 0.32)]) is None  # flat: a gain within the wobble between evaluations
    assert advice([(800, 0.03), (1000, 0.05)]) is None  # flat, and no longer near zero
    assert advice([(600, 0.5), (800, 0.78), (900, 0.70), (1000, 0.80)]) is None  # compared with step 800, not 600
    assert advice([(1000, 0.5)]) is None  # eval.every=0: nothing to compare with
    assert advice([(900, 0.1), (1000, 0.5)]) is None  # nothing evaluated at or before step 800
    assert advice([(200, 0.2), (400, 0.5)]) is None  # stopped at step 400 of 1000 by a signal
    assert advice([]) is None


def test_a_run_that_ends_near_zero_is_told_that_some_data_needs_many_times_the_steps():
    # glyphs with the 16-pixel model, seed 1337 (docs/time_to_quality.md): a 4 x 4 patch grid, halved to 8 x 8
    said = advice([(200, 0.0), (400, 0.0), (600, 0.0), (800, 0.003), (1000, 0.007)])
    assert said == ("held-out exact match ended at 0.007: the model captions almost no held-out image right yet; some "
                    "captions take many times the steps (text read off the image: 1,500-1,600 with the default 8-pixel "
                    "patches, about 6,000 with 16-pixel ones), so if these captions can be told from the images, try a "
                    "longer run, e.g. model.patch_size=8 model.image_embed_dim=64 model.n_head=4 train.max_steps=3000 "
                    "(docs/time_to_quality.md)")
    assert ("e.g. model.patch_size=8 model.image_embed_dim=64 model.n_head=4 train.max_steps=150 "
            in advice([(50, 0.0)], max_steps=50))  # eval.every=0 too
    assert "still climbing (0.000 at step 800, 0.040 at step 1000)" in advice([(800, 0.0), (1000, 0.04)])
    # the defaults' 8-pixel patches halved would make a 16 x 16 grid, four times the tokens measured
    assert advice([(1600, 0.0), (2000, 0.0)], max_steps=2000, model=[]).endswith(
        "e.g. train.max_steps=16000 (docs/time_to_quality.md)")


@pytest.mark.parametrize("model, longer", [
    (["model.patch_size=8"], "train.max_steps=8000"),  # halved: a 16 x 16 grid, four times the tokens measured
    (["model.img_size=96", "model.patch_size=16"], "train.max_steps=8000"),  # halved: 12 x 12
    (["model.img_size=63", "model.patch_size=9"], "train.max_steps=8000"),  # an odd patch has no half
    (["model.img_size=32", "model.patch_size=8"],  # halved: 8 x 8, the ViT half as wide with half the heads
     "model.patch_size=4 model.image_embed_dim=64 model.n_head=4 train.max_steps=3000"),
    (["model.img_size=32", "model.patch_size=8", "model.image_embed_dim=96", "model.n_embd=96", "model.n_head=6"],
     "model.patch_size=4 model.image_embed_dim=48 model.n_head=3 train.max_steps=3000"),
    (["model.img_size=32", "model.patch_size=8", "model.n_head=1"], "model.patch_size=4 train.max_steps=3000"),
])
def test_finer_patches_are_named_only_where_the_grid_stays_as_small_as_measured(model, longer):
    model = SIXTEEN_PIXEL_MODEL + model
    assert advice([(800, 0.0), (1000, 0.0)], model=model).endswith(f"e.g. {longer} (docs/time_to_quality.md)")
    load_config(None, ["train.max_steps=1000", *model, *longer.split()])  # what it names is a valid config


def test_the_trainer_prints_the_advice_after_the_run(tmp_path, monkeypatch, capsys, one_torch_thread):
    scripted = iter([0.1, 0.2, 0.5])  # the exact match at steps 2, 4 and 5 (the last)
    monkeypatch.setattr(Validator, "_exact_match", lambda self, model, max_rows: next(scripted))
    cfg = load_config(None, TINY + ["train.max_steps=5", "eval.every=2", "checkpoint.every=0",
                                    f"run.output_dir={tmp_path / 'run'}"])
    train(cfg)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("held-out exact match was still climbing (0.200 at step 4, 0.500 at step 5)")
