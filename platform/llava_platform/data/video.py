"""Encoded video -> a fixed number of uniformly sampled RGB frames, with limits checked before decoding.

Decoding is FFmpeg's, through PyAV (the maintained binding; its wheels bundle FFmpeg). Shared by the
data pipeline (records with a ``video``) and the server (``video_url`` parts), so a video becomes the
same frames in training and serving. The frames are then tiled by ``tiling.tile_frames``.

Sampling follows LLaVA-OneVision's loader with ``force_sample``: ``count`` frame indices spread
evenly from the first frame to the last (``sample_frame_indices``); a video with fewer frames than
``count`` repeats some, so every video of a recipe has the same frame count and a batch's videos stack.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from llava_platform.data.errors import SampleError


class UndecodableVideoError(SampleError):
    """Bytes that FFmpeg cannot open or decode as a video, or a video without frames."""

    reason = "undecodable_video"


class VideoTooLongError(SampleError):
    """A video longer than ``max_duration_s``."""

    reason = "video_too_long"


class TooManyFramesError(SampleError):
    """A video stream with more frames than ``max_source_frames``."""

    reason = "too_many_frames"


class VideoTooLargeError(SampleError):
    """A video file larger than ``max_bytes``."""

    reason = "video_too_large"


@dataclass(frozen=True)
class VideoLimits:
    """How many frames to sample and what a video may be (``VideoConfig.build()``: ``data.video``, the server's
    limits; the settings' meanings and defaults are there)."""

    frames: int
    max_duration_s: float
    max_source_frames: int
    max_bytes: int
    max_frame_pixels: int
    """Frames with more pixels are refused before decoding (the images' decompression-bomb guard)."""


@dataclass(frozen=True)
class SampledVideo:
    """A video's sampled frames and what it was."""

    frames: list[Image.Image]
    """``limits.frames`` RGB frames, in time order."""
    duration_s: float
    source_frames: int
    """Frames in the stream (as decoded up to the last sampled one, or the container's count)."""


def sample_frame_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames, the first and last included.

    >>> sample_frame_indices(100, 4)
    [0, 33, 66, 99]
    >>> sample_frame_indices(3, 5)
    [0, 0, 1, 2, 2]
    """
    if total <= 0 or count <= 0:
        raise ValueError(f"need frames to sample from and a positive count, got total={total}, count={count}")
    return [int(i) for i in np.linspace(0, total - 1, count).round().astype(int)]


def sample_video(data: bytes, limits: VideoLimits) -> SampledVideo:
    """Decode ``limits.frames`` uniformly spaced frames of an encoded video (mp4, webm, ...).

    The size, duration and frame count are checked from the container before any frame is decoded.

    Raises:
        VideoTooLargeError (file or frame size), VideoTooLongError, TooManyFramesError, UndecodableVideoError.
    """
    import av  # FFmpeg; imported here so that image-only workers never load it

    if len(data) > limits.max_bytes:
        raise VideoTooLargeError(f"a {len(data)}-byte video is above the limit of {limits.max_bytes} bytes")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise UndecodableVideoError("the file has no video stream")
            stream = container.streams.video[0]
            pixels = (stream.codec_context.width or 0) * (stream.codec_context.height or 0)
            if pixels > limits.max_frame_pixels:
                raise VideoTooLargeError(f"{stream.codec_context.width}x{stream.codec_context.height} frames are "
                                         f"above the limit of {limits.max_frame_pixels} pixels")
            duration_s = _duration_s(container, stream)
            if duration_s > limits.max_duration_s:
                raise VideoTooLongError(f"a {duration_s:.1f} s video is above the limit of {limits.max_duration_s} s")
            declared = stream.frames or round(duration_s * float(stream.average_rate or 0))
            if declared > limits.max_source_frames:
                raise TooManyFramesError(
                    f"the video has {declared} frames, above the limit of {limits.max_source_frames}")
            frames, decoded = _decode_at(container, stream, declared, limits)
    except SampleError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as error:  # av.open's errors on bytes that are no video
        raise UndecodableVideoError(f"cannot decode the video: {error}") from error
    return SampledVideo(frames=frames, duration_s=duration_s, source_frames=decoded)


def _duration_s(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return 0.0


def _decode_at(container, stream, declared: int, limits: VideoLimits) -> tuple[list[Image.Image], int]:
    """Decode up to the last wanted frame, keeping the wanted ones. A stream that declares no frame
    count is decoded whole (still bounded by ``max_source_frames``) and sampled afterwards."""
    stream.thread_type = "AUTO"
    if declared > 0:
        wanted = sample_frame_indices(declared, limits.frames)
        kept: dict[int, Image.Image] = {}
        index = -1
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                kept[index] = frame.to_image().convert("RGB")
            if index >= wanted[-1]:
                break
        if not kept:
            raise UndecodableVideoError("the video stream decoded to no frames")
        # a container that overstates its frames: the missing tail repeats the last decoded frame
        last = kept[max(kept)]
        return [kept.get(i, last) for i in wanted], index + 1
    frames = []
    for frame in container.decode(stream):
        frames.append(frame.to_image().convert("RGB"))
        if len(frames) > limits.max_source_frames:
            raise TooManyFramesError(f"the video has more than {limits.max_source_frames} frames")
    if not frames:
        raise UndecodableVideoError("the video stream decoded to no frames")
    return [frames[i] for i in sample_frame_indices(len(frames), limits.frames)], len(frames)
