"""Small media for tests: random pictures, PNG bytes, and encoded videos written with PyAV (FFmpeg) as real
clips are, whose frames tell their index."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def random_picture(height: int, width: int, seed: int = 0) -> Image.Image:
    """An RGB picture of random pixels (every resize shows in it)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_video(frames: list[np.ndarray], fps: int = 4, container: str = "mp4", codec: str = "mpeg4") -> bytes:
    """Encode (H, W, 3) uint8 frames as a video file's bytes."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.bit_rate = "yuv420p", 4_000_000
        for frame in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode())
    return buffer.getvalue()


def grey_ramp(count: int, size: int = 32, step: int = 20) -> list[np.ndarray]:
    """``count`` flat grey frames, frame i at level i * step (mod 256): a sampled frame tells its index."""
    return [np.full((size, size, 3), (i * step) % 256, np.uint8) for i in range(count)]


def frame_index(frame, step: int = 20) -> int:
    """The index of a ``grey_ramp`` frame (a PIL image or an array), from its mean level."""
    return round(float(np.asarray(frame, dtype=np.float32).mean()) / step)
