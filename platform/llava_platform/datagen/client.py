"""An async client for any OpenAI-compatible ``/v1/chat/completions``, made to be run hard for hours.

    client = ChatClient(ClientSettings(url="http://127.0.0.1:8000/v1", model="teacher"), api_key=key)
    outcome = await client.complete(messages)     # never raises for the endpoint's failures

What it adds to the ``openai`` client (used with its own retries off, so that each retry is counted):

- at most ``concurrency`` requests in flight; ``requests_per_minute`` / ``tokens_per_minute`` token
  buckets (the endpoint's published limits; a share of them per client when several clients run);
- retries of 429, 5xx, timeouts, dropped connections and 200s whose body is not a chat completion,
  with exponential backoff and full jitter (``Retry-After`` honoured), ``timeout_s`` per try;
- a run-wide token cap through a ``Budget``: each request reserves its worst case (prompt estimate +
  ``max_tokens``) before it is sent and settles on the usage it reports, so the cap is never passed;
  a request that cannot reserve is not sent (``Outcome.skipped``).

An ``Outcome`` carries the content, ``finish_reason``, usage and retries, or the last error.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Protocol

import openai


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


RETRIED = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError)


class ChatClient:
    """One event loop's client. ``share`` scales concurrency and rate limits when ``n`` clients split them."""

    def __init__(self, settings: ClientSettings, *, api_key: str = "", budget: Budget | None = None,
                 share: float = 1.0):
        self.settings, self.budget = settings, budget
        self.client = openai.AsyncOpenAI(base_url=settings.url, api_key=api_key or "none", max_retries=0,
                                         timeout=settings.timeout_s)
        self.slots = asyncio.Semaphore(max(1, round(settings.concurrency * share)))
        self.requests = TokenBucket(settings.requests_per_minute * share) if settings.requests_per_minute else None
        self.tokens = TokenBucket(settings.tokens_per_minute * share) if settings.tokens_per_minute else None

    async def complete(self, messages: list[dict[str, str]]) -> Outcome:
        estimate = sum(len(m["content"]) for m in messages) // 4 + 16 * len(messages)
        worst = estimate + self.settings.max_tokens
        if self.budget is not None and not await self.budget.reserve(worst):
            return Outcome(skipped=True)
        outcome = Outcome()
        try:
            async with self.slots:
                for attempt in range(self.settings.max_retries + 1):
                    if self.requests:
                        await self.requests.take(1)
                    if self.tokens:
                        await self.tokens.take(worst)
                    try:
                        response = await self.client.chat.completions.create(
                            model=self.settings.model, messages=messages, max_tokens=self.settings.max_tokens,
                            temperature=self.settings.temperature)
                        choice = response.choices[0]
                        usage = response.usage
                        outcome.content, outcome.finish_reason = choice.message.content, choice.finish_reason
                        outcome.prompt_tokens = usage.prompt_tokens if usage else estimate
                        outcome.completion_tokens = usage.completion_tokens if usage else len(
                            (outcome.content or "").split())
                        outcome.error = None
                        return outcome
                    except RETRIED as error:
                        outcome.error = f"{type(error).__name__}: {error}"[:300]
                        retry_after = _retry_after(error)
                    except openai.APIStatusError as error:  # other 4xx: retrying will not help
                        outcome.error = f"{type(error).__name__}: {error}"[:300]
                        return outcome
                    except (ValueError, LookupError, AttributeError, TypeError) as error:  # a malformed 200
                        outcome.error = f"malformed response: {type(error).__name__}: {error}"[:300]
                        retry_after = None
                    if attempt == self.settings.max_retries:
                        return outcome
                    outcome.retries += 1
                    ceiling = min(self.settings.backoff_max_s, self.settings.backoff_s * 2**attempt)
                    await asyncio.sleep(retry_after if retry_after is not None else random.uniform(0, ceiling))
        finally:
            if self.budget is not None:
                await self.budget.settle(worst, outcome.prompt_tokens + outcome.completion_tokens)
        return outcome

    async def close(self) -> None:
        await self.client.close()


def _retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None
