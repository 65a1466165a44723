"""Image geometry: how an image of (height, width) becomes tiles and image tokens.

Pure functions shared by the data pipeline, the model checks and the server, so that all of them
agree on tile and token counts. The arithmetic follows transformers' ``LlavaNextProcessor`` and
``LlavaNextImageProcessor`` exactly (parity is tested); ``select_best_resolution`` is theirs.

Terms:
    tile_size: the vision tower's input resolution (336 for CLIP ViT-L/14-336).
    patch_size: the ViT patch size (14); a tile gives (tile_size // patch_size) ** 2 patch features.
    pinpoints: anyres candidate resolutions as (height, width), multiples of ``tile_size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers.image_processing_utils import select_best_resolution

Size = tuple[int, int]
"""(height, width) in pixels."""


def best_anyres_resolution(image_size: Size, pinpoints: Sequence[Size]) -> Size:
    """The pinpoint that keeps the most of the image's resolution while wasting the least area.

    Args:
        image_size: original (height, width).
        pinpoints: candidate (height, width) canvases.

    Returns:
        The chosen (height, width) canvas.
    """
    height, width = select_best_resolution(tuple(image_size), [list(p) for p in pinpoints])
    return int(height), int(width)


def fit_within(image_size: Size, canvas: Size) -> Size:
    """Size of the image resized to fit ``canvas`` with its aspect ratio kept (anyres step 1).

    Returns:
        (height, width) with one side equal to the canvas side and the other no larger than it.
    """
    height, width = image_size
    canvas_height, canvas_width = canvas
    scale_w, scale_h = canvas_width / width, canvas_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_height), canvas_width
    return canvas_height, min(math.ceil(width * scale_h), canvas_width)


def anyres_grid_shape(image_size: Size, pinpoints: Sequence[Size], tile_size: int) -> Size:
    """Rows and columns of tiles an anyres image is cut into (the base image not counted)."""
    canvas_height, canvas_width = best_anyres_resolution(image_size, pinpoints)
    return canvas_height // tile_size, canvas_width // tile_size


def anyres_tile_count(image_size: Size, pinpoints: Sequence[Size], tile_size: int) -> int:
    """Tiles per anyres image: the downscaled whole image plus rows x cols grid tiles."""
    rows, cols = anyres_grid_shape(image_size, pinpoints, tile_size)
    return 1 + rows * cols


def unpadded_feature_shape(image_size: Size, grid_shape: Size, patches_per_side: int) -> Size:
    """(rows, cols) of patch features left after ``spatial_unpad`` removes the letterbox padding.

    Args:
        image_size: original (height, width).
        grid_shape: (rows, cols) of tiles.
        patches_per_side: tile_size // patch_size.
    """
    height, width = image_size
    current_height = patches_per_side * grid_shape[0]
    current_width = patches_per_side * grid_shape[1]
    if width / height > current_width / current_height:
        new_height = int(round(height * (current_width / width), 7))
        current_height -= 2 * ((current_height - new_height) // 2)
    else:
        new_width = int(round(width * (current_height / height), 7))
        current_width -= 2 * ((current_width - new_width) // 2)
    return current_height, current_width


def image_token_count(
    image_size: Size,
    *,
    anyres: bool,
    tile_size: int,
    patch_size: int,
    pinpoints: Sequence[Size] | None = None,
) -> int:
    """How many image tokens one image becomes in the token sequence.

    LLaVA-1.5 (``square``/``pad``): one tile of patch features, (tile_size / patch_size)^2 = 576.
    LLaVA-NeXT (``anyres``): the base tile, plus the unpadded grid features, plus one image-newline
    token per feature row (at most 2928 for the default pinpoints at 336 px).

    Args:
        image_size: original (height, width) of the image.
        anyres: whether the image is tiled with anyres (LLaVA-NeXT).
        tile_size: vision tower input resolution.
        patch_size: ViT patch size.
        pinpoints: anyres candidate resolutions; required when ``anyres``.
    """
    patches_per_side = tile_size // patch_size
    base = patches_per_side * patches_per_side
    if not anyres:
        return base
    if not pinpoints:
        raise ValueError("anyres image token counts need the pinpoints")
    grid = anyres_grid_shape(image_size, pinpoints, tile_size)
    rows, cols = unpadded_feature_shape(image_size, grid, patches_per_side)
    return base + rows * cols + rows
