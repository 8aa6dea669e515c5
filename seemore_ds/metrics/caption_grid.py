"""``captions.png``: held-out images with the model's captions, wrong ones marked in red beside the
reference, so that a user sees at a glance what the model gets wrong (a colour, a count, a place)."""

from __future__ import annotations

import functools
import json
import math
import sys
import textwrap
import warnings
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font

CAPTIONS_FILE = "captions.png"
# The PNG's text chunk under this key holds what was drawn, for tools (and tests) that read the file.
CAPTIONS_METADATA_KEY = "Captions"
RIGHT_COLOR, WRONG_COLOR = "#007a1f", "#c00000"
COLUMNS, WRAP_CHARS = 4, 28
# Matplotlib's own stand-in font: a box naming each character's Unicode block, never the character.
PLACEHOLDER_FONTS = {"Last Resort High-Efficiency"}
_reported_missing: set[str] = set()  # characters this process has named on the console already


@functools.cache
def _characters_of(font_path: str) -> frozenset[int]:
    try:
        return frozenset(FT2Font(font_path).get_charmap())
    except (OSError, RuntimeError):  # a font file FreeType cannot read has no characters for us
        return frozenset()


def font_families(texts: Iterable[str]) -> tuple[list[str], str]:
    """The font families to draw ``texts`` in, and the characters that no installed font has.

    Matplotlib's default font (DejaVu Sans) lacks Chinese, Japanese, Korean, Thai and more, and draws
    each character it lacks as a box. It falls back glyph by glyph along a list of families, so the list
    is the default followed, in name order, by each installed family that has characters still lacking."""
    families = list(matplotlib.rcParams["font.family"])
    default = font_manager.findfont(font_manager.FontProperties(family=families))
    missing = {ord(c) for text in texts for c in text if not c.isspace()} - _characters_of(default)
    for name, path in sorted(_upright_regular_fonts().items()):
        if not missing:
            break
        if name not in PLACEHOLDER_FONTS and missing & _characters_of(path):
            families.append(name)
            missing -= _characters_of(path)
    return families, "".join(sorted(map(chr, missing)))


def _upright_regular_fonts() -> dict[str, str]:
    """Each installed family's file that text in the grid is drawn with: upright, weight nearest regular."""

    def distance(entry: font_manager.FontEntry) -> tuple[bool, int]:
        return entry.style != "normal", abs(font_manager.weight_dict.get(entry.weight, entry.weight) - 400)

    # Nearest last, so that it is the one kept.
    return {entry.name: entry.fname for entry in sorted(font_manager.fontManager.ttflist, key=distance, reverse=True)}


def _missing_note(missing: str) -> str:
    shown = missing[:20] + ("..." if len(missing) > 20 else "")
    return (f"no installed font has {len(missing)} character(s) of these captions ({shown}): captions.png draws "
            f"them as boxes; install a font that has them (the Noto fonts cover most scripts; Noto Sans CJK: Chinese, "
            f"Japanese, Korean), then delete matplotlib's font list "
            f"{Path(matplotlib.get_cachedir()) / 'fontlist-*.json'} so that matplotlib finds it")


def caption_grid_figure(images: np.ndarray, predicted: list[str], references: list[str], title: str,
                        fonts: tuple[list[str], str] | None = None) -> Figure:
    """A grid of uint8 images (N, 3, S, S), each titled by its predicted caption: green when it equals
    the reference, red with a cross and the reference beneath when it does not. ``fonts``: font_families
    of the title and captions, where the caller has it already."""
    n = len(predicted)
    rows = max(1, math.ceil(n / COLUMNS))
    right = sum(p == r for p, r in zip(predicted, references))
    families, missing = fonts or font_families([title, *predicted, *references])
    note = f"\n(□: {len(missing)} character(s) no installed font has)" if missing else ""
    with matplotlib.rc_context({"font.family": families}):  # the text made in here keeps these fonts
        fig = Figure(figsize=(2.6 * COLUMNS, 3.3 * rows), layout="constrained")
        axes = fig.subplots(rows, COLUMNS, squeeze=False).ravel()
        fig.suptitle(f"{title}: {right} of {n} captions right{note}", fontsize="medium")
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
    fonts = font_families([title, *predicted, *references])
    fig = caption_grid_figure(images, predicted, references, title, fonts)
    drawn = [{"predicted": p, "reference": r, "right": p == r} for p, r in zip(predicted, references)]
    missing = fonts[1]
    with warnings.catch_warnings():
        if missing:  # named once below, not once per character and drawing as matplotlib would
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(out, dpi=100, metadata={CAPTIONS_METADATA_KEY: json.dumps(drawn)})
    if set(missing) - _reported_missing:
        _reported_missing.update(missing)
        print(f"note: {_missing_note(missing)}", file=sys.stderr, flush=True)
    return out
