"""Decode image bytes into an RGB PIL image safely: size limit first, EXIF orientation, any mode.

Errors are ``ImageDecodeError`` subclasses (``SampleError``s) with a ``reason`` code, so the data
pipeline can quarantine and count them and the server can answer 4xx.
"""

from __future__ import annotations

import io
import re
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_platform.data.errors import SampleError


class ImageDecodeError(SampleError):
    """An image that cannot be used."""

    reason = "bad_image"


class EmptyImageError(ImageDecodeError):
    reason = "empty_image"


class UndecodableImageError(ImageDecodeError):
    reason = "undecodable_image"


class ImageTooLargeError(ImageDecodeError):
    reason = "image_too_large"


class ImageAspectRatioError(ImageDecodeError):
    reason = "extreme_aspect_ratio"


_CORRUPT = (OSError, SyntaxError, ValueError, struct.error, EOFError)
"""What Pillow's decoders raise on damaged files (found by fuzzing: not only OSError)."""


def decode_image(data: bytes, max_pixels: int, max_aspect_ratio: float | None = None) -> Image.Image:
    """Decode bytes to an upright RGB image, refusing oversized ones before any pixel is allocated.

    Args:
        data: encoded image (JPEG, PNG, WebP, GIF, TIFF, ...).
        max_pixels: width * height above which the image is refused (decompression-bomb guard).
        max_aspect_ratio: longer side / shorter side above which the image is refused, or ``None``.
            A 200 x 250,000 strip passes any pixel limit but makes every tiling mode slow.

    Returns:
        A fully loaded PIL image in mode ``RGB``, EXIF orientation applied.

    Raises:
        EmptyImageError: zero bytes.
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ImageAspectRatioError: sides further apart than ``max_aspect_ratio``.
        UndecodableImageError: not an image, or truncated / corrupt.
    """
    if not data:
        raise EmptyImageError("image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns or raises on a global limit; ours is explicit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # Pillow's own limit fired first, from the header
        raise ImageTooLargeError(
            f"image is {_claimed_pixels(err)} pixels, above the limit of {min(max_pixels, _pillow_limit())}; "
            "Pillow refused it as a decompression bomb before decoding"
        ) from err
    except (UnidentifiedImageError, *_CORRUPT) as err:
        raise UndecodableImageError(f"not a decodable image: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}; "
            "downscale it or raise data.max_image_pixels"
        )
    if width == 0 or height == 0:
        raise UndecodableImageError(f"image has no pixels ({width}x{height})")
    if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
        raise ImageAspectRatioError(
            f"image is {width}x{height}, an aspect ratio of {max(width, height) / min(width, height):.1f}:1, "
            f"above the limit of {max_aspect_ratio:g}:1; crop it into parts"
        )
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the whole image when upright
        return to_rgb(image)
    except _CORRUPT as err:
        raise UndecodableImageError(f"truncated or corrupt image: {err}") from err


def _claimed_pixels(error: Image.DecompressionBombError) -> str:
    """The pixel count in Pillow's message ("Image size (N pixels) exceeds limit of ..."), as text."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return found.group(1) if found else "more"


def _pillow_limit() -> int:
    """Pillow raises ``DecompressionBombError`` above twice ``Image.MAX_IMAGE_PIXELS`` (it only warns below)."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 2**63


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way a viewer would show it.

    - transparency (RGBA, LA, P with a transparent index) is composited on white, as
      transformers' ``convert_to_rgb`` does;
    - 16-/32-bit integer greyscale (I;16, I) is scaled to 8 bits instead of being clipped;
    - CMYK, YCbCr, L, 1, P go through Pillow's conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        if image.mode == "F" and pixels.max() <= 1.0:
            peak = 1.0
        scaled = np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
