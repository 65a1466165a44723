"""The OpenAI-compatible request and response shapes, and the errors a client can cause.

Requests are validated here, before anything touches the model, into the core's ``GenerationRequest``:
every problem becomes a ``RequestError`` that the HTTP layer turns into OpenAI's error JSON
(``{"error": {"message", "type", "param", "code"}}``) with its 4xx status. The limits are the Serve
config's (``config.schema.ServeLimits``).
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llava_platform.config.schema import ServeLimits
from llava_platform.generation.request import GenerationRequest, RequestError

ROLES = ("system", "user", "assistant")


NOT_IMPLEMENTED = ("tools", "tool_choice", "functions", "function_call", "top_logprobs", "logit_bias", "modalities",
                   "audio", "prediction", "reasoning_effort", "web_search_options")
"""OpenAI request fields this server does not implement: a request that sets one gets a 400 naming it."""


class ChatCompletionBody(BaseModel):
    """``POST /v1/chat/completions``: every field we honour, and the few we accept because they cannot change
    the answer (``user``, ``metadata``, ...). Any other field is a 400 that names it (``parse_chat_request``):
    nothing a client asks for is silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    """One choice per request (``n > 1`` is refused)."""
    logprobs: bool = Field(False, le=False)
    """Log-probabilities are not returned: ``true`` is refused."""
    response_format: dict[str, Any] | None = None
    """Only ``{"type": "text"}`` (the default); JSON modes are refused."""
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    """OpenAI's penalties are not implemented: only 0 (their default) is accepted."""
    stream_options: dict[str, Any] | None = None
    """Streams always end with a ``usage`` chunk, as ``{"include_usage": true}`` asks."""
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    """Accepted and without effect: who asks, how the client files the call, and (without ``tools``) nothing."""


def parse_chat_request(body: Any, limits: ServeLimits, fetcher=None) -> GenerationRequest:
    """Validate a decoded JSON body into a ``GenerationRequest``.

    Args:
        body: the JSON body (anything: a list or a string is refused too).
        fetcher: ``(url, max_bytes, kind) -> bytes`` for allow-listed ``http(s)`` URLs (default: ``fetch_media``).

    Raises:
        RequestError: 400 for any malformed field, unknown role, bad or oversized image, or a
            ``max_tokens`` above the cap.
    """
    from llava_platform.data.errors import SampleError
    from llava_platform.data.images import decode_image
    from llava_platform.data.video import sample_video

    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    for name in NOT_IMPLEMENTED:
        if body.get(name) is not None:
            raise RequestError(400, f"{name}: not implemented by this server (a LLaVA model answering in text); remove "
                                "the field", param=name, code="unsupported_parameter")
    try:
        request = ChatCompletionBody.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise RequestError(400, f"{param}: not a field this server knows (serve/README.md lists them)",
                           param=param, code="unknown_parameter") from error
        raise RequestError(400, f"{param}: {first['msg']}", param=param) from error
    if request.response_format not in (None, {"type": "text"}):
        raise RequestError(400, f"response_format: only {{'type': 'text'}} is supported, not {request.response_format}",
                       param="response_format", code="unsupported_parameter")
    if not request.messages:
        raise RequestError(400, "messages must hold at least one message", param="messages")
    max_tokens = request.max_completion_tokens or request.max_tokens or limits.max_tokens
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens {max_tokens} is over this server's cap of {limits.max_tokens}",
                       param="max_tokens")
    conversation, image_bytes, video_bytes = [], [], []
    for index, message in enumerate(request.messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise RequestError(400, f"messages.{index}.role: {role!r} is not one of {', '.join(ROLES)}",
                           param=f"messages.{index}.role")
        parts = _content_parts(message.get("content"), f"messages.{index}.content")
        content = []
        for number, part in enumerate(parts):
            where = f"messages.{index}.content.{number}"
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                content.append({"type": "text", "text": _checked_text(part["text"], where)})
            elif part.get("type") == "image_url":
                url = part["image_url"].get("url") if isinstance(part.get("image_url"), dict) else None
                if len(image_bytes) == limits.max_images:
                    raise RequestError(400, f"more than {limits.max_images} images; this server takes at most "
                                        f"{limits.max_images} per request", param="messages")
                image_bytes.append((where, _media_bytes(url, where, IMAGE, limits.max_image_bytes,
                                                        limits.allowed_image_hosts, fetcher or fetch_media)))
                content.append({"type": "image"})
            elif part.get("type") == "video_url":
                url = part["video_url"].get("url") if isinstance(part.get("video_url"), dict) else None
                if len(video_bytes) == limits.max_videos:
                    raise RequestError(400, f"more than {limits.max_videos} video(s); this server takes at most "
                                        f"{limits.max_videos} per request", param="messages")
                video_bytes.append((where, _media_bytes(url, where, VIDEO, limits.max_video_bytes,
                                                        limits.allowed_video_hosts, fetcher or fetch_media)))
                content.append({"type": "video"})
            else:
                raise RequestError(400, f"{where}: a part must be {{type: text, text}}, {{type: image_url, image_url: "
                                    "{url}} or {type: video_url, video_url: {url}}", param=where)
        conversation.append({"role": role, "content": content})
    images = []
    for where, data in image_bytes:
        try:
            images.append(decode_image(data, limits.max_image_pixels, limits.max_image_aspect_ratio))
        except SampleError as error:
            raise RequestError(400, f"{where}: {error}", param=where, code=error.reason) from error
    videos = []
    for where, data in video_bytes:
        try:
            videos.append(sample_video(data, limits.video_limits()).frames)
        except SampleError as error:
            raise RequestError(400, f"{where}: {error}", param=where, code=error.reason) from error
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return GenerationRequest(conversation=conversation, images=images, videos=videos, max_tokens=max_tokens,
                      temperature=request.temperature, top_p=request.top_p, stop=stop, seed=request.seed,
                      stream=request.stream)


def _checked_text(text: str, where: str) -> str:
    """Text parts may not smuggle in the image or video placeholder (media come as parts) or unencodable
    characters."""
    from llava_platform.data.templates import IMAGE_PLACEHOLDER, VIDEO_TOKEN

    for placeholder, part in ((IMAGE_PLACEHOLDER, "image_url"), (VIDEO_TOKEN, "video_url")):
        if placeholder in text:
            raise RequestError(400, f"{where}: text may not contain {placeholder}; send media as {part} parts",
                           param=where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(400, f"{where}: text is not valid Unicode ({error.reason})", param=where) from error
    return text


def _content_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return content
    raise RequestError(400, f"{where}: content must be a string or a list of parts", param=where)


@dataclass(frozen=True)
class MediaKind:
    """What a part's URL holds: ``image`` (``image_url``) or ``video`` (``video_url``)."""

    name: str
    example: str


IMAGE, VIDEO = MediaKind("image", "data:image/png;base64,..."), MediaKind("video", "data:video/mp4;base64,...")


def _media_bytes(url: Any, where: str, kind: MediaKind, max_bytes: int, allowed_hosts: tuple[str, ...],
                 fetcher) -> bytes:
    """The bytes of a ``data:`` URL, or of an allow-listed ``http(s)`` URL; everything else is refused."""
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}.{kind.name}_url.url is missing", param=where)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(400, f"{where}: only base64 data URLs are supported ({kind.example})", param=where)
        if len(payload) * 3 // 4 > max_bytes:
            raise RequestError(400, f"{where}: {kind.name} is over the {max_bytes:,}-byte limit", param=where,
                           code=f"{kind.name}_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError(400, f"{where}: the data URL is not valid base64", param=where) from error
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme in ("http", "https") and parsed.hostname in allowed_hosts:
        return fetcher(url, max_bytes, kind.name)
    raise RequestError(400, f"{where}: {kind.name} URLs must be base64 data: URLs (this server fetches no remote URLs"
                        f"{'' if not allowed_hosts else ' outside its allow-list'})", param=where)


def fetch_media(url: str, max_bytes: int, kind: str, timeout_s: float = 10.0) -> bytes:
    """GET an allow-listed ``kind`` (``image``, ``video``) URL: no redirects (they could leave the allow-list), at
    most ``max_bytes``."""
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(url, timeout=timeout_s) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError) as error:
        raise RequestError(400, f"cannot fetch {url}: {error}") from error
    if len(data) > max_bytes:
        raise RequestError(400, f"{url}: {kind} is over the {max_bytes:,}-byte limit", code=f"{kind}_too_large")
    return data


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_completion(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
                    ) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` response."""
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def chat_chunk(chunk_id: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of a streamed response."""
    chunk = {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if usage is not None:
        chunk["usage"] = usage
    return chunk

