"""``RowSpec``: the data settings that shape a training row, resolved once from a stage's ``data`` section.

The Ray Data pipeline (``pipelines/preprocess.py``), the per-record builder (``data/records.py``)
and the jobs pass this one object around instead of restating the settings as parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_platform.data.video import VideoLimits


@dataclass(frozen=True)
class RowSpec:
    """How one raw record becomes one training row (``DataConfig.row_spec()`` builds it; see ``DataConfig``
    for each setting's meaning and default)."""

    template: str
    """Conversation template (``plain``, ``vicuna_v1``, ...)."""
    image_mode: str
    """``square``, ``pad`` or ``anyres``."""
    max_length: int
    """Longest sequence in tokens, image tokens included (``data.model_max_length``)."""
    truncation: str
    """``drop`` quarantines over-long samples, ``truncate`` cuts their text."""
    max_image_pixels: int
    """Images with more pixels are refused before decoding."""
    image_root: str | None
    """Folder or ``s3://`` prefix of the records' relative image paths."""
    s3_endpoint_url: str | None
    """S3-compatible endpoint for ``s3://`` images (``None``: ``AWS_ENDPOINT_URL``)."""
    max_images: int
    """Records with more images are refused (several-image records: ``llava_onevision``)."""
    video: VideoLimits
    """Frames sampled per video, and what a video may be."""
