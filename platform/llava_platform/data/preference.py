"""Preference records (LLaVA-NeXT's DPO data) as the two conversations a DPO step compares.

    chosen, rejected = preference_pair(record)     # LLaVA-format records: the same prompt, one answer each

A record is ``{"id", "image" | "video", "prompt", "chosen", "rejected"}`` (optional ``chosen_score`` /
``rejected_score`` are kept, not used), as LLaVA-NeXT's ``train_dpo.py`` reads it: the prompt's ``<image>``
placeholders are dropped and one is put in front (``"<image>\\n" + prompt``) when the record has an image or a
video. Both conversations share the prompt and the media, so a pipeline tiles the media once for both.
Errors are ``SampleError``\\ s with the quarantine reason: ``missing_field`` (no prompt, chosen or rejected, or
one that is not text) and ``identical_answers`` (nothing to prefer).
"""

from __future__ import annotations

from typing import Any

from llava_platform.data.conversation import MissingFieldError
from llava_platform.data.errors import SampleError
from llava_platform.data.records import check_record, json_object
from llava_platform.data.templates import IMAGE_PLACEHOLDER

FIELDS = ("prompt", "chosen", "rejected")


class IdenticalAnswersError(SampleError):
    """A pair whose chosen and rejected answers are the same text."""

    reason = "identical_answers"


def preference_pair(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(chosen, rejected)`` LLaVA-format records of one preference record (see the module docstring).

    Raises:
        MissingFieldError: a field is missing, empty or not text.
        IdenticalAnswersError: chosen and rejected are the same.
    """
    if record.get("id") is None:
        raise MissingFieldError("preference record lacks id")
    for field in FIELDS:
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise MissingFieldError(f"preference record {record.get('id', '?')}: no {field!r} text")
    if record["chosen"].strip() == record["rejected"].strip():
        raise IdenticalAnswersError(f"preference record {record.get('id', '?')}: chosen and rejected are the same")
    prompt = record["prompt"].replace(IMAGE_PLACEHOLDER, "").strip()
    if "image" in record or "video" in record:
        prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
    media = {key: record[key] for key in ("image", "video") if key in record}

    def conversation(answer: str) -> dict[str, Any]:
        return {"id": record.get("id"), **media, "conversations": [{"from": "human", "value": prompt},
                                                                   {"from": "gpt", "value": answer}]}

    return conversation(record["chosen"]), conversation(record["rejected"])


def parse_preference(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``preference_pair`` of a raw record's JSON text, the chosen record checked as any record is
    (``records.check_record``: the id, the image or video fields).

    Raises:
        MalformedRecordError: not a JSON object.
        MissingFieldError, IdenticalAnswersError: as ``preference_pair`` and ``parse_record``.
    """
    chosen, rejected = preference_pair(json_object(text))
    return check_record(chosen), rejected
