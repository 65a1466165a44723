"""One LLaVA-format record -> one training row, or a ``SampleError`` that says why not.

Pure per-record logic, shared by the Ray Data pipeline (``pipelines/``) and anything else that
needs training rows. A row has the columns of the pipeline's Arrow schema (see
``pipelines/README.md``): ``id``, ``modality``, ``input_ids``, ``labels``, ``length``, ``tiles``
(uint8, (num_tiles, 3, T, T); zero tiles for text-only rows), ``image_size`` ([height, width]),
``truncated``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from llava_platform.data.conversation import MissingFieldError, tokenize_conversation
from llava_platform.data.errors import SampleError
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.images import decode_image
from llava_platform.data.rows import RowSpec
from llava_platform.data.templates import IMAGE_PLACEHOLDER, resolve_chat_template


class MalformedRecordError(SampleError):
    """A row that is not a JSON object."""

    reason = "malformed_json"


class MissingImageError(SampleError):
    """The record names an image file that does not exist."""

    reason = "missing_image"


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
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedRecordError(f"not valid JSON: {err}") from err
    if not isinstance(record, dict):
        raise MalformedRecordError(f"a record must be a JSON object, got {type(record).__name__}")
    missing = [key for key in ("id", "conversations") if key not in record]
    if missing:
        raise MissingFieldError(f"record lacks {', '.join(missing)}")
    if not isinstance(record["conversations"], list):
        raise MissingFieldError("'conversations' must be a list of turns")
    if record.get("image") is not None and not isinstance(record["image"], str):
        raise MissingFieldError("'image' must be a relative path string (one image per record)")
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
        )

    def build(self, record: dict[str, Any], image_bytes: bytes | None) -> dict[str, Any]:
        """Decode, tile and tokenise one record.

        Args:
            record: a parsed record (``parse_record``).
            image_bytes: the encoded image, or ``None`` for a text-only record.

        Raises:
            SampleError: the subclass names the reason (bad image, bad conversation, too long, ...).
        """
        tile = self.settings.tile_size
        if image_bytes is None:
            tiles, size, tokens_per_image = np.zeros((0, 3, tile, tile), np.uint8), (0, 0), []
        else:
            image = decode_image(image_bytes, self.max_image_pixels)
            size = (image.height, image.width)
            tiles = self.settings.tile(image, self.image_mode, self.max_image_pixels)
            tokens_per_image = [self.settings.token_count(size, self.image_mode)]
        sample = tokenize_conversation(
            record["conversations"], self.tokenizer, self.chat_template, tokens_per_image=tokens_per_image,
            image_token=IMAGE_PLACEHOLDER, max_length=self.max_length, truncation=self.truncation,
        )
        return {
            "id": str(record["id"]),
            "modality": "image" if image_bytes is not None else "text",
            "input_ids": np.asarray(sample.input_ids, dtype=np.int32),
            "labels": np.asarray(sample.labels, dtype=np.int32),
            "length": len(sample.input_ids),
            "tiles": tiles,
            "image_size": np.asarray(size, dtype=np.int32),
            "truncated": sample.truncated,
        }
