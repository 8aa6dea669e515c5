"""Caption datasets unlike each other, each asking the model for a different skill, written as seemore
CSVs by our own code (no downloads). Every caption word is read from the pixels.

- shapes: the built-in data (size, colour, shape, place of one shape on a speckled grey ground)
- polygons: one to three polygons of one kind on a random colour, captioned by count and kind only
- relations: two shapes and where the larger lies relative to the smaller ("the red circle is left of the blue square")
- glyphs: two to four digits and capital letters drawn in a bitmap font, captioned by what they read
- textures: a whole-image pattern (stripes of three orientations, checks, dots), coarse or fine, in one colour
- clutter: one to five red dots among grey and blue distractors, captioned by the red count
"""

from __future__ import annotations

import base64
import csv
import io
import math
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from bench import learns_other_data
from seemore_ds.data.csv_reader import CAPTION_COLUMN, IMAGE_COLUMN
from seemore_ds.data.synthetic import COLORS, caption_for, draw_shape, PLACES, SHAPES, SIZES

SIDE = 64  # pixels; the default model's img_size
COUNTS = ("one", "two", "three", "four", "five")
Example = tuple[Image.Image, str]


def shapes(rng: random.Random) -> Example:
    attrs = (rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(PLACES)))
    return draw_shape(SIDE, *attrs, rng), caption_for(*attrs)


def polygons(rng: random.Random) -> Example:
    return learns_other_data.draw_example(rng)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)


def relations(rng: random.Random) -> Example:
    """The larger shape is named first, so that one caption fits each image: with either shape first,
    "the red circle is left of the blue square" and "the blue square is right of the red circle" would
    describe the same picture and no model could tell which the caption says."""
    img = Image.new("RGB", (SIDE, SIDE), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    (c1, c2), (s1, s2) = rng.sample(["red", "green", "blue", "yellow"], 2), rng.sample(["circle", "square", "triangle"], 2)
    relation = rng.choice(["left of", "right of", "above", "below"])
    near, far, along = rng.uniform(0.2, 0.35) * SIDE, rng.uniform(0.65, 0.8) * SIDE, rng.uniform(0.2, 0.8) * SIDE
    jitter = rng.uniform(-0.08, 0.08) * SIDE
    first, second = {"left of": ((near, along), (far, along + jitter)), "right of": ((far, along), (near, along + jitter)),
                     "above": ((along, near), (along + jitter, far)), "below": ((along, far), (along + jitter, near))}[relation]
    _draw(draw, s1, *first, SIDE * 0.13, COLORS[c1])
    _draw(draw, s2, *second, SIDE * 0.08, COLORS[c2])
    return img, f"the {c1} {s1} is {relation} the {c2} {s2}"


GLYPHS = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"


def glyph_text_and_origin(rng: random.Random, draw: ImageDraw.ImageDraw, font, side: int) -> tuple[str, tuple[int, int]]:
    """Two to four characters, and where to draw them so that all of their pixels land on a side x side
    canvas. The origin is in whole pixels: from a fractional one Pillow drops the text's top row of
    pixels, and a 7 then reads as a /. Text too wide for the canvas (about one in a hundred) is drawn anew."""
    while True:
        text = "".join(rng.choice(GLYPHS) for _ in range(rng.randint(2, 4)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= side and bottom - top <= side:
            return text, (rng.randint(0, side - (right - left)) - left, rng.randint(0, side - (bottom - top)) - top)


def glyphs(rng: random.Random) -> Example:
    ink = rng.randint(0, 90)
    # Drawn small in PIL's built-in font, then scaled up: readable at 64 px, no font files needed.
    small, font = Image.new("RGB", (SIDE // 2, SIDE // 2), (rng.randint(190, 255),) * 3), ImageFont.load_default(size=11)
    draw = ImageDraw.Draw(small)
    text, origin = glyph_text_and_origin(rng, draw, font, SIDE // 2)
    draw.text(origin, text, fill=(ink, ink, ink), font=font)
    return small.resize((SIDE, SIDE), Image.NEAREST), f"it reads {' '.join(text)}"


def textures(rng: random.Random) -> Example:
    pattern, scale = rng.choice(["vertical stripes", "horizontal stripes", "diagonal stripes", "checks", "dots"]), \
        rng.choice(["fine", "coarse"])
    color = rng.choice(["red", "green", "blue", "orange"])
    period = rng.randint(4, 6) if scale == "fine" else rng.randint(12, 16)
    ground = Image.new("RGB", (SIDE, SIDE), (245, 245, 245))
    pixels, ink, offset = ground.load(), COLORS[color], rng.randrange(period)
    for y in range(SIDE):
        for x in range(SIDE):
            u, v = (x + offset) % period < period / 2, (y + offset) % period < period / 2
            on = {"vertical stripes": u, "horizontal stripes": v, "diagonal stripes": (x + y + offset) % period < period / 2,
                  "checks": u != v,
                  "dots": math.hypot((x + offset) % period - period / 2, (y + offset) % period - period / 2) < period / 4}[pattern]
            if on:
                pixels[x, y] = ink
    return ground, f"{scale} {color} {pattern}"


def clutter(rng: random.Random) -> Example:
    img = Image.new("RGB", (SIDE, SIDE), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    count = rng.randint(1, 5)
    colors = [(210, 30, 30)] * count + [rng.choice([(120, 120, 120), (60, 90, 210)]) for _ in range(rng.randint(3, 8))]
    placed: list[tuple[float, float]] = []
    r = 3.5
    while len(placed) < len(colors):
        cx, cy = rng.uniform(r, SIDE - r), rng.uniform(r, SIDE - r)
        if all(math.hypot(cx - x, cy - y) > 2 * r + 2 for x, y in placed):
            placed.append((cx, cy))
    for (cx, cy), fill in zip(placed, colors):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    return img, f"{COUNTS[count - 1]} red dot{'s' if count > 1 else ''}"


FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "shapes": shapes, "polygons": polygons, "relations": relations, "glyphs": glyphs, "textures": textures,
    "clutter": clutter,
}


def write_family_csv(family: str, path: Path, n: int, seed: int) -> Path:
    """n examples of one family as a seemore CSV of JPEGs (quality 90), deterministic from the seed."""
    draw_example, rng = FAMILIES[family], random.Random(seed)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([IMAGE_COLUMN, CAPTION_COLUMN])
        for _ in range(n):
            img, caption = draw_example(rng)
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=90)
            writer.writerow([base64.b64encode(buffer.getvalue()).decode("ascii"), caption])
    return path
