"""The typed specs the tests build, from the schema's sections (every default is the schema's)."""

from __future__ import annotations

from llava_platform.config.schema import MAX_IMAGE_PIXELS, DataConfig, VideoConfig, VllmConfig
from llava_platform.data.rows import RowSpec
from llava_platform.data.video import VideoLimits
from llava_platform.vllm_engine import VllmSettings


def row_spec(*, max_length: int, video_frames: int | None = None, **settings) -> RowSpec:
    """``DataConfig(...).row_spec()`` with these settings (``max_length`` is ``model_max_length``,
    ``video_frames`` is ``video.frames``)."""
    video = VideoConfig() if video_frames is None else VideoConfig(frames=video_frames)
    return DataConfig(train_files=["unused"], model_max_length=max_length, video=video, **settings).row_spec()


def video_limits(max_frame_pixels: int = MAX_IMAGE_PIXELS, **settings) -> VideoLimits:
    """``VideoConfig(...).build()`` with these settings."""
    return VideoConfig(**settings).build(max_frame_pixels)


def vllm_settings(**settings) -> VllmSettings:
    """``VllmConfig(...).build()`` with these settings."""
    return VllmConfig(**settings).build("auto")
