"""The HTTP layer without Ray Serve: the API key, the request count and OpenAI's error JSON on each route.

The routes are called as plain ASGI with a stand-in replica (what Ray Serve would inject as ``self``);
no model is loaded.
"""

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from ray import serve

from llava_platform.generation.request import Completion, Prepared
from serve.app import api, exposure_warning

KEY = "secret"


@pytest.fixture
def replica(monkeypatch):
    """The replica the routes and their dependencies see, with key ``KEY``."""

    def prepare(body):
        raise RuntimeError("the model is on fire")

    async def stats():
        return {"generate_calls": 0}

    server = SimpleNamespace(api_key=KEY, requests=0, model_name="tiny", served=["tiny"], max_body_bytes=1_000,
                             engine=SimpleNamespace(stats=stats), _prepare=prepare)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=server))
    return server


def call(method: str, path: str, body: bytes = b"", key: str | None = KEY) -> tuple[int, dict]:
    """One HTTP request through the FastAPI app: the status and the decoded JSON body."""
    headers = [(b"content-type", b"application/json")] + ([(b"authorization", f"Bearer {key}".encode())]
                                                           if key is not None else [])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    incoming, sent = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    try:
        asyncio.run(api(scope, receive, send))
    except RuntimeError:  # Starlette re-raises what it answered with a 500, for the server's log
        pass
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def refusal(message: str, code: str | None = None, param: str | None = None, type="invalid_request_error"):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


WRONG_KEY = refusal("missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models"), ("GET", "/v1/stats"),
                                              ("POST", "/v1/chat/completions")])
@pytest.mark.parametrize("key", [None, "wrong"])
def test_routes_refuse_a_missing_or_wrong_key(replica, method, path, key):
    assert call(method, path, b"{}", key=key) == (401, WRONG_KEY)


def test_the_right_key_or_none_configured_passes(replica):
    status, models = call("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]
    replica.api_key = None
    assert call("GET", "/v1/stats", key=None) == (200, {"requests": 0, "engine": {"generate_calls": 0}})
    assert call("GET", "/healthz", key=None) == (200, {"status": "ok", "model": "tiny"})


def test_chat_refusals_are_openai_errors_and_count_as_requests(replica):
    assert call("POST", "/v1/chat/completions", b"{not json")[0] == 400
    assert call("POST", "/v1/chat/completions", b"x" * 1_001) == (
        413, refusal("the body is 1,001 bytes; this server takes at most 1,000"))
    assert call("POST", "/v1/chat/completions", b'{"model": "gpt-4o"}') == (404, refusal(
        "model 'gpt-4o' is not served here; GET /v1/models lists 'tiny'", code="model_not_found", param="model"))
    assert call("POST", "/v1/chat/completions", b"{}", key="wrong")[0] == 401
    assert call("POST", "/v1/chat/completions", b'{"model": "tiny"}') == (
        500, refusal("internal error: RuntimeError", type="server_error"))
    assert replica.requests == 5, "every chat request counts in /v1/stats, refused ones too"


@pytest.mark.parametrize(("host", "key", "warned"), [
    ("0.0.0.0", None, True), ("10.1.2.3", "", True), ("llava.internal", None, True),
    ("0.0.0.0", "secret", False), ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False),
])
def test_listening_beyond_this_machine_without_a_key_is_warned_about(host, key, warned):
    warning = exposure_warning(host, key)
    assert (warning is not None) == warned
    if warned:
        assert host in warning and "LLAVA_SERVE_API_KEY" in warning


def test_requests_to_a_continuously_batching_engine_reach_it_together(monkeypatch):
    """An engine with ``batch_size`` 1 (vLLM) gets each non-streaming request at once: ``@serve.batch`` runs one
    batch at a time per replica, so queueing through it would serialise them (what made the endpoint 0.15x of
    bare vLLM at 32 concurrent requests). Four requests must be inside the engine together."""
    together = threading.Barrier(4, timeout=5)  # broken (a 500) when the requests come one by one

    async def complete(items):
        await asyncio.to_thread(together.wait)
        return [Completion(text="red", finish_reason="stop", prompt_tokens=3, completion_tokens=1)]

    def prepare(body):
        return Prepared(inputs={}, prompt_tokens=3, request=SimpleNamespace(stream=False))

    async def generate_batch(prepared):
        raise AssertionError("queued through @serve.batch")

    server = SimpleNamespace(api_key=None, requests=0, model_name="tiny", served=["tiny"], max_body_bytes=1_000,
                             engine=SimpleNamespace(complete=complete), _prepare=prepare, batched=False,
                             generate_batch=generate_batch)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=server))

    with ThreadPoolExecutor(4) as pool:  # four clients at once, each through the ASGI app
        answers = list(pool.map(lambda _: call("POST", "/v1/chat/completions", b"{}", key=None), range(4)))
    assert [status for status, _ in answers] == [200] * 4, answers
    assert all(body["choices"][0]["message"]["content"] == "red" for _, body in answers)
