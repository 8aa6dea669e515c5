"""The benchmark's dataset families: each writes a seemore CSV that our reader takes whole, with
captions the default model can hold and enough of them to be a task, the same from the same seed."""

from __future__ import annotations

import pytest

from bench.caption_families import FAMILIES, write_family_csv
from seemore_ds.config import load_config
from seemore_ds.data.dataset import load_caption_data


@pytest.mark.parametrize("family", FAMILIES)
def test_family_csv_loads_whole_and_is_a_task(family, tmp_path):
    path = write_family_csv(family, tmp_path / f"{family}.csv", n=60, seed=0)
    data = load_caption_data(load_config(None, []), str(path))
    assert len(data) == 60 and not data.bad_rows  # every caption fits model.max_caption_len
    assert len(set(data.captions)) >= 5  # no caption a model could learn without looking
    assert data.images.float().std() > 10  # images with content, not a flat colour
    assert write_family_csv(family, tmp_path / "again.csv", n=60, seed=0).read_bytes() == path.read_bytes()


def test_relations_caption_is_read_from_the_pixels():
    """Which shape a relations caption names first must show in the image (the larger one): a caption
    the picture does not settle caps exact match at what guessing gets. A reader of colours, areas and
    centroids recovers every caption's colours and relation."""
    import random

    import numpy as np

    from bench.caption_families import relations
    from seemore_ds.data.synthetic import COLORS

    rng = random.Random(0)
    for _ in range(200):
        image, caption = relations(rng)
        pixels = np.asarray(image).astype(int)
        blobs = []  # (area, centroid x, centroid y, colour) of each shape colour present
        for name, rgb in COLORS.items():
            ys, xs = np.nonzero((np.abs(pixels - rgb).sum(axis=2) == 0))
            if len(xs):
                blobs.append((len(xs), xs.mean(), ys.mean(), name))
        (_, x1, y1, first), (_, x2, y2, second) = sorted(blobs, reverse=True)
        dx, dy = x1 - x2, y1 - y2
        relation = ("left of" if dx < 0 else "right of") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        words = caption.split()
        assert (words[1], words[4], words[-2]) == (first, relation.split()[0], second), caption


def test_glyphs_draw_every_pixel_of_their_text():
    """A glyphs caption names every character, so every pixel of them must be on the image: a 7 that
    loses its top bar reads as a /. Each text drawn where the family draws it has the ink it has on a
    canvas with room to spare."""
    import random

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from bench.caption_families import glyph_text_and_origin

    rng, font, side, margin = random.Random(0), ImageFont.load_default(size=11), 32, 16
    for _ in range(500):
        canvas, roomy = Image.new("L", (side, side), 255), Image.new("L", (side + 2 * margin,) * 2, 255)
        text, (x, y) = glyph_text_and_origin(rng, ImageDraw.Draw(canvas), font, side)
        ImageDraw.Draw(canvas).text((x, y), text, fill=0, font=font)
        ImageDraw.Draw(roomy).text((x + margin, y + margin), text, fill=0, font=font)
        assert (255 - np.asarray(canvas, dtype=int)).sum() == (255 - np.asarray(roomy, dtype=int)).sum(), text
