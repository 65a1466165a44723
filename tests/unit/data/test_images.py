"""Decoding: every PIL mode to the right RGB, EXIF orientation, and clear errors for bad bytes."""

import io

import numpy as np
import pytest
from PIL import Image

from llava_platform.data.errors import SampleError
from llava_platform.data.images import (
    EmptyImageError,
    ImageAspectRatioError,
    ImageTooLargeError,
    UndecodableImageError,
    decode_image,
)
from tests.helpers.requests import bilevel_png

LIMIT = 10_000_000


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=95), LIMIT)
    assert decoded.size == (20, 40)
    top = np.asarray(decoded)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the left strip is now on top


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("L", (8, 8), 77), (77, 77, 77)),
        (Image.new("1", (8, 8), 1), (255, 255, 255)),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("RGBA", (8, 8), (0, 0, 255, 0)), (255, 255, 255)),  # fully transparent -> white
        (Image.new("RGBA", (8, 8), (0, 0, 255, 255)), (0, 0, 255)),
        (Image.new("LA", (8, 8), (0, 128)), (127, 127, 127)),  # half-transparent black on white
        (Image.new("I;16", (8, 8), 65535), (255, 255, 255)),  # 16-bit white stays white
        (Image.new("I;16", (8, 8), 32896), (128, 128, 128)),  # mid grey scaled, not clipped to 255
    ],
    ids=["L", "1", "CMYK", "RGBA-clear", "RGBA-opaque", "LA", "I16-white", "I16-grey"],
)
def test_modes_convert_to_rgb(image, expected):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    decoded = decode_image(encode(image, fmt), LIMIT)
    assert decoded.mode == "RGB"
    np.testing.assert_allclose(np.asarray(decoded)[4, 4], expected, atol=3)


def test_palette_with_transparency():
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 1
    decoded = decode_image(encode(image, "PNG", transparency=1), LIMIT)
    assert tuple(np.asarray(decoded)[0, 0]) == (255, 255, 255)
    opaque = Image.new("P", (8, 8), 1)
    opaque.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert tuple(np.asarray(decode_image(encode(opaque), LIMIT))[0, 0]) == (255, 0, 0)


def test_empty_bytes():
    with pytest.raises(EmptyImageError) as err:
        decode_image(b"", LIMIT)
    assert err.value.reason == "empty_image"
    assert isinstance(err.value, SampleError)


def test_not_an_image():
    with pytest.raises(UndecodableImageError, match="not a decodable image"):
        decode_image(b"<html>definitely not a jpeg</html>", LIMIT)


def test_truncated_image():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(UndecodableImageError, match="truncated or corrupt") as err:
        decode_image(data[: len(data) // 2], LIMIT)
    assert err.value.reason == "undecodable_image"


def test_pixel_limit_checked_before_decoding():
    """A header that claims a huge image is refused without allocating it (or reading its pixels)."""
    data = encode(Image.new("L", (5000, 4000)))
    truncated_body = data[:200]  # header intact, pixel data gone: only the size check can have run
    with pytest.raises(ImageTooLargeError, match="5000x4000 = 20000000 pixels, above the limit of 1000000"):
        decode_image(truncated_body, 1_000_000)
    assert decode_image(data, 20_000_000).size == (5000, 4000)


def test_a_bomb_that_pillow_refuses_first_is_too_large_with_its_size():
    """40000 x 40000 px is over Pillow's own bomb limit, which fires inside ``Image.open``: image_too_large."""
    with pytest.raises(ImageTooLargeError, match="image is 1600000000 pixels, above the limit of 1000000") as err:
        decode_image(bilevel_png(40_000, 40_000), 1_000_000)
    assert err.value.reason == "image_too_large"


def test_aspect_ratio_limit_checked_before_decoding():
    """A 200 x 5000 strip passes the pixel limit; the aspect limit refuses it from the header alone."""
    data = encode(Image.new("RGB", (200, 5000), "red"))
    with pytest.raises(ImageAspectRatioError, match="200x5000, an aspect ratio of 25.0:1, above the limit of 20:1"):
        decode_image(data[:200], LIMIT, max_aspect_ratio=20)
    assert decode_image(data, LIMIT, max_aspect_ratio=25).size == (200, 5000)
    assert decode_image(data, LIMIT).size == (200, 5000), "no aspect limit unless one is given"


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it is fed here
def test_fuzzed_bytes_only_raise_sample_errors():
    """Damaged files of every common format fail as UndecodableImageError, never a raw OSError."""
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    sources = [
        encode(Image.effect_noise((64, 48), 30).convert("RGB"), "JPEG", exif=exif),
        encode(Image.effect_noise((64, 48), 30).convert("RGB"), "PNG"),
        encode(Image.effect_noise((64, 48), 30).convert("RGB"), "WEBP"),
        encode(Image.effect_noise((64, 48), 30).convert("P"), "GIF"),
        encode(Image.effect_noise((64, 48), 30).convert("RGB"), "TIFF"),
    ]
    for data in sources:
        for _ in range(150):
            damaged = bytearray(data[: int(rng.integers(8, len(data)))])
            for position in rng.integers(0, len(damaged), size=3):
                damaged[position] = int(rng.integers(0, 256))
            try:
                decode_image(bytes(damaged), LIMIT)
            except SampleError:
                pass


@pytest.mark.parametrize("mode", ["pad", "square"])
def test_extreme_aspect_ratios_are_refused_before_tiling(mode):
    from llava_platform.data.tiling import tile_image

    strip = decode_image(encode(Image.new("RGB", (20000, 2), "red")), LIMIT)  # only 40,000 pixels
    with pytest.raises(ImageTooLargeError, match=f"intermediate in {mode} mode"):
        tile_image(strip, mode, 336, (0, 0, 0), max_pixels=LIMIT)
    assert tile_image(Image.new("RGB", (640, 480)), mode, 336, (0, 0, 0), max_pixels=LIMIT).shape == (1, 3, 336, 336)
