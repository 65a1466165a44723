"""Turn a decoded RGB image into uint8 tiles for the vision tower (``square``, ``pad``, ``anyres``).

Tiles stay uint8 (4x smaller than float32 in Arrow, the object store and Parquet);
``normalize_tiles`` turns them into the tower's float input on the training or serving device.
Every resize is a PIL bicubic resize of the uint8 image, the same operation the PIL backend of
transformers' Llava/LlavaNext image processors performs, so normalised tiles equal the saved
checkpoint's processor output (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from llava_platform.data.geometry import Size, best_anyres_resolution, fit_within
from llava_platform.data.images import ImageTooLargeError

RESAMPLE = Image.Resampling.BICUBIC


def _to_chw(image: Image.Image) -> np.ndarray:
    """(H, W, 3) PIL image -> (3, H, W) contiguous, writable uint8 array."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def _resize_shortest_edge_and_crop(image: Image.Image, tile_size: int) -> Image.Image:
    """CLIP preprocessing: shortest edge to ``tile_size`` (bicubic), then a centred square crop."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(tile_size * long / short)
    new_size = (tile_size, new_long) if width <= height else (new_long, tile_size)
    resized = image.resize(new_size, RESAMPLE) if new_size != image.size else image
    left = (resized.width - tile_size) // 2
    top = (resized.height - tile_size) // 2
    return resized.crop((left, top, left + tile_size, top + tile_size))


def tile_square(image: Image.Image, tile_size: int) -> np.ndarray:
    """``square`` mode (LLaVA-1.5 stage 1): resize the shortest edge and centre-crop.

    Returns:
        uint8 array of shape (1, 3, tile_size, tile_size).
    """
    return _to_chw(_resize_shortest_edge_and_crop(image, tile_size))[None]


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of its longest side filled with ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def tile_pad(image: Image.Image, tile_size: int, background: tuple[int, int, int]) -> np.ndarray:
    """``pad`` mode (LLaVA-1.5 stage 2): expand to a square of the image-mean colour, then resize.

    Args:
        background: RGB fill, ``int(255 * mean)`` per channel of the tower's normalisation mean.

    Returns:
        uint8 array of shape (1, 3, tile_size, tile_size).
    """
    return _to_chw(_resize_shortest_edge_and_crop(expand_to_square(image, background), tile_size))[None]


def tile_anyres(image: Image.Image, tile_size: int, pinpoints: Sequence[Size]) -> np.ndarray:
    """``anyres`` mode (LLaVA-NeXT): base image plus a grid of tiles from the best pinpoint.

    The image is resized into the best pinpoint keeping its aspect ratio, centred on a black canvas
    of that pinpoint, and cut row-major into ``tile_size`` tiles; tile 0 is the whole image squashed
    to ``tile_size`` x ``tile_size``.

    Returns:
        uint8 array of shape (1 + rows * cols, 3, tile_size, tile_size).
    """
    width, height = image.size
    canvas_height, canvas_width = best_anyres_resolution((height, width), pinpoints)
    new_height, new_width = fit_within((height, width), (canvas_height, canvas_width))
    resized = image.resize((new_width, new_height), RESAMPLE)
    canvas = np.zeros((3, canvas_height, canvas_width), dtype=np.uint8)
    top, left = (canvas_height - new_height) // 2, (canvas_width - new_width) // 2
    canvas[:, top : top + new_height, left : left + new_width] = _to_chw(resized)
    rows, cols = canvas_height // tile_size, canvas_width // tile_size
    grid = canvas.reshape(3, rows, tile_size, cols, tile_size).transpose(1, 3, 0, 2, 4)
    base = _to_chw(image.resize((tile_size, tile_size), RESAMPLE))
    return np.concatenate([base[None], grid.reshape(rows * cols, 3, tile_size, tile_size)])


def tile_frames(frames: Sequence[Image.Image], tile_size: int) -> np.ndarray:
    """Video frames (OneVision): each RGB frame resized to ``tile_size`` x ``tile_size`` (bicubic, aspect
    ratio not kept), as transformers' ``LlavaOnevisionVideoProcessor`` sizes them.

    Returns:
        uint8 array of shape (num_frames, 3, tile_size, tile_size).
    """
    return np.stack([_to_chw(frame.resize((tile_size, tile_size), RESAMPLE)) for frame in frames])


def intermediate_pixels(image_size: Size, mode: str, tile_size: int) -> int:
    """Pixels of the largest image tiling allocates on the way to its tiles.

    ``pad`` builds a square of the longest side, ``square`` scales the shortest side to the tile
    size: for a 20000 x 2 image either is far larger than the image itself. ``anyres`` never
    exceeds its pinpoint canvas.
    """
    height, width = image_size
    if mode == "pad":
        return max(height, width) ** 2
    if mode == "square":
        return tile_size * int(tile_size * max(height, width) / max(min(height, width), 1))
    return 0


def tile_image(
    image: Image.Image,
    mode: str,
    tile_size: int,
    background: tuple[int, int, int],
    pinpoints: Sequence[Size] | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Tile an RGB image in the recipe's ``mode`` (``square``, ``pad`` or ``anyres``).

    Args:
        max_pixels: refuse images whose tiling would allocate more pixels than this (see
            ``intermediate_pixels``); ``None`` disables the check.

    Returns:
        uint8 array of shape (num_tiles, 3, tile_size, tile_size); num_tiles is 1 except for anyres.

    Raises:
        ImageTooLargeError: the tiling would allocate more than ``max_pixels`` pixels.
    """
    if image.mode != "RGB":
        raise ValueError(f"tile_image needs an RGB image, got mode {image.mode}; decode with decode_image")
    needed = intermediate_pixels((image.height, image.width), mode, tile_size)
    if max_pixels is not None and needed > max_pixels:
        raise ImageTooLargeError(
            f"a {image.width}x{image.height} image needs a {needed}-pixel intermediate in {mode} mode, above the "
            f"limit of {max_pixels}; its aspect ratio is too extreme"
        )
    if mode == "square":
        return tile_square(image, tile_size)
    if mode == "pad":
        return tile_pad(image, tile_size, background)
    if mode == "anyres":
        if not pinpoints:
            raise ValueError("anyres tiling needs pinpoints (model.image_grid_pinpoints)")
        return tile_anyres(image, tile_size, pinpoints)
    raise ValueError(f"unknown image mode {mode!r}; allowed: square, pad, anyres")


def normalize_tiles(tiles: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 tiles -> the vision tower's float input, on whatever device ``tiles`` live on.

    Args:
        tiles: uint8 tensor of shape (..., 3, H, W).
        mean, std: per-channel normalisation in the 0-1 range (the tower's image processor's).

    Returns:
        float32 tensor of the same shape: (tiles / 255 - mean) / std.
    """
    shape = (3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=tiles.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=tiles.device).view(shape)
    return (tiles.to(torch.float32) / 255.0 - mean_t) / std_t
