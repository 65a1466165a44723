"""LLaVA-OneVision inputs: token counts, tiles and frames against transformers' own processor and model
arithmetic; video sampling and limits; several-image and video records; the OneVision batch."""


import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from llava_platform.data.collate import collate_onevision
from llava_platform.data.geometry import onevision_image_token_count, stacked_image_token_count, video_token_count
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.records import RowBuilder
from llava_platform.data.tiling import normalize_tiles
from llava_platform.data.video import sample_frame_indices, sample_video
from llava_platform.model.compose import add_image_token, load_processor
from llava_platform.model.onevision_processor import build_onevision_processor
from tests.helpers.media import encode_video, frame_index, grey_ramp, png, random_picture
from tests.helpers.specs import row_spec, video_limits

PINPOINTS_384 = [(384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7)]
"""OneVision's published grids: 1x1 to 6x6 tiles of 384 px."""


# Token counts: golden values and transformers' processor arithmetic at OneVision's own sizes

@pytest.mark.parametrize(("size", "tokens"), [
    ((384, 384), 729 + 27 * 27 + 27),  # one grid tile: nothing to cap
    ((2304, 2304), 729 + 81 * 81 + 81),  # 6 x 6 tiles = 162 x 162 features, ratio 2.0: halved to 81 x 81
    ((768, 1536), 729 + 54 * 108 + 54),  # 2 x 4 tiles, ratio sqrt(8/9) < 1.1: kept
    ((100, 1000), 729 + 9 * 81 + 9),  # very wide: 1 x 3 grid (27 x 81), 9 of 27 rows left unpadded
])
def test_lone_image_token_count_golden(size, tokens):
    assert onevision_image_token_count(size, tile_size=384, patch_size=14, pinpoints=PINPOINTS_384,
                                       max_tiles=9) == tokens


def test_several_image_and_video_token_counts_golden():
    assert stacked_image_token_count(tile_size=384, patch_size=14) == 730  # 729 + one image-newline token
    assert video_token_count(8, tile_size=384, patch_size=14) == 8 * 14 * 14 + 1  # 27 x 27 pooled to 14 x 14
    assert video_token_count(32, tile_size=384, patch_size=14) == 6273


@pytest.fixture(scope="module")
def processor_384(towers):
    tokenizer = AutoTokenizer.from_pretrained(towers["qwen2"])
    add_image_token(tokenizer, video=True)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                                      image_grid_pinpoints=[list(p) for p in PINPOINTS_384])
    return build_onevision_processor(tokenizer, image_processor, num_image_tokens=729,
                                     vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                     chat_template=None)


def test_token_counts_match_the_onevision_processor_arithmetic(processor_384):
    """A sweep of sizes (odd ones stress the rounding) against transformers' own counts."""
    sizes = [(h, w) for h in (1, 17, 383, 384, 385, 700, 1151, 2304, 5000) for w in (1, 29, 384, 555, 1536, 4000)]
    for height, width in sizes:
        expected = processor_384._get_number_of_features(height, width, 384, 384)
        assert onevision_image_token_count((height, width), tile_size=384, patch_size=14, pinpoints=PINPOINTS_384,
                                           max_tiles=9) == expected, (height, width)
    counts = processor_384._get_num_multimodal_tokens(video_sizes=[(8, 384, 384), (32, 384, 384)])
    assert counts["num_video_tokens"] == [video_token_count(8, tile_size=384, patch_size=14),
                                          video_token_count(32, tile_size=384, patch_size=14)]


# Tiles: ours against the processor saved with a tiny OneVision checkpoint


@pytest.fixture(scope="module")
def ov(onevision_checkpoint):
    processor = load_processor(str(onevision_checkpoint))
    return processor, ImageSettings.from_processor(processor)


def test_settings_read_from_the_onevision_processor(ov):
    _, settings = ov
    assert (settings.tile_size, settings.patch_size, settings.max_tiles, settings.onevision) == (56, 14, 2, True)
    assert settings.pinpoints[-1] == (168, 168)


@pytest.mark.parametrize("size", [(56, 56), (100, 300), (300, 100), (170, 170), (30, 500), (333, 91)])
def test_lone_image_tiles_and_tokens_are_the_processors(ov, size):
    processor, settings = ov
    image = random_picture(*size)
    expected = processor(images=[[image]], text="<image>", return_tensors="pt")
    tiles = torch.as_tensor(settings.tile(image, "anyres"))
    assert int((expected["input_ids"] == processor.image_token_id).sum()) == settings.token_count(size, "anyres")
    assert expected["pixel_values"].shape[1] == tiles.shape[0] == settings.tile_count(size, "anyres")
    torch.testing.assert_close(normalize_tiles(tiles, settings.image_mean, settings.image_std),
                               expected["pixel_values"][0], rtol=0, atol=0)


def test_several_images_tiles_and_tokens_are_the_processors(ov):
    processor, settings = ov
    images = [random_picture(56, 90, 1), random_picture(120, 40, 2), random_picture(77, 77, 3)]
    expected = processor(images=[images], text="<image><image><image>", return_tensors="pt")
    assert expected["batch_num_images"].tolist() == [3]
    assert int((expected["input_ids"] == processor.image_token_id).sum()) == 3 * settings.stacked_token_count()
    ours = torch.as_tensor(np.concatenate([settings.tile_stacked(image) for image in images]))
    torch.testing.assert_close(normalize_tiles(ours, settings.image_mean, settings.image_std),
                               expected["pixel_values"][:, 0], rtol=0, atol=0)


# Video: uniform sampling and the limits, checked before decoding

def test_frame_indices_spread_from_first_to_last():
    assert sample_frame_indices(12, 4) == [0, 4, 7, 11]
    assert sample_frame_indices(100, 1) == [0]
    assert sample_frame_indices(3, 5) == [0, 0, 1, 2, 2]  # a short video repeats frames
    with pytest.raises(ValueError):
        sample_frame_indices(0, 4)


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_a_video_is_sampled_to_its_frames_in_order(container):
    codec = "mpeg4" if container == "mp4" else "libvpx-vp9"
    data = encode_video(grey_ramp(12), fps=4, container=container, codec=codec)
    video = sample_video(data, video_limits(frames=4))
    assert [frame_index(frame) for frame in video.frames] == [0, 4, 7, 11]
    assert video.source_frames == 12 and video.duration_s == pytest.approx(3.0, abs=0.3)
    assert all(frame.mode == "RGB" and frame.size == (32, 32) for frame in video.frames)


def test_a_short_video_repeats_frames_to_the_count():
    video = sample_video(encode_video(grey_ramp(3)), video_limits(frames=5))
    assert [frame_index(frame) for frame in video.frames] == [0, 0, 1, 2, 2]


@pytest.mark.parametrize(("limits", "reason", "words"), [
    (video_limits(max_bytes=100), "video_too_large", "bytes"),
    (video_limits(max_duration_s=1.0), "video_too_long", "3.0 s video"),
    (video_limits(max_source_frames=10), "too_many_frames", "12 frames"),
    (video_limits(max_frame_pixels=32 * 32 - 1), "video_too_large", "32x32 frames"),
])
def test_video_limits_refuse_before_decoding(limits, reason, words):
    data = encode_video(grey_ramp(12), fps=4)
    with pytest.raises(Exception) as error:
        sample_video(data, limits)
    assert error.value.reason == reason and words in str(error.value)


@pytest.mark.parametrize("data", [b"", b"not a video at all", encode_video(grey_ramp(4))[:200]])
def test_undecodable_bytes_are_named(data):
    with pytest.raises(Exception) as error:
        sample_video(data, video_limits())
    assert error.value.reason == "undecodable_video"


# Records: several images, a video, and what is refused


@pytest.fixture(scope="module")
def builder(ov):
    processor, _ = ov
    return RowBuilder.from_processor(processor, row_spec(template="qwen_1_5", image_mode="anyres", max_length=4096,
                                                        max_images=3, video_frames=4))


def record(value, **media):
    return {"id": "r", **media, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "Yes."}]}


def test_a_several_image_record_becomes_one_tile_per_image(builder, ov):
    processor, settings = ov
    images = [png(random_picture(60, 90, k)) for k in range(2)]
    row = builder.build(record("<image>\n<image>\nSame?", image=["a.png", "b.png"]), images)
    assert row["modality"] == "multi_image" and row["tiles"].shape == (2, 3, 56, 56)
    assert row["image_sizes"].tolist() == [[60, 90], [60, 90]] and row["frames"].shape[0] == 0
    assert int((row["input_ids"] == processor.image_token_id).sum()) == 2 * settings.stacked_token_count()


def test_a_video_record_becomes_frames_and_video_tokens(builder, ov):
    processor, settings = ov
    row = builder.build(record("<image>\nWhat happens?", video="v.mp4"), [], encode_video(grey_ramp(12)))
    assert row["modality"] == "video" and row["frames"].shape == (4, 3, 56, 56) and row["tiles"].shape[0] == 0
    assert [frame_index(frame.transpose(1, 2, 0)) for frame in row["frames"]] == [0, 4, 7, 11]
    assert int((row["input_ids"] == processor.video_token_id).sum()) == settings.video_token_count(4)
    assert int((row["input_ids"] == processor.image_token_id).sum()) == 0
    same = builder.build(record("<video>\nWhat happens?", video="v.mp4"), [], encode_video(grey_ramp(12)))
    assert same["input_ids"].tolist() == row["input_ids"].tolist()  # <video> marks it as well as <image>


@pytest.mark.parametrize(("value", "images", "reason"), [
    ("<image>\nWhich?", 2, "image_placeholder_mismatch"),  # two images, one placeholder
    ("<image>\n<image>\n<image>\nWhich?", 2, "image_placeholder_mismatch"),
    ("<image>" * 4 + "\nWhich?", 4, "too_many_images"),  # data.max_images is 3 here
])
def test_bad_several_image_records_are_named(builder, value, images, reason):
    data = [png(random_picture(40, 40, k)) for k in range(images)]
    with pytest.raises(Exception) as error:
        builder.build(record(value, image=[f"{k}.png" for k in range(images)]), data)
    assert error.value.reason == reason


def test_several_images_need_a_onevision_checkpoint(saved_checkpoints):
    builder = RowBuilder.from_processor(load_processor(str(saved_checkpoints["llava"])),
                                        row_spec(template="vicuna_v1", image_mode="pad", max_length=4096))
    with pytest.raises(Exception) as error:
        builder.build(record("<image>\n<image>\nWhich?", image=["a.png", "b.png"]), [png(random_picture(9, 9))] * 2)
    assert error.value.reason == "needs_onevision" and "llava_onevision" in str(error.value)
    with pytest.raises(Exception) as error:
        builder.build(record("<image>\nWhat?", video="v.mp4"), [], encode_video(grey_ramp(4)))
    assert error.value.reason == "needs_onevision"


# The batch: several kinds of sample side by side

def test_the_onevision_batch_marks_which_images_are_tiled(builder):
    lone = builder.build(record("<image>\nWhat?", image="a.png"), png(random_picture(100, 300)))
    pair = builder.build(record("<image>\n<image>\nWhich?", image=["a.png", "b.png"]),
                         [png(random_picture(40, 40, k)) for k in range(2)])
    video = builder.build(record("<image>\nWhen?", video="v.mp4"), [], encode_video(grey_ramp(8)))
    rows = [lone, pair, video]
    batch = collate_onevision([r["input_ids"] for r in rows], [r["labels"] for r in rows], [r["tiles"] for r in rows],
                              [r["image_sizes"] for r in rows], [r["frames"] for r in rows], pad_token_id=0,
                              image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    assert batch["batch_num_images"].tolist() == [1, 2, 0]
    assert batch["pixel_values"].shape == (3, lone["tiles"].shape[0], 3, 56, 56)  # 3 images, padded to the most tiles
    assert batch["image_sizes"].tolist() == [[100, 300], [40, 40], [40, 40]]
    assert float(batch["pixel_values"][1, 1:].abs().sum()) == 0.0  # a stacked image's padding stays zero
    assert batch["pixel_values_videos"].shape == (1, 4, 3, 56, 56)
    with pytest.raises(ValueError, match="frame counts"):
        collate_onevision([[1], [1]], [[1], [1]], [lone["tiles"][:0]] * 2, [[], []],
                          [video["frames"], video["frames"][:2]], pad_token_id=0, image_mean=(0.5,) * 3,
                          image_std=(0.5,) * 3)
