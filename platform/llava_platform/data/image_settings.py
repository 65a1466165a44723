"""Image settings read from a checkpoint's processor: the one source of tiling truth.

The data pipeline, the model checks and the server all derive tile size, normalisation, pad colour,
pinpoints and token counts from the processor saved with the checkpoint, so training tiles are
what the exported checkpoint's processor produces at inference (no train/serve skew).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from llava_platform.data.geometry import Size, anyres_tile_count, image_token_count
from llava_platform.data.tiling import tile_image


@dataclass(frozen=True)
class ImageSettings:
    """Everything needed to tile an image and count its tokens, as plain values."""

    tile_size: int
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    pinpoints: tuple[Size, ...] | None = None
    """anyres candidate resolutions; ``None`` for LLaVA-1.5 checkpoints."""

    @classmethod
    def from_processor(cls, processor) -> ImageSettings:
        """Read the settings of a ``LlavaProcessor`` / ``LlavaNextProcessor``."""
        image_processor = processor.image_processor
        crop = image_processor.crop_size
        tile_size = crop["height"] if crop else image_processor.size["shortest_edge"]
        pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
        return cls(
            tile_size=int(tile_size),
            patch_size=int(processor.patch_size),
            image_mean=tuple(float(x) for x in image_processor.image_mean),
            image_std=tuple(float(x) for x in image_processor.image_std),
            pinpoints=tuple((int(h), int(w)) for h, w in pinpoints) if pinpoints else None,
        )

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """``pad`` mode's fill: the normalisation mean as 0-255 RGB (LLaVA's ``expand2square``)."""
        return tuple(int(255 * m) for m in self.image_mean)

    def tile(self, image: Image.Image, mode: str, max_pixels: int | None = None) -> np.ndarray:
        """uint8 tiles of shape (num_tiles, 3, tile_size, tile_size); see ``tiling.tile_image``."""
        return tile_image(image, mode, self.tile_size, self.pad_color, self.pinpoints, max_pixels)

    def token_count(self, image_size: Size, mode: str) -> int:
        """Image tokens for an image of original (height, width) in ``mode``."""
        return image_token_count(
            image_size, anyres=mode == "anyres", tile_size=self.tile_size, patch_size=self.patch_size,
            pinpoints=self.pinpoints,
        )

    def tile_count(self, image_size: Size, mode: str) -> int:
        """Tiles for an image of original (height, width) in ``mode``."""
        return anyres_tile_count(image_size, self.pinpoints, self.tile_size) if mode == "anyres" else 1

