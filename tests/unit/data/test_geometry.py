"""Golden (H, W) -> grid, tile count and image-token count, and parity with LlavaNextProcessor."""

import pytest
from transformers import AutoTokenizer, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava_platform.data.geometry import anyres_grid_shape, anyres_tile_count, image_token_count

PINPOINTS_336 = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


@pytest.mark.parametrize(
    "size, grid, tiles, tokens",
    [
        ((336, 336), (1, 2), 3, 576 + 24 * 24 + 24),  # least waste: 336x672, not 672x672
        ((1000, 1000), (2, 2), 5, 576 + 48 * 48 + 48),  # = 2928, the maximum for these pinpoints
        ((480, 640), (2, 2), 5, 576 + 36 * 48 + 36),  # 4:3 landscape: 6 letterbox rows cut top and bottom
        ((640, 480), (2, 2), 5, 576 + 48 * 36 + 48),  # 3:4 portrait
        ((300, 900), (1, 3), 4, 576 + 24 * 72 + 24),  # 1:3 fills 336x1008 exactly, nothing unpadded
        ((100, 600), (1, 2), 3, 576 + 8 * 48 + 8),  # very wide
        ((2000, 400), (3, 1), 4, 576 + 72 * 14 + 72),  # very tall: fitted width ceil(201.6) = 202
    ],
)
def test_anyres_golden(size, grid, tiles, tokens):
    assert anyres_grid_shape(size, PINPOINTS_336, 336) == grid
    assert anyres_tile_count(size, PINPOINTS_336, 336) == tiles
    assert image_token_count(size, anyres=True, tile_size=336, patch_size=14, pinpoints=PINPOINTS_336) == tokens


def test_llava15_token_count_is_576_whatever_the_size():
    for size in [(10, 10), (336, 336), (480, 640), (4000, 300)]:
        assert image_token_count(size, anyres=False, tile_size=336, patch_size=14) == 576


def test_anyres_needs_pinpoints():
    with pytest.raises(ValueError, match="pinpoints"):
        image_token_count((10, 10), anyres=True, tile_size=336, patch_size=14)


@pytest.fixture(scope="module")
def next_processor(towers):
    tokenizer = AutoTokenizer.from_pretrained(towers["llama"])
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS_336
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def test_token_counts_match_llava_next_processor_arithmetic(next_processor):
    """Sweep sizes (incl. odd ones that stress rounding) against transformers' own count."""
    sizes = [(h, w) for h in (1, 17, 223, 336, 337, 500, 671, 1024, 3000) for w in (1, 31, 336, 449, 800, 2047)]
    for height, width in sizes:
        expected = next_processor._get_number_of_features(height, width, 336, 336) - 1  # default drops CLS
        got = image_token_count((height, width), anyres=True, tile_size=336, patch_size=14, pinpoints=PINPOINTS_336)
        assert got == expected, (height, width)
    assert max(
        image_token_count(s, anyres=True, tile_size=336, patch_size=14, pinpoints=PINPOINTS_336) for s in sizes
    ) <= 2928  # 5 tiles x 576 = 2880 patch features, plus 48 image-newline tokens
