"""``captions.png``: held-out images with the model's captions, wrong ones marked in red beside the
reference, so that a user sees at a glance what the model gets wrong (a colour, a count, a place)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

CAPTIONS_FILE = "captions.png"
# The PNG's text chunk under this key holds what was drawn, for tools (and tests) that read the file.
CAPTIONS_METADATA_KEY = "Captions"
RIGHT_COLOR, WRONG_COLOR = "#007a1f", "#c00000"
COLUMNS, WRAP_CHARS = 4, 28


def caption_grid_figure(images: np.ndarray, predicted: list[str], references: list[str], title: str) -> Figure:
    """A grid of uint8 images (N, 3, S, S), each titled by its predicted caption: green when it equals
    the reference, red with a cross and the reference beneath when it does not."""
    n = len(predicted)
    rows = max(1, math.ceil(n / COLUMNS))
    fig = Figure(figsize=(2.6 * COLUMNS, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, COLUMNS, squeeze=False).ravel()
    right = sum(p == r for p, r in zip(predicted, references))
    fig.suptitle(f"{title}: {right} of {n} captions right", fontsize="medium")
    for ax, image, caption, reference in zip(axes, images, predicted, references):
        ax.imshow(np.transpose(image, (1, 2, 0)), interpolation="nearest")
        if caption == reference:
            ax.set_title(_wrap(caption), color=RIGHT_COLOR, fontsize="small")
        else:
            ax.set_title(_wrap(f"✗ {caption}"), color=WRONG_COLOR, fontsize="small")
            ax.set_xlabel(_wrap(f"ref: {reference}"), fontsize="small")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig


def _wrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, WRAP_CHARS)) or "(empty caption)"


def write_caption_grid(images: np.ndarray, predicted: list[str], references: list[str], out: Path,
                       title: str) -> Path:
    """Draw the grid into ``out`` (a PNG), with the captions drawn also kept in its metadata."""
    fig = caption_grid_figure(images, predicted, references, title)
    drawn = [{"predicted": p, "reference": r, "right": p == r} for p, r in zip(predicted, references)]
    fig.savefig(out, dpi=100, metadata={CAPTIONS_METADATA_KEY: json.dumps(drawn)})
    return out
