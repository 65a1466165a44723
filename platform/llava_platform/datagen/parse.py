"""Teacher responses -> LLaVA-format training records, or a rejection with a reason for the quarantine.

    record = to_record(image, "conversation", content, finish_reason, prompts)   # or raises Rejected

Formats the prompts ask for: conversation and reasoning are turns, each ``Question:`` or ``Answer:`` on
its own line then the text, separated by lines of ``===``; a detailed description is plain prose (its
question comes from the prompt's instruction list). The image placeholder goes into the first human
turn, exactly once, first.
"""

from __future__ import annotations

import re
from typing import Any

from llava_platform.data.errors import SampleError
from llava_platform.datagen.annotations import ImageContext
from llava_platform.datagen.prompts import PromptSet

IMAGE = "<image>"
MAX_WORDS = 800
"""A response longer than this is ``too_long`` (the teacher's own cap is ``max_tokens`` per request)."""

_SEPARATOR = re.compile(r"^\s*={3,}\s*$", re.MULTILINE)
_ROLE = re.compile(r"^\s*(Question|Answer)\s*:\s*", re.IGNORECASE)
_REFUSAL = re.compile(r"^\s*(I'?m sorry|I am sorry|I apologi[sz]e|I can(?:no|')t|I am unable|As an AI)", re.IGNORECASE)
_LEAK = re.compile(r"\b(captions?|bounding[ -]box(?:es)?|bbox(?:es)?|coordinates?|descriptions? (?:provided|given))\b"
                   r"|\[\s*0?\.\d+\s*,\s*0?\.\d+", re.IGNORECASE)


class Rejected(SampleError):
    """A response that is not usable training data; ``reason`` is the quarantine's."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


REASONS = ("unparseable", "wrong_turn_structure", "mentions_captions_or_boxes", "empty", "truncated", "refused",
           "too_long")


def turns(content: str) -> list[tuple[str, str]]:
    """``[("question", text), ("answer", text), ...]`` of a Question:/Answer: response.

    Raises:
        Rejected: ``unparseable`` (a part without its Question:/Answer: label).
    """
    parts = [part.strip() for part in _SEPARATOR.split(content) if part.strip()]
    found = []
    for part in parts:
        match = _ROLE.match(part)
        if not match:
            raise Rejected("unparseable", f"a part does not start with 'Question:' or 'Answer:': {part[:80]!r}")
        found.append((match.group(1).lower(), part[match.end():].strip()))
    return found


def to_record(image: ImageContext, kind: str, content: str | None, finish_reason: str | None,
              prompts: PromptSet) -> dict[str, Any]:
    """The LLaVA-format record (``id``, ``image``, ``conversations``) of one response.

    Raises:
        Rejected: with the first reason that applies, in the order ``truncated``, ``empty``, ``refused``,
            ``unparseable``, ``wrong_turn_structure``, ``mentions_captions_or_boxes``, ``too_long``.
    """
    text = (content or "").strip()
    if finish_reason == "length":
        raise Rejected("truncated", "the response hit max_tokens (finish_reason 'length')")
    if not text:
        raise Rejected("empty", "the response is empty")
    if _REFUSAL.match(text):
        raise Rejected("refused", f"the teacher declined: {text[:80]!r}")
    if kind == "detail":
        if _SEPARATOR.search(text) or _ROLE.match(text):
            raise Rejected("wrong_turn_structure", "a detailed description is prose, not Question:/Answer: turns")
        pairs = [("question", prompts.detail_question(image.id)), ("answer", text)]
    else:
        pairs = turns(text)
        roles = [role for role, _ in pairs]
        alternating = roles == ["question", "answer"] * (len(roles) // 2) and len(roles) % 2 == 0
        if not pairs or not alternating or (kind == "reasoning" and len(pairs) != 2) or not all(t for _, t in pairs):
            raise Rejected("wrong_turn_structure", f"{kind} needs {'one' if kind == 'reasoning' else 'alternating'} "
                           f"question/answer pairs with text; got {roles}")
    generated = pairs if kind != "detail" else pairs[1:]
    leak = next((match for _, t in generated if (match := _LEAK.search(t))), None)
    if leak:
        raise Rejected("mentions_captions_or_boxes", f"the response mentions {leak.group(0)!r}")
    if sum(len(t.split()) for _, t in pairs) > MAX_WORDS:
        raise Rejected("too_long", f"more than {MAX_WORDS} words")
    conversations = [{"from": "human" if role == "question" else "gpt", "value": t.replace(IMAGE, "").strip()}
                     for role, t in pairs]
    conversations[0]["value"] = f"{IMAGE}\n{conversations[0]['value']}"
    return {"id": f"{image.id}-{kind}", "image": image.image, "conversations": conversations}
