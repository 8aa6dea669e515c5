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
        # data.max_image_pixels decides, checked on the declared size before any pixel is decoded; Pillow's
        # warning for images over its own limit (PIL.Image.MAX_IMAGE_PIXELS, left as it is) is not ours to
        # print. Scoped to this call: images are decoded in worker processes or the main thread only.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))  # reads the header only: the declared size, no pixels yet
        width, height = img.size
        if width * height > max_pixels:
            raise BadImage(f"image of {width}x{height} pixels exceeds data.max_image_pixels={max_pixels} "
                           f"(refused as a possible decompression bomb)")
        img.load()
    except BadImage:
        raise
    except Image.DecompressionBombError:  # over twice Pillow's limit: Pillow refuses it before we see its size
        raise BadImage(_over_pillow_limit(max_pixels)) from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated image" if "truncated" in str(err).lower() else f"unreadable image ({err})"
        raise BadImage(reason) from None
    return to_rgb_array(img, img_size)


def _over_pillow_limit(max_pixels: int) -> str:
    """Why an image Pillow refuses to open as a decompression bomb is skipped."""
    pillow_limit = 2 * Image.MAX_IMAGE_PIXELS
    if max_pixels < pillow_limit:
        return (f"image of more than {pillow_limit} pixels exceeds data.max_image_pixels={max_pixels} "
                f"(refused as a possible decompression bomb)")
    return (f"image of more than {pillow_limit} pixels exceeds Pillow's decompression-bomb limit "
            f"(twice PIL.Image.MAX_IMAGE_PIXELS), which data.max_image_pixels={max_pixels} does not raise")


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
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8_bit(img)
    img = img.convert("RGB")
    if img.size != (img_size, img_size):
        img = img.resize((img_size, img_size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def _to_8_bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey images -> 8-bit grey; Pillow's own convert clips them at 255."""
    pixels = np.asarray(img).astype(np.float64)
    full_scale = 65535.0 if img.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
    if img.mode == "F" and pixels.min() >= 0 and pixels.max() <= 1:
        full_scale = 1.0  # float images usually hold 0..1
    return Image.fromarray(np.clip(pixels / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
