"""Do the default settings learn a dataset unlike the built-in one?

    python -m bench.learns_other_data [--n 3000] [--out runs/other_data] [key=value ...]

Writes a seemore CSV of its own kind: non-square JPEGs (96x72) on random colour backgrounds with
one to three polygons (diamond, hexagon, star, ring) of a random colour, size and place, captioned
only by count and shape ("two hexagons"). Colour is never in the caption, so the model has to
tell shapes apart. Then trains with the defaults (plus any overrides) and prints the held-out
exact match from ``eval --json``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from seemore_ds.data.csv_reader import CAPTION_COLUMN, IMAGE_COLUMN

SHAPES = ("diamond", "hexagon", "star", "ring")
COUNTS = ("one", "two", "three")


def polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    # five-pointed star: alternate outer and inner radius
    return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
             cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]


def draw_example(rng: random.Random) -> tuple[Image.Image, str]:
    width, height = 96, 72
    background = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    shape, count = rng.choice(SHAPES), rng.randint(1, 3)
    fill = tuple((c + rng.randint(80, 176)) % 256 for c in background)  # always far from the background
    placed = []
    while len(placed) < count:
        r = rng.uniform(8, 13)
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
            placed.append((cx, cy, r))
    for cx, cy, r in placed:
        if shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r / 3)))
        else:
            draw.polygon(polygon(shape, cx, cy, r), fill=fill)
    caption = f"{COUNTS[count - 1]} {shape}{'s' if count > 1 else ''}"
    return img, caption


def write_dataset(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", CAPTION_COLUMN, IMAGE_COLUMN])  # other column order than seemore's
        for i in range(n):
            img, caption = draw_example(rng)
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=90)
            writer.writerow([f"img-{i}", caption, base64.b64encode(buffer.getvalue()).decode("ascii")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/other_data")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "polygons.csv"
    write_dataset(csv_path, args.n, args.seed)
    run = out / "run"
    python = [sys.executable, "-m", "seemore_ds"]
    subprocess.run([*python, "train", f"data.csv={csv_path}", f"run.output_dir={run}", "train.backend=torch",
                    *args.overrides], check=True)
    result = subprocess.run([*python, "eval", "--checkpoint", str(run), "--json"], check=True,
                            capture_output=True, text=True)
    print(json.dumps({"bench": "learns_other_data", "n": args.n, **json.loads(result.stdout)}))


if __name__ == "__main__":
    main()
