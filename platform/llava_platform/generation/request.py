"""What every engine generates from, and what it gives back: one request, prepared, and its completion.

A ``GenerationRequest`` is a validated chat: the conversation for the checkpoint's chat template, its
decoded media in order, and the sampling settings. The Serve app parses OpenAI's JSON into one
(``serve/openai_api.py``); batch inference builds them from evaluation records. ``prepare_request``
renders and tiles it exactly as training did (the checkpoint's own template and processor), the same for
both engines, so both accept and refuse exactly the same requests. A request either engine refuses raises
``RequestError``: a client's mistake, with the HTTP status and OpenAI's error fields the endpoint answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llava_platform.inference import encode_chat


class RequestError(Exception):
    """A request that is refused: HTTP ``status`` (a 4xx for a client's mistake) and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        """OpenAI's error JSON."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """A validated request: the conversation for the chat template and the decoded media, in order."""

    conversation: list[dict[str, Any]]
    """Chat-template messages; an image is a ``{"type": "image"}`` content part, a video ``{"type": "video"}``."""
    images: list[Any] = field(default_factory=list)
    """PIL images, in the order their parts appear."""
    videos: list[list[Any]] = field(default_factory=list)
    """Each video part's sampled frames (PIL images), in order."""
    max_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    """Seeds the sampler; ``None``: unseeded."""
    stream: bool = False


@dataclass(frozen=True)
class Completion:
    """One generated answer."""

    text: str
    finish_reason: str
    """``stop`` (end of turn or a stop string) or ``length`` (``max_tokens`` reached)."""
    prompt_tokens: int
    """The prompt as the engine ran it (image placeholders expanded)."""
    completion_tokens: int


@dataclass
class Prepared:
    """One request ready for an engine: its model inputs (batch dimension 1) and its settings."""

    inputs: dict[str, Any]
    """What ``encode_chat`` returns: ``input_ids`` (1, L), ``pixel_values``, ..."""
    prompt_tokens: int
    request: GenerationRequest
    generated: Completion | None = None
    """Set when a streamed generation ends: token count and finish reason."""
    adapter: str | None = None
    """The LoRA adapter the request names (engines that serve adapters unmerged), else ``None``."""


def prepare_request(processor, request: GenerationRequest, context_length: int) -> Prepared:
    """Render the prompt with the checkpoint's chat template and tile the media with its processor.

    Raises:
        RequestError: 400 when the template refuses the conversation (e.g. roles out of order), the processor
            refuses the media, or the prompt plus ``max_tokens`` does not fit the context.
    """
    from jinja2 import TemplateError

    try:
        inputs = encode_chat(processor, request.conversation, request.images, request.videos)
    except TemplateError as error:
        raise RequestError(400, f"messages: this model's chat template refuses the conversation: {error}",
                           param="messages") from error
    except ValueError as error:  # e.g. image tokens and images that do not pair up
        raise RequestError(400, f"messages: the processor refuses this input: {error}", param="messages") from error
    prompt_tokens = int(inputs["input_ids"].shape[1])
    if prompt_tokens + request.max_tokens > context_length:
        raise RequestError(400, f"the prompt is {prompt_tokens} tokens (images included) and max_tokens is "
                                f"{request.max_tokens}: over the model's context of {context_length}",
                           param="messages", code="context_length_exceeded")
    return Prepared(inputs=inputs, prompt_tokens=prompt_tokens, request=request)
