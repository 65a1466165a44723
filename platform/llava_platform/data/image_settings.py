"""Image settings read from a checkpoint's processor: the one source of tiling truth.

The data pipeline, the model checks and the server all derive tile size, normalisation, pad colour,
pinpoints and token counts from the processor saved with the checkpoint, so training tiles are
what the exported checkpoint's processor produces at inference (no train/serve skew).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from llava_platform.data.geometry import (
    Size,
    anyres_tile_count,
    image_token_count,
    onevision_image_token_count,
    stacked_image_token_count,
    video_token_count,
)
from llava_platform.data.tiling import tile_frames, tile_image


@dataclass(frozen=True)
class ImageSettings:
    """Everything needed to tile an image and count its tokens, as plain values."""

    tile_size: int
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    pinpoints: tuple[Size, ...] | None = None
    """anyres candidate resolutions; ``None`` for LLaVA-1.5 checkpoints."""
    max_tiles: int | None = None
    """OneVision checkpoints only: N of ``anyres_max_N`` (``None``: not OneVision, one image per sample
    and no video)."""

    @property
    def onevision(self) -> bool:
        """Whether the checkpoint takes several images or a video per sample (LLaVA-OneVision)."""
        return self.max_tiles is not None

    @classmethod
    def from_processor(cls, processor) -> ImageSettings:
        """Read the settings of a ``LlavaProcessor`` / ``LlavaNextProcessor``."""
        image_processor = processor.image_processor
        crop, size = image_processor.crop_size, image_processor.size
        tile_size = crop["height"] if crop else size.get("shortest_edge") or size["height"]
        pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
        aspect = getattr(processor, "vision_aspect_ratio", None)  # "anyres_max_9" on LlavaOnevisionProcessor
        if hasattr(processor, "patch_size"):
            patch_size = int(processor.patch_size)
        else:  # OneVision's processor knows a tile's patch features (CLS included) instead
            patch_size = int(tile_size) // math.isqrt(int(processor.num_image_tokens))
        return cls(
            tile_size=int(tile_size),
            patch_size=patch_size,
            image_mean=tuple(float(x) for x in image_processor.image_mean),
            image_std=tuple(float(x) for x in image_processor.image_std),
            pinpoints=tuple((int(h), int(w)) for h, w in pinpoints) if pinpoints else None,
            max_tiles=int(aspect.removeprefix("anyres_max_")) if aspect else None,
        )

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """``pad`` mode's fill: the normalisation mean as 0-255 RGB (LLaVA's ``expand2square``)."""
        return tuple(int(255 * m) for m in self.image_mean)

    def tile(self, image: Image.Image, mode: str, max_pixels: int | None = None) -> np.ndarray:
        """uint8 tiles of shape (num_tiles, 3, tile_size, tile_size); see ``tiling.tile_image``."""
        return tile_image(image, mode, self.tile_size, self.pad_color, self.pinpoints, max_pixels)

    def token_count(self, image_size: Size, mode: str) -> int:
        """Image tokens for a sample's only image, of original (height, width), in ``mode``."""
        if self.onevision:
            return onevision_image_token_count(image_size, tile_size=self.tile_size, patch_size=self.patch_size,
                                               pinpoints=self.pinpoints, max_tiles=self.max_tiles)
        return image_token_count(
            image_size, anyres=mode == "anyres", tile_size=self.tile_size, patch_size=self.patch_size,
            pinpoints=self.pinpoints,
        )

    def tile_count(self, image_size: Size, mode: str) -> int:
        """Tiles for an image of original (height, width) in ``mode``."""
        return anyres_tile_count(image_size, self.pinpoints, self.tile_size) if mode == "anyres" else 1


    # Several images and video: OneVision checkpoints only (``onevision``).

    def tile_stacked(self, image: Image.Image, max_pixels: int | None = None) -> np.ndarray:
        """One of several images: padded to a square of the mean colour, resized to one tile, (1, 3, T, T)."""
        return tile_image(image, "pad", self.tile_size, self.pad_color, None, max_pixels)

    def stacked_token_count(self) -> int:
        """Image tokens of each image of a several-image sample (one tile + an image-newline token)."""
        return stacked_image_token_count(tile_size=self.tile_size, patch_size=self.patch_size)

    def tile_frames(self, frames: list[Image.Image]) -> np.ndarray:
        """A video's sampled RGB frames -> uint8 (num_frames, 3, T, T)."""
        return tile_frames(frames, self.tile_size)

    def video_token_count(self, frames: int) -> int:
        """Video tokens of ``frames`` frames (pooled features + one image-newline token)."""
        return video_token_count(frames, tile_size=self.tile_size, patch_size=self.patch_size)
