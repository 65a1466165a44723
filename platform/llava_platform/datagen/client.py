"""An async client for any OpenAI-compatible ``/v1/chat/completions``, made to be run hard for hours.

    client = ChatClient(ClientSettings(url="http://127.0.0.1:8000/v1", model="teacher"), api_key=key)
    outcome = await client.complete(messages)     # never raises for the endpoint's failures

It speaks the protocol with ``aiohttp`` and ``json`` directly rather than through the ``openai`` client:
on the 2-core benchmark the official client's per-request work (request models, response validation)
held 32 requests in flight to 0.78 of the ideal rate by itself (``jobs.perf.datagen``, README).
What it adds to a plain HTTP client:

- at most ``concurrency`` requests in flight; ``requests_per_minute`` / ``tokens_per_minute`` token
  buckets (the endpoint's published limits; a share of them per client when several clients run);
- retries of 408, 409, 429, 5xx, timeouts, dropped connections and 200s whose body is not a chat completion,
  with exponential backoff and full jitter (``Retry-After`` honoured), ``timeout_s`` per try;
- a run-wide token cap through a ``Budget``: each request reserves its worst case (prompt estimate +
  ``max_tokens``) before it is sent and settles on the usage it reports, so the cap is never passed;
  a request that cannot reserve is not sent (``Outcome.skipped``).

An ``Outcome`` carries the content, ``finish_reason``, usage and retries, or the last error.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Protocol

import aiohttp


@dataclass(frozen=True)
class ClientSettings:
    """The endpoint and how hard to use it (``jobs.generate_data`` flags of the same names)."""

    url: str
    """Base URL of the API, as the ``openai`` client takes it (``https://api.openai.com/v1``)."""
    model: str
    concurrency: int = 32
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_tokens: int = 1024
    """Per response; a response that reaches it is quarantined as ``truncated``."""
    temperature: float = 0.7
    max_retries: int = 6
    timeout_s: float = 120.0
    backoff_s: float = 0.5
    """First retry's backoff ceiling; doubled per retry up to ``backoff_max_s`` (full jitter below it)."""
    backoff_max_s: float = 30.0


class Budget(Protocol):
    """The run's token cap, shared by every client (``pipelines/generate.py``: a Ray actor)."""

    async def reserve(self, tokens: int) -> bool: ...
    async def settle(self, reserved: int, used: int) -> None: ...


@dataclass
class Outcome:
    content: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    error: str | None = None
    """The last failure, once the retries are spent (the item is left for a rerun)."""
    skipped: bool = False
    """Not sent: the run's token budget is spent."""


class TokenBucket:
    """``rate`` per minute, bursting to one minute's worth; ``take(n)`` waits until ``n`` are there."""

    def __init__(self, per_minute: float):
        self.rate, self.capacity = per_minute / 60.0, per_minute
        self.level, self.stamp = per_minute, time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        async with self.lock:
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)


RETRIED_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class Retry(Exception):
    """A try that failed in a way another try may not: the status or error, and the server's Retry-After."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ChatClient:
    """One event loop's client. ``share`` scales concurrency and rate limits when ``n`` clients split them."""

    def __init__(self, settings: ClientSettings, *, api_key: str = "", budget: Budget | None = None,
                 share: float = 1.0):
        self.settings, self.budget = settings, budget
        self.endpoint = settings.url.rstrip("/") + "/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key or 'none'}", "Content-Type": "application/json"}
        self.session: aiohttp.ClientSession | None = None
        self.slots = asyncio.Semaphore(max(1, round(settings.concurrency * share)))
        self.requests = TokenBucket(settings.requests_per_minute * share) if settings.requests_per_minute else None
        self.tokens = TokenBucket(settings.tokens_per_minute * share) if settings.tokens_per_minute else None

    async def complete(self, messages: list[dict[str, str]]) -> Outcome:
        estimate = sum(len(m["content"]) for m in messages) // 4 + 16 * len(messages)
        worst = estimate + self.settings.max_tokens
        if self.budget is not None and not await self.budget.reserve(worst):
            return Outcome(skipped=True)
        outcome = Outcome()
        body = json.dumps({"model": self.settings.model, "messages": messages, "max_tokens": self.settings.max_tokens,
                           "temperature": self.settings.temperature})
        try:
            async with self.slots:
                for attempt in range(self.settings.max_retries + 1):
                    if self.requests:
                        await self.requests.take(1)
                    if self.tokens:
                        await self.tokens.take(worst)
                    try:
                        await self._try(body, outcome, estimate)
                        outcome.error = None
                        return outcome
                    except Retry as error:
                        outcome.error, retry_after = str(error)[:300], error.retry_after
                    except Failure as error:  # retrying will not help (401, 400, ...)
                        outcome.error = str(error)[:300]
                        return outcome
                    if attempt == self.settings.max_retries:
                        return outcome
                    outcome.retries += 1
                    ceiling = min(self.settings.backoff_max_s, self.settings.backoff_s * 2**attempt)
                    await asyncio.sleep(retry_after if retry_after is not None else random.uniform(0, ceiling))
        finally:
            if self.budget is not None:
                await self.budget.settle(worst, outcome.prompt_tokens + outcome.completion_tokens)
        return outcome

    async def _try(self, body: str, outcome: Outcome, estimate: int) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
                                                 connector=aiohttp.TCPConnector(limit=0))
        try:
            async with self.session.post(self.endpoint, data=body, headers=self.headers) as response:
                payload = await response.read()
                status = response.status
                retry_after = _seconds(response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError) as error:
            raise Retry(f"{type(error).__name__}: {error}") from error
        if status in RETRIED_STATUS:
            raise Retry(f"HTTP {status}: {payload[:200].decode('utf-8', 'replace')}", retry_after)
        if status != 200:
            raise Failure(f"HTTP {status}: {payload[:200].decode('utf-8', 'replace')}")
        try:
            completion = json.loads(payload)
            choice = completion["choices"][0]
            content, finish = choice["message"].get("content"), choice.get("finish_reason")
            usage = completion.get("usage") or {}
        except (ValueError, LookupError, AttributeError, TypeError) as error:
            raise Retry(f"malformed response: {type(error).__name__}: {error}") from error
        outcome.content, outcome.finish_reason = content, finish
        outcome.prompt_tokens = int(usage.get("prompt_tokens", estimate))
        outcome.completion_tokens = int(usage.get("completion_tokens", len((content or "").split())))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class Failure(Exception):
    """A try that another try would not fix (a 4xx other than 408/409/429)."""


def _seconds(value: str | None) -> float | None:
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None
