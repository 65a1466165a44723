"""Our uint8 tiles, normalised, equal what the saved checkpoint's own processor produces."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.tiling import normalize_tiles, tile_image

SIZES = [(336, 336), (480, 640), (640, 480), (300, 900), (1000, 120), (57, 81), (13, 700)]
PINPOINTS_336 = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    # smooth gradients plus noise: resampling errors show up, unlike flat colours
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def ours(image, mode, settings):
    tiles = tile_image(image, mode, settings.tile_size, settings.pad_color, settings.pinpoints)
    assert tiles.dtype == np.uint8 and tiles.shape[1:] == (3, settings.tile_size, settings.tile_size)
    return normalize_tiles(torch.from_numpy(tiles), settings.image_mean, settings.image_std)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["square", "pad"])
def test_llava15_parity_at_336(size, mode):
    processor = LlavaImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=mode == "pad",
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    settings = ImageSettings(336, 14, CLIP_MEAN, CLIP_STD)
    assert settings.pad_color == (122, 116, 104)  # LLaVA's expand2square colour
    image = random_image(*size)
    expected = torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"])
    got = ours(image, mode, settings)
    assert got.shape == expected.shape == (1, 3, 336, 336)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_llava_next_anyres_parity_at_336(size):
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS_336,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    settings = ImageSettings(336, 14, CLIP_MEAN, CLIP_STD, tuple(PINPOINTS_336))
    image = random_image(*size, seed=1)
    out = processor(images=image, return_tensors="np")
    expected = torch.from_numpy(out["pixel_values"][0])
    got = ours(image, "anyres", settings)
    assert got.shape == expected.shape
    assert got.shape[0] == settings.tile_count(size, "anyres")
    assert tuple(out["image_sizes"][0]) == size
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_parity_with_saved_checkpoint_processor(saved_checkpoints, arch):
    """Settings read back from a saved checkpoint reproduce its processor exactly."""
    processor = AutoProcessor.from_pretrained(saved_checkpoints[arch])
    settings = ImageSettings.from_processor(processor)
    mode = "anyres" if arch == "llava_next" else "pad"
    for size in [(40, 90), (90, 40), (56, 56), (7, 300)]:
        image = random_image(*size, seed=2)
        expected = torch.from_numpy(processor.image_processor(images=image, return_tensors="np")["pixel_values"])
        expected = expected[0] if arch == "llava_next" else expected
        torch.testing.assert_close(ours(image, mode, settings), expected, atol=1e-5, rtol=0)


def test_tile_image_rejects_non_rgb_and_unknown_mode():
    settings = ImageSettings(56, 14, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="needs an RGB image"):
        settings.tile(Image.new("L", (10, 10)), "pad")
    with pytest.raises(ValueError, match="unknown image mode 'crop'"):
        settings.tile(Image.new("RGB", (10, 10)), "crop")
    with pytest.raises(ValueError, match="needs pinpoints"):
        settings.tile(Image.new("RGB", (10, 10)), "anyres")
