"""The built-in caption dataset: coloured shapes of two sizes at five places, drawn by our own code.

Every caption word is read from the pixels (size, colour, shape, position), so a model cannot do
better than chance on any word without looking at the image. Deterministic from the seed.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220),
    "yellow": (235, 215, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.22, "large": 0.40}  # shape extent as a fraction of the image side
PLACES = {  # centre of the shape as fractions of the image side
    "top left": (0.27, 0.27), "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73), "center": (0.5, 0.5),
}


def caption_for(size: str, color: str, shape: str, place: str) -> str:
    where = "in the center" if place == "center" else f"at the {place}"
    return f"a {size} {color} {shape} {where}"


def draw_shape(size_px: int, size: str, color: str, shape: str, place: str, rng: random.Random) -> Image.Image:
    """One RGB image: a noisy grey background with one shape, its position jittered slightly."""
    shade = rng.randint(200, 245)
    img = Image.new("RGB", (size_px, size_px), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    for _ in range(size_px // 4):  # speckles, so that no two backgrounds are alike
        x, y = rng.randrange(size_px), rng.randrange(size_px)
        grey = rng.randint(150, 255)
        draw.point((x, y), fill=(grey, grey, grey))
    half = SIZES[size] * size_px / 2 * rng.uniform(0.9, 1.1)
    cx, cy = (f * size_px + rng.uniform(-0.04, 0.04) * size_px for f in PLACES[place])
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    else:  # cross
        arm = half / 3
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
    return img


def synthetic_dataset(n: int, seed: int, size_px: int = 64) -> tuple[list[Image.Image], list[str]]:
    """n images and captions, every attribute drawn uniformly at random from the seed."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(n):
        attrs = (rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(PLACES)))
        images.append(draw_shape(size_px, *attrs, rng))
        captions.append(caption_for(*attrs))
    return images, captions
