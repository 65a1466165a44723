"""One LLaVA-format record -> one training row, or a ``SampleError`` that says why not.

Pure per-record logic, shared by the Ray Data pipeline (``pipelines/``) and anything else that
needs training rows. A row has the columns of the pipeline's Arrow schema (see
``pipelines/README.md``): ``id``, ``modality``, ``input_ids``, ``labels``, ``length``, ``tiles``
(uint8, (num_tiles, 3, T, T), every image's tiles in order; zero tiles for text-only rows),
``image_size`` ([height, width] of the first image), ``image_sizes`` ((num_images, 2)), ``frames``
(uint8, (num_frames, 3, T, T); zero frames without a video), ``num_tiles`` (tiles + frames: what the
vision tower runs for the row), ``truncated``.

A record has at most one of ``image`` (a path, or, for OneVision checkpoints, a list of paths: one
``<image>`` placeholder per image, in order) and ``video`` (a path; OneVision; one ``<image>`` or
``<video>`` placeholder).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llava_platform.data.conversation import MissingFieldError, SequenceTooLongError, tokenize_conversation
from llava_platform.data.errors import SampleError
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.images import decode_image
from llava_platform.data.rows import RowSpec
from llava_platform.data.templates import IMAGE_PLACEHOLDER, VIDEO_TOKEN, resolve_chat_template
from llava_platform.data.video import VideoLimits, sample_video


class MalformedRecordError(SampleError):
    """A row that is not a JSON object."""

    reason = "malformed_json"


class MissingImageError(SampleError):
    """The record names an image file that does not exist."""

    reason = "missing_image"


class MissingVideoError(SampleError):
    """The record names a video file that does not exist."""

    reason = "missing_video"


class TooManyImagesError(SampleError):
    """More images in one record than ``data.max_images``."""

    reason = "too_many_images"


class NeedsOnevisionError(SampleError):
    """Several images or a video for a checkpoint that takes one image per sample (not OneVision)."""

    reason = "needs_onevision"


def record_images(record: dict[str, Any]) -> list[str]:
    """The record's image paths, in placeholder order (``image`` as a string or a list; none: ``[]``)."""
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def record_id_of(text: str) -> str | None:
    """The record's ``id`` if the text is a JSON object that has one (for quarantine rows)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return str(record["id"]) if isinstance(record, dict) and "id" in record else None


def parse_record(text: str) -> dict[str, Any]:
    """Parse and check the shape of one record: ``{"id", "image"?, "conversations": [...]}``.

    Raises:
        MalformedRecordError: not JSON, or not an object.
        MissingFieldError: no ``id`` or ``conversations``, or fields of the wrong type.
    """
    return check_record(json_object(text))


def json_object(text: str) -> dict[str, Any]:
    """A raw record's JSON text as an object.

    Raises:
        MalformedRecordError: not JSON, or not an object.
    """
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedRecordError(f"not valid JSON: {err}") from err
    if not isinstance(record, dict):
        raise MalformedRecordError(f"a record must be a JSON object, got {type(record).__name__}")
    return record


def check_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` itself, once its shape is checked (see ``parse_record``)."""
    missing = [key for key in ("id", "conversations") if key not in record]
    if missing:
        raise MissingFieldError(f"record lacks {', '.join(missing)}")
    if not isinstance(record["conversations"], list):
        raise MissingFieldError("'conversations' must be a list of turns")
    image = record.get("image")
    if image is not None and not isinstance(image, str) and not (
            isinstance(image, list) and image and all(isinstance(i, str) for i in image)):
        raise MissingFieldError("'image' must be a relative path string, or a non-empty list of them")
    video = record.get("video")
    if video is not None and not isinstance(video, str):
        raise MissingFieldError("'video' must be a relative path string")
    if image is not None and video is not None:
        raise MissingFieldError("a record has an 'image' or a 'video', not both")
    return record


@dataclass(frozen=True)
class RowBuilder:
    """Turns a parsed record and its image bytes into a training row. Build once per worker."""

    tokenizer: Any
    chat_template: str
    settings: ImageSettings
    image_mode: str
    max_length: int
    truncation: str
    max_image_pixels: int
    max_images: int
    video: VideoLimits

    @classmethod
    def from_processor(cls, processor, spec: RowSpec) -> RowBuilder:
        """Tiling settings and tokenizer from the checkpoint's processor; template and limits from ``spec``."""
        return cls(
            tokenizer=processor.tokenizer,
            chat_template=resolve_chat_template(spec.template, processor.chat_template),
            settings=ImageSettings.from_processor(processor),
            image_mode=spec.image_mode,
            max_length=spec.max_length,
            truncation=spec.truncation,
            max_image_pixels=spec.max_image_pixels,
            max_images=spec.max_images,
            video=spec.video,
        )

    def build(self, record: dict[str, Any], images: bytes | Sequence[bytes] | None,
              video: bytes | None = None) -> dict[str, Any]:
        """Decode, tile and tokenise one record.

        Args:
            record: a parsed record (``parse_record``).
            images: the encoded images in placeholder order (one ``bytes`` for a lone image; ``None`` or
                ``[]`` for none).
            video: the encoded video (OneVision checkpoints), or ``None``.

        Raises:
            SampleError: the subclass names the reason (bad image or video, bad conversation, too long, ...).
        """
        return self.row(record, self.media(images, video))

    def build_pair(self, chosen: dict[str, Any], rejected: dict[str, Any], images: bytes | Sequence[bytes] | None,
                   video: bytes | None = None) -> dict[str, Any]:
        """A preference row: the media tiled once, both conversations (``data.preference.preference_pair``)
        tokenised. The chosen conversation fills the row's columns, the rejected one ``rejected_input_ids``,
        ``rejected_labels`` and ``rejected_length``.

        Raises:
            SampleError: as ``build``; ``SequenceTooLongError`` when either conversation is longer than
                ``model_max_length`` (a cut answer would be compared unfairly: never truncated).
        """
        media = self.media(images, video)
        rows = [self.row(conversation, media) for conversation in (chosen, rejected)]
        if any(row["truncated"] for row in rows):
            raise SequenceTooLongError(f"preference record {chosen['id']}: an answer is longer than model_max_length "
                                       f"{self.max_length} with its prompt")
        row, other = rows
        return {**row, "rejected_input_ids": other["input_ids"], "rejected_labels": other["labels"],
                "rejected_length": other["length"]}

    def media(self, images: bytes | Sequence[bytes] | None, video: bytes | None) -> Media:
        """Decode and tile a record's images or video (see ``build``)."""
        images = [] if images is None else [images] if isinstance(images, bytes) else list(images)
        tile = self.settings.tile_size
        if (len(images) > 1 or video is not None) and not self.settings.onevision:
            raise NeedsOnevisionError(
                f"{'a video' if video is not None else f'{len(images)} images'} in one record needs a "
                "llava_onevision checkpoint; this one takes one image per sample")
        if len(images) > self.max_images:
            raise TooManyImagesError(f"{len(images)} images in one record, above data.max_images {self.max_images}")
        decoded = [decode_image(data, self.max_image_pixels) for data in images]
        sizes = [(image.height, image.width) for image in decoded]
        frames = np.zeros((0, 3, tile, tile), np.uint8)
        if len(decoded) == 1:  # a lone image: the recipe's mode (anyres_max_N for OneVision)
            tiles = self.settings.tile(decoded[0], self.image_mode, self.max_image_pixels)
            tokens_per_image, image_tokens = [self.settings.token_count(sizes[0], self.image_mode)], [IMAGE_PLACEHOLDER]
        elif decoded:  # several images (OneVision): one padded base-size tile each
            tiles = np.concatenate([self.settings.tile_stacked(image, self.max_image_pixels) for image in decoded])
            tokens_per_image = [self.settings.stacked_token_count()] * len(decoded)
            image_tokens = [IMAGE_PLACEHOLDER] * len(decoded)
        else:
            tiles, tokens_per_image, image_tokens = np.zeros((0, 3, tile, tile), np.uint8), [], []
        if video is not None:
            frames = self.settings.tile_frames(sample_video(video, self.video).frames)
            tokens_per_image, image_tokens = [self.settings.video_token_count(len(frames))], [VIDEO_TOKEN]
        return Media(sizes, tiles, frames, tokens_per_image, image_tokens, video is not None)

    def row(self, record: dict[str, Any], media: Media) -> dict[str, Any]:
        """Tokenise ``record``'s conversation around its tiled ``media`` into a training row."""
        conversation = record["conversations"]
        if media.video:  # LLaVA-Video's records mark the video with <image>; <video> is accepted too
            conversation = [{**turn, "value": turn["value"].replace(VIDEO_TOKEN, IMAGE_PLACEHOLDER)}
                            if isinstance(turn, dict) and isinstance(turn.get("value"), str) else turn
                            for turn in conversation]
        sample = tokenize_conversation(
            conversation, self.tokenizer, self.chat_template, tokens_per_image=media.tokens_per_image,
            image_token=media.image_tokens, max_length=self.max_length, truncation=self.truncation,
        )
        sizes = media.sizes
        return {
            "id": str(record["id"]),
            "modality": modality_of(len(sizes), media.video),
            "input_ids": np.asarray(sample.input_ids, dtype=np.int32),
            "labels": np.asarray(sample.labels, dtype=np.int32),
            "length": len(sample.input_ids),
            "tiles": media.tiles,
            "image_size": np.asarray(sizes[0] if sizes else (0, 0), dtype=np.int32),
            "image_sizes": np.asarray(sizes, dtype=np.int32).reshape(len(sizes), 2),
            "frames": media.frames,
            "num_tiles": len(media.tiles) + len(media.frames),
            "truncated": sample.truncated,
        }


@dataclass(frozen=True)
class Media:
    """A record's decoded and tiled images or video, and what they put in the token sequence."""

    sizes: list[tuple[int, int]]
    """Each image's original (height, width)."""
    tiles: np.ndarray
    """uint8 (num_tiles, 3, T, T)."""
    frames: np.ndarray
    """uint8 (num_frames, 3, T, T)."""
    tokens_per_image: list[int]
    image_tokens: list[str]
    video: bool


def modality_of(images: int, video: bool) -> str:
    """A row's ``modality``: ``text``, ``image``, ``multi_image`` or ``video`` (batches group by it)."""
    if video:
        return "video"
    return "text" if images == 0 else "image" if images == 1 else "multi_image"
