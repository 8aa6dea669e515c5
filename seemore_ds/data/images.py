"""Image bytes -> uint8 RGB arrays of the model's size, refusing what cannot or should not be decoded."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from seemore_ds.errors import UserError


class BadImage(ValueError):
    """An image that cannot be turned into pixels; the message is the reason reported."""


def decode_base64_image(b64: str, img_size: int, max_pixels: int) -> np.ndarray:
    """base64 text (optionally a data: URI) -> uint8 (3, img_size, img_size), or BadImage saying why not."""
    b64 = "".join(b64.split())
    if not b64:
        raise BadImage("empty image cell")
    if b64.startswith("data:") and "," in b64:  # data:image/png;base64,....
        b64 = b64.split(",", 1)[1]
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("not valid base64") from None
    return decode_image_bytes(raw, img_size, max_pixels)


def decode_image_bytes(raw: bytes, img_size: int, max_pixels: int) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> uint8 (3, img_size, img_size), or BadImage saying why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(f"image of {width}x{height} pixels exceeds data.max_image_pixels={max_pixels}")
            img.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("image refused as a decompression bomb") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated image" if "truncated" in str(err).lower() else f"unreadable image ({err})"
        raise BadImage(reason) from None
    return to_rgb_array(img, img_size)


def read_image_file(path: str, img_size: int, max_pixels: int) -> np.ndarray:
    """An image file from disk, with a one-line UserError for a missing or undecodable file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err.strerror}") from None
    try:
        return decode_image_bytes(raw, img_size, max_pixels)
    except BadImage as err:
        raise UserError(f"image {path}: {err}") from None


def to_rgb_array(img: Image.Image, img_size: int) -> np.ndarray:
    """Any PIL mode -> RGB (transparency composited on white), resized, as uint8 (3, H, W)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("RGB")
    if img.size != (img_size, img_size):
        img = img.resize((img_size, img_size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
