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


# LLaVA-OneVision (transformers' LlavaOnevisionProcessor / LlavaOnevisionModel; parity is tested).

def anyres_max_feature_shape(feature_shape: Size, patches_per_side: int, max_tiles: int) -> Size:
    """``anyres_max_<N>``: the unpadded grid features, scaled down (bilinear, in the model) to about
    ``max_tiles`` tiles' worth when they are more than 1.1x that (OneVision's cap on a lone image).

    Args:
        feature_shape: (rows, cols) of unpadded grid features (``unpadded_feature_shape``).
        patches_per_side: tile_size // patch_size.
        max_tiles: N of ``anyres_max_N`` (OneVision: 9).

    Returns:
        (rows, cols) of the features the model keeps.
    """
    rows, cols = feature_shape
    ratio = math.sqrt(rows * cols / (max_tiles * patches_per_side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def onevision_image_token_count(
    image_size: Size, *, tile_size: int, patch_size: int, pinpoints: Sequence[Size], max_tiles: int
) -> int:
    """Image tokens of a record's only image in OneVision: the base tile, the unpadded grid features
    capped by ``anyres_max_feature_shape``, and one image-newline token per kept feature row.

    Args:
        image_size: original (height, width).
        tile_size, patch_size: the tower's resolution and patch size (384 / 14 for SigLIP-so400m: 27 x 27 = 729).
        pinpoints: anyres candidate (height, width) canvases.
        max_tiles: N of ``anyres_max_N``.
    """
    patches_per_side = tile_size // patch_size
    grid = anyres_grid_shape(image_size, pinpoints, tile_size)
    features = unpadded_feature_shape(image_size, grid, patches_per_side)
    rows, cols = anyres_max_feature_shape(features, patches_per_side, max_tiles)
    return patches_per_side**2 + rows * cols + rows


def stacked_image_token_count(*, tile_size: int, patch_size: int) -> int:
    """Image tokens of each image of a several-image record in OneVision: one base-size tile of patch
    features (padded to a square, then resized) and one image-newline token. (729 + 1 at 384 px.)"""
    return (tile_size // patch_size) ** 2 + 1


def pooled_frame_side(*, tile_size: int, patch_size: int) -> int:
    """Feature rows (and columns) of a video frame after OneVision's 2x bilinear pooling: ceil(27 / 2) = 14."""
    return math.ceil((tile_size // patch_size) / 2)


def video_token_count(frames: int, *, tile_size: int, patch_size: int) -> int:
    """Video tokens in OneVision: each frame's pooled features, then one image-newline token for the video.
    (8 frames at 384 px: 8 x 196 + 1 = 1569.)"""
    return frames * pooled_frame_side(tile_size=tile_size, patch_size=patch_size) ** 2 + 1
