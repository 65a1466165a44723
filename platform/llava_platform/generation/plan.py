"""What batch inference runs, resolved once on the driver (``config.schema.InferenceConfig.build()``)."""

from __future__ import annotations

from dataclasses import dataclass

from llava_platform.data.video import VideoLimits
from llava_platform.vllm_engine import VllmSettings


@dataclass(frozen=True)
class InferencePlan:
    """How batch inference answers questions (``config.schema.InferenceConfig.build()``)."""

    engine: str
    """``transformers`` or ``vllm`` (``open_engine``)."""
    dtype: str
    """``auto`` (the checkpoint's own) or a dtype name (``generation.engine.resolve_dtype``)."""
    vllm: VllmSettings
    max_new_tokens: int
    batch_size: int
    """Questions per ``complete`` call."""
    num_replicas: int
    cpus_per_replica: float
    gpus_per_replica: float
    max_image_pixels: int
    video: VideoLimits
    """Frames sampled per video record, and what a video may be."""
