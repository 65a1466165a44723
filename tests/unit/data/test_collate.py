"""Collate equals what transformers' processor builds for a batch, and pads tokens and labels right."""

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor

from llava_platform.data.collate import collate, pad_sequences
from llava_platform.data.conversation import IGNORE_INDEX
from llava_platform.data.image_settings import ImageSettings


def test_pad_sequences():
    out = pad_sequences([[1, 2, 3], [4]], pad_value=0)
    assert out.dtype == torch.long and out.tolist() == [[1, 2, 3], [4, 0, 0]]


def test_anyres_batch_matches_the_processor(saved_checkpoints):
    processor = AutoProcessor.from_pretrained(saved_checkpoints["llava_next"])
    settings = ImageSettings.from_processor(processor)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for size in [(40, 90, 3), (100, 100, 3)]]
    tiles = [settings.tile(image, "anyres") for image in images]
    assert tiles[0].shape[0] != tiles[1].shape[0], "the test needs images with different tile counts"
    sizes = [(image.height, image.width) for image in images]
    batch = collate(
        [[1, 2, 3], [4, 5]], [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5]], [tiles[0], tiles[1]],
        sizes, pad_token_id=0, anyres=True,
        image_mean=settings.image_mean, image_std=settings.image_std,
    )
    expected = processor.image_processor(images=images, return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    assert batch["image_sizes"].tolist() == expected["image_sizes"].tolist()
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_llava_batch_skips_text_only_samples(saved_checkpoints):
    processor = AutoProcessor.from_pretrained(saved_checkpoints["llava"])
    settings = ImageSettings.from_processor(processor)
    image = Image.new("RGB", (30, 70), (10, 200, 30))
    batch = collate(
        [[1], [2], [3]], [[1], [2], [3]], [settings.tile(image, "pad"), None, settings.tile(image, "pad")],
        [(70, 30), None, (70, 30)], pad_token_id=0, anyres=False,
        image_mean=settings.image_mean, image_std=settings.image_std,
    )
    expected = processor.image_processor(images=[image, image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], expected, atol=1e-5, rtol=0)
    assert "image_sizes" not in batch
    text_only = collate([[1]], [[1]], [None], [None], pad_token_id=0, anyres=False, image_mean=(0, 0, 0),
                        image_std=(1, 1, 1))
    assert "pixel_values" not in text_only


def test_zero_tile_text_rows_in_an_anyres_batch(saved_checkpoints):
    """Pipeline rows mark text-only samples with zero tiles and size [0, 0]; the model must run on them."""
    from transformers import LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(saved_checkpoints["llava_next"])
    model = LlavaNextForConditionalGeneration.from_pretrained(saved_checkpoints["llava_next"])
    settings = ImageSettings.from_processor(processor)
    image = Image.new("RGB", (90, 40), (200, 30, 30))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    count = settings.token_count((40, 90), "anyres")
    no_tiles = np.zeros((0, 3, 56, 56), np.uint8)
    batch = collate(
        [[1] + [image_id] * count + [5], [1, 5, 6]], [[-100] * (count + 1) + [5], [-100, 5, 6]],
        [settings.tile(image, "anyres"), no_tiles], [(40, 90), (0, 0)], pad_token_id=0, anyres=True,
        image_mean=settings.image_mean, image_std=settings.image_std,
    )
    assert batch["pixel_values"].shape[0] == 1 and batch["image_sizes"].tolist() == [[40, 90]]
    assert torch.isfinite(model(**batch).loss)
