"""LLaVA-format conversations -> ``input_ids`` and ``labels``, with labels exact by construction.

A conversation is rendered with its Jinja chat template (``templates.py``); the template marks the
assistant answers (plus their end-of-turn token) with ``{% generation %}`` blocks, and transformers'
renderer reports those character spans. A token is a label exactly when its characters overlap an
answer span. There is no length arithmetic to disagree with the real tokenisation (the cause of
the reference code's silent "tokenization mismatch"): if a span maps to no token, or a token mixes
prompt text with answer text, tokenisation fails loudly.

Each ``<image>`` placeholder is expanded to the image's exact token count before tokenisation,
so every sequence length is known before training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from jinja2.exceptions import TemplateError as JinjaTemplateError
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from llava_platform.data.errors import SampleError
from llava_platform.data.templates import IMAGE_PLACEHOLDER, VIDEO_TOKEN

IGNORE_INDEX = -100
"""Label value that the loss ignores (PyTorch's cross-entropy default)."""

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""LLaVA's ``from`` values (and the OpenAI names) -> chat-template roles."""


class ConversationError(SampleError):
    """A conversation that cannot be trained on."""

    reason = "bad_conversation"


class EmptyConversationError(ConversationError):
    reason = "empty_conversation"


class MissingFieldError(ConversationError):
    reason = "missing_field"


class UnknownRoleError(ConversationError):
    reason = "unknown_role"


class RoleOrderError(ConversationError):
    reason = "wrong_role_order"


class ImagePlaceholderError(ConversationError):
    reason = "image_placeholder_mismatch"


class TemplateRejectedError(ConversationError):
    reason = "template_rejected"


class SequenceTooLongError(ConversationError):
    reason = "too_long"


class LabelAlignmentError(ConversationError):
    reason = "label_alignment"


@dataclass(frozen=True)
class TokenizedConversation:
    """One training sequence. ``labels[i]`` is ``input_ids[i]`` or ``IGNORE_INDEX``; same length."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def to_chat_messages(conversation: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """LLaVA turns ``{"from": "human"|"gpt"|"system", "value": str}`` -> ``{"role", "content"}``.

    Enforces the order: an optional system turn, then user/assistant alternating, starting with the
    user and ending with the assistant.

    Raises:
        EmptyConversationError, MissingFieldError, UnknownRoleError, RoleOrderError.
    """
    if not conversation:
        raise EmptyConversationError("conversation has no turns")
    messages = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise MissingFieldError(f"turn {i} needs 'from' and 'value', got {turn!r:.200}")
        if not isinstance(turn["value"], str):
            raise MissingFieldError(f"turn {i}: 'value' must be a string, got {type(turn['value']).__name__}")
        role = ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise UnknownRoleError(f"turn {i}: unknown role {turn['from']!r}; allowed: {', '.join(ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    dialogue = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * ((len(dialogue) + 1) // 2)
    actual = [m["role"] for m in dialogue]
    if not dialogue or actual != expected[: len(actual)] or actual[-1] != "assistant":
        raise RoleOrderError(
            f"roles must alternate user/assistant starting with the user and ending with the assistant "
            f"(after an optional system turn); got {actual}"
        )
    return messages


def expand_image_placeholders(
    messages: list[dict[str, str]],
    tokens_per_image: Sequence[int],
    image_token: str | Sequence[str] = IMAGE_PLACEHOLDER,
) -> list[dict[str, str]]:
    """Replace the k-th ``<image>`` with ``tokens_per_image[k]`` copies of the image token (of
    ``image_token[k]`` when it is a list: OneVision's video is ``<video>`` tokens at an ``<image>`` placeholder).

    Raises:
        ImagePlaceholderError: placeholders in assistant turns, or their count differs from the images'.
    """
    found = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] != "assistant")
    in_answers = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] == "assistant")
    if in_answers:
        raise ImagePlaceholderError(f"{in_answers} {IMAGE_PLACEHOLDER} placeholder(s) in assistant turns")
    if found != len(tokens_per_image):
        raise ImagePlaceholderError(
            f"{found} {IMAGE_PLACEHOLDER} placeholder(s) for {len(tokens_per_image)} image(s); "
            "each image needs exactly one placeholder in a user turn"
        )
    counts = iter(tokens_per_image)
    tokens = iter([image_token] * len(tokens_per_image) if isinstance(image_token, str) else image_token)
    expanded = []
    for message in messages:
        text = message["content"]
        if text.count(IMAGE_PLACEHOLDER) == 1:  # LLaVA's normalisation: the image first, then the text
            text = IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()
        pieces = text.split(IMAGE_PLACEHOLDER)
        text = pieces[0] + "".join(next(tokens) * next(counts) + piece for piece in pieces[1:])
        expanded.append({**message, "content": text})
    return expanded


def _inside(token_start: int, token_end: int, start: int, end: int) -> bool:
    """Whether a token's characters overlap [start, end). Zero-width offsets (whitespace tokens of
    tokenizers that trim offsets) count where they sit."""
    if token_start == token_end:
        return start <= token_start < end
    return token_start < end and token_end > start


def label_tokens(
    rendered: str, answer_spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]]
) -> list[bool]:
    """Which tokens are answer tokens: those whose characters overlap an answer span.

    Args:
        rendered: the rendered conversation text.
        answer_spans: [start, end) character spans of assistant answers in ``rendered``.
        offsets: [start, end) character span of every token.

    Raises:
        LabelAlignmentError: a span covers no token, or a token mixes prompt and answer text.
    """
    is_label = [False] * len(offsets)
    for start, end in answer_spans:
        hits = [i for i, (s, e) in enumerate(offsets) if _inside(s, e, start, end)]
        if not hits:
            raise LabelAlignmentError(f"answer span {rendered[start:end]!r:.80} maps to no token")
        for i in hits:
            s, e = offsets[i]
            if rendered[s:start].strip() or rendered[end:e].strip():
                raise LabelAlignmentError(
                    f"token {rendered[s:e]!r} straddles an answer boundary; the template must separate "
                    "answers from surrounding text so that the tokenizer does not merge them"
                )
            is_label[i] = True
    return is_label


def tokenize_conversation(
    conversation: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str,
    *,
    tokens_per_image: Sequence[int],
    image_token: str | Sequence[str],
    max_length: int,
    truncation: Literal["drop", "truncate"],
) -> TokenizedConversation:
    """Tokenise one LLaVA-format conversation and mask everything but the assistant answers.

    Args:
        conversation: LLaVA turns, ``[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]``.
        tokenizer: a fast tokenizer that knows ``image_token`` as a single special token.
        chat_template: Jinja text with ``{% generation %}`` around answers (``resolve_chat_template``).
        tokens_per_image: image-token count of each image, in placeholder order (empty: text-only).
        image_token: the tokenizer's image token string, or one token string per placeholder (OneVision's
            video is ``<video>`` tokens).
        max_length: longest allowed sequence (``model_max_length``).
        truncation: ``drop`` raises on over-long samples; ``truncate`` cuts the tail, never an image.

    Returns:
        ``TokenizedConversation`` with ``len(input_ids) == len(labels) <= max_length``.

    Raises:
        ConversationError: a subclass naming what is wrong (see ``reason``).
    """
    messages = expand_image_placeholders(to_chat_messages(conversation), tokens_per_image, image_token)
    try:
        rendered, spans = render_jinja_template(
            conversations=[messages],
            chat_template=chat_template,
            return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
    except JinjaTemplateError as err:
        raise TemplateRejectedError(f"the chat template rejected this conversation: {err}") from err
    text, answer_spans = rendered[0], spans[0]
    answers = sum(m["role"] == "assistant" for m in messages)
    if len(answer_spans) != answers:
        raise LabelAlignmentError(
            f"the chat template marked {len(answer_spans)} answer span(s) for {answers} assistant turn(s); "
            "every assistant message must sit in a {% generation %} block"
        )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoding["input_ids"]
    is_label = label_tokens(text, answer_spans, encoding["offset_mapping"])
    labels = [tok if lab else IGNORE_INDEX for tok, lab in zip(input_ids, is_label, strict=True)]

    placeholders = [image_token] if isinstance(image_token, str) else list(image_token)
    visual_ids = {tokenizer.convert_tokens_to_ids(t) for t in [*placeholders, IMAGE_PLACEHOLDER, VIDEO_TOKEN]}
    visual_ids.discard(tokenizer.unk_token_id)  # a tokenizer without <video> maps it to unk (or None)
    visual_ids.discard(None)
    image_positions = [i for i, tok in enumerate(input_ids) if tok in visual_ids]
    if len(image_positions) != sum(tokens_per_image):
        raise ImagePlaceholderError(
            f"image tokens after tokenisation: expected {sum(tokens_per_image)}, got {len(image_positions)}; "
            "the text contains the image token itself or the tokenizer splits it"
        )
    if len(input_ids) <= max_length:
        return TokenizedConversation(input_ids, labels)
    if truncation == "drop":
        raise SequenceTooLongError(f"{len(input_ids)} tokens > model_max_length {max_length} (policy: drop)")
    if image_positions and image_positions[-1] >= max_length:
        raise SequenceTooLongError(
            f"{len(input_ids)} tokens > model_max_length {max_length}, and truncating would cut an image"
        )
    if all(label == IGNORE_INDEX for label in labels[:max_length]):
        raise SequenceTooLongError(f"truncating to {max_length} tokens leaves no answer tokens to learn from")
    return TokenizedConversation(input_ids[:max_length], labels[:max_length], truncated=True)
