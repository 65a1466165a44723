"""``RowSpec``: the data settings that shape a training row, resolved once from a stage's ``data`` section.

The Ray Data pipeline (``pipelines/preprocess.py``), the per-record builder (``data/records.py``)
and the jobs pass this one object around instead of restating the settings as parameters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowSpec:
    """How one raw record becomes one training row (see ``DataConfig`` for each setting's meaning)."""

    template: str
    """Conversation template (``plain``, ``vicuna_v1``, ...)."""
    image_mode: str
    """``square``, ``pad`` or ``anyres``."""
    max_length: int
    """Longest sequence in tokens, image tokens included (``data.model_max_length``)."""
    truncation: str = "drop"
    """``drop`` quarantines over-long samples, ``truncate`` cuts their text."""
    max_image_pixels: int = 50_000_000
    """Images with more pixels are refused before decoding."""
    image_root: str | None = None
    """Folder or ``s3://`` prefix of the records' relative image paths."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for ``s3://`` images (default: ``AWS_ENDPOINT_URL``)."""
    max_images: int = 16
    """Records with more images are refused (several-image records: ``llava_onevision``)."""
    video_frames: int = 8
    """Frames sampled per video."""
    max_video_duration_s: float = 600.0
    max_video_source_frames: int = 100_000
    max_video_bytes: int = 200_000_000
