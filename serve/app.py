"""The Ray Serve application: an OpenAI-compatible HTTP API over one LLaVA checkpoint.

    serve run serve/config.yaml                       # the config's args name the model
    python -m jobs.deploy --model models:/tiny-cpu-demo/1 --config serve/config.yaml

Routes: ``GET /`` (the chat page, ``serve/chat.html``), ``POST /v1/chat/completions`` (text and
``image_url`` parts, ``stream: true`` as server-sent events), ``GET /v1/models``, ``GET /healthz``,
``GET /v1/stats``. The config's ``args`` are a ``config.schema.ServeConfig`` (validated once, at the
replica's start); ``args.engine`` picks what generates (``llava_platform.generation``: ``transformers`` or
``vllm``), and the replica holds it as a ``GenerationEngine``: everything here is the same code on both.
Non-streaming requests queue through ``@serve.batch`` in groups of the engine's ``batch_size`` (the
configured ``max_batch_size``) for an engine that batches statically; they go straight to an engine that
batches continuously (``batch_size`` 1: ``@serve.batch`` runs one batch at a time per replica, so it would
serialise them); streaming ones generate on their own. The ``/v1`` routes take the API key through one
FastAPI dependency (``require_api_key``). Every request the server refuses raises ``RequestError``, which
an exception handler turns into OpenAI's error JSON with its 4xx status (anything unexpected: a 500 in the
same shape), and the replica keeps serving.

(No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` type on the
routes that Ray Serve's ingress wraps. The ingress serialises the class when it is decorated, so
the helpers it calls are defined above it.)
"""



import asyncio
import hmac
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from llava_platform.config.schema import ServeConfig
from llava_platform.generation.engine import open_engine
from llava_platform.generation.request import Completion, Prepared, RequestError
from llava_platform.model.sources import resolve_checkpoint
from serve.openai_api import chat_chunk, chat_completion, completion_id, parse_chat_request

CHAT_PAGE = Path(__file__).with_name("chat.html")
"""The page ``GET /`` serves: a static client of this API (no key needed to load it; its requests send one)."""

API_KEY_ENV = "LLAVA_SERVE_API_KEY"
"""The bearer token clients must send; the config's ``api_key`` takes precedence. Unset: no auth."""

api = FastAPI(title="LLaVA Platform", description="OpenAI-compatible chat completions with images")


async def _json_body(request: Request, max_bytes: int) -> Any:
    """The decoded JSON body; 413 above ``max_bytes``, 400 for anything that is not JSON."""
    body = await request.body()
    if len(body) > max_bytes:
        raise RequestError(413, f"the body is {len(body):,} bytes; this server takes at most {max_bytes:,}")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(400, f"the body is not valid JSON: {error}") from error


@api.exception_handler(RequestError)
def _refused(request: Request, error: RequestError) -> JSONResponse:
    """A request the server refuses: OpenAI's error JSON with the error's 4xx status."""
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(Exception)
def _server_error(request: Request, error: Exception) -> JSONResponse:
    """Anything unexpected still answers in OpenAI's error shape (and the replica keeps serving)."""
    return JSONResponse(RequestError(500, f"internal error: {type(error).__name__}", type="server_error").body(),
                        status_code=500)


def _replica() -> Any:
    """The ``LlavaServer`` answering this request (what Ray Serve injects as the routes' ``self``)."""
    return serve.get_replica_context().servable_object


async def count_request() -> None:
    """FastAPI dependency: count the request in ``/v1/stats`` (before auth, so refused ones count too)."""
    _replica().requests += 1  # async: runs on the event loop, so concurrent requests never race here


async def require_api_key(request: Request) -> None:
    """FastAPI dependency of the routes that need a key: ``Authorization: Bearer <key>`` must match.

    The key is the replica's (the config's ``api_key``, else ``LLAVA_SERVE_API_KEY``); with none set,
    every request passes.

    Raises:
        RequestError: 401 ``invalid_api_key``, answered by the ``RequestError`` handler above.
    """
    key = _replica().api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    if not hmac.compare_digest(header.encode(), f"Bearer {key}".encode()):
        raise RequestError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")


def exposure_warning(host: str | None, api_key: str | None) -> str | None:
    """A warning when the endpoint listens beyond this machine with no API key (``None`` when it does not).

    Args:
        host: the address Serve's HTTP proxy binds (``http_options.host``).
        api_key: the key the replicas require (the config's ``api_key``, else ``LLAVA_SERVE_API_KEY``).
    """
    import ipaddress

    if api_key or not host or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to any interface
    return (f"the endpoint listens on {host} with no API key: anyone who can reach this address can use the model; "
            f"set {API_KEY_ENV} (or args.api_key in the Serve config), or bind 127.0.0.1")


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@serve.deployment
@serve.ingress(api)
class LlavaServer:
    """One replica: a loaded checkpoint, a request queue that batches, and the HTTP routes."""

    def __init__(self, **args: Any):
        """``args``: a ``ServeConfig`` (``serve/config.yaml``'s ``args``), validated here: a wrong key is named."""
        config = ServeConfig.model_validate(args)
        cache = config.cache_dir or os.path.join(tempfile.gettempdir(), "llava-serve-cache")
        checkpoint = resolve_checkpoint(config.model, cache, tracking_uri=config.tracking_uri,
                                        s3_endpoint_url=config.s3_endpoint_url)
        self.model_name = config.model_name or config.model
        self.served = [self.model_name, *config.lora_adapters]
        """What clients may send as ``model``: the checkpoint, then each LoRA adapter by name."""
        self.engine = open_engine(config.engine, checkpoint, model_name=self.model_name, device=config.device,
                                  dtype=config.dtype, vllm=config.vllm.build(config.dtype),
                                  adapters=config.lora_adapters)
        self.limits = config.limits
        self.api_key = config.api_key or os.environ.get(API_KEY_ENV)
        self.requests = 0
        self.chat_page = CHAT_PAGE.read_text()
        # a request holds at most max_images base64 images, max_videos videos and text: refuse bigger bodies unread
        limits = self.limits
        media = limits.max_images * limits.max_image_bytes + limits.max_videos * limits.max_video_bytes
        self.max_body_bytes = media * 4 // 3 + 1_000_000
        batch_size = self.engine.batch_size(config.max_batch_size)
        self.batched = batch_size > 1
        """Requests wait for each other in ``generate_batch``; else each goes to the engine at once."""
        self.generate_batch.set_max_batch_size(batch_size)
        self.generate_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, items: list[Prepared]) -> list[Completion | Exception]:
        return await self.engine.complete(items)

    @api.post("/v1/chat/completions", dependencies=[Depends(count_request), Depends(require_api_key)])
    async def chat_completions(self, request: Request):
        body = await _json_body(request, self.max_body_bytes)
        if isinstance(body, dict) and "model" in body and body["model"] not in self.served:
            raise RequestError(404, f"model {body['model']!r} is not served here; GET /v1/models lists "
                                f"{', '.join(map(repr, self.served))}", param="model", code="model_not_found")
        prepared = await asyncio.to_thread(self._prepare, body)  # image decoding stays off the event loop
        if body.get("model", self.model_name) != self.model_name:
            prepared.adapter = body["model"]
        if prepared.request.stream:
            return StreamingResponse(self._events(prepared), media_type="text/event-stream")
        answer = await self.generate_batch(prepared) if self.batched else (await self.engine.complete([prepared]))[0]
        if isinstance(answer, Exception):
            raise answer
        return chat_completion(prepared.adapter or self.model_name, answer.text, answer.finish_reason,
                               answer.prompt_tokens, answer.completion_tokens)

    def _prepare(self, body: Any) -> Prepared:
        return self.engine.prepare(parse_chat_request(body, self.limits))

    async def _events(self, prepared: Prepared) -> AsyncIterator[str]:
        """Server-sent events: the role, the text pieces, the finish reason with usage, then ``[DONE]``.

        Text that could be the start of a stop string is held back until it cannot; a stop string,
        or the client going away, cancels the generation.
        """
        chunk_id, stops = completion_id(), [s for s in prepared.request.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        pieces = self.engine.stream(prepared)
        sent, text, stopped = 0, "", False
        try:
            yield _event(chat_chunk(chunk_id, self.model_name, {"role": "assistant", "content": ""}))
            async for piece in pieces:
                text += piece
                cut = min((text.index(s) for s in stops if s in text), default=None)
                stopped = cut is not None
                ready = cut if stopped else max(sent, len(text) - hold)
                if ready > sent:
                    yield _event(chat_chunk(chunk_id, self.model_name, {"content": text[sent:ready]}))
                    sent = ready
                if stopped:
                    break
            if not stopped and len(text) > sent:
                yield _event(chat_chunk(chunk_id, self.model_name, {"content": text[sent:]}))
        finally:
            await pieces.aclose()  # cancels the generation when it has not ended (stop string, client gone)
        done = prepared.generated
        tokens = done.completion_tokens if done else 0
        finish = "stop" if stopped else (done.finish_reason if done else "stop")
        prompt = done.prompt_tokens if done else prepared.prompt_tokens
        usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
        yield _event(chat_chunk(chunk_id, self.model_name, {}, finish_reason=finish, usage=usage))
        yield "data: [DONE]\n\n"

    @api.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def models(self):
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "llava-platform"} for name in self.served]}

    @api.get("/", response_class=HTMLResponse)
    async def chat_page(self):
        return HTMLResponse(self.chat_page)

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "model": self.model_name}

    @api.get("/v1/stats", dependencies=[Depends(require_api_key)])
    async def stats(self):
        """Requests received, and the engine's counters: ``generate_calls`` (static batches: batching shows as
        fewer calls than requests), or ``finished`` and ``aborted`` requests (an engine that batches continuously)."""
        return {"requests": self.requests, "engine": await self.engine.stats()}

    async def check_health(self) -> None:
        """Ray Serve's health probe: a replica whose model or engine is gone gets replaced."""
        await self.engine.check_health()


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder that ``serve run`` / ``serve deploy`` call with the config's ``args`` (checked here
    first, so that a wrong key fails the deploy command, naming it, before any replica starts)."""
    ServeConfig.model_validate(args)
    return LlavaServer.bind(**args)


def default_config_path() -> Path:
    return Path(__file__).with_name("config.yaml")
