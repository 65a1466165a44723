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
- a run-wide token cap through a ``Budget``: every try (retries too) reserves its worst case before it
  is sent (an upper bound of the prompt's tokens + ``max_tokens``) and settles on what it may have been
  billed: the ``usage`` it reports; its worst case where the endpoint may have billed it without telling
  (a timeout, a dropped connection, a 200 whose body cannot be read); nothing for a 408/409/429/5xx/4xx
  status (not billed by OpenAI-compatible APIs). So the tokens billed stay under the cap as long as the
  prompt bound holds: exact with ``tokenizer`` (the endpoint model's tokenizer and chat template), else
  the prompt's UTF-8 bytes + ``MESSAGE_OVERHEAD`` per message (a byte-level BPE never makes more tokens
  than bytes). A try that cannot reserve is not sent (``Outcome.skipped`` for a request's first try).

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
    tokenizer: str | None = None
    """The endpoint model's tokenizer (a Hugging Face name or folder, read locally): exact prompt counts for
    the token cap; without it, an upper bound from the prompt's bytes."""


MESSAGE_OVERHEAD = 16
"""Tokens per message a chat template may add on top of the content's (role, separators, the generation
prompt), in the bound: ChatML and Llama-3 templates add 5, Vicuna's about 6."""


class PromptBound:
    """An upper bound of a chat request's prompt tokens, as the endpoint will count them."""

    def __init__(self, tokenizer: str | None = None):
        self.tokenizer = None
        if tokenizer is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    def __call__(self, messages: list[dict[str, str]]) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                          return_dict=True)["input_ids"])
        return sum(len(m["content"].encode("utf-8")) + MESSAGE_OVERHEAD for m in messages)


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
    """The usage the endpoint reported, summed over every try (a retried malformed answer's too)."""
    unreported_tries: int = 0
    """Tries that may have been billed without a usage coming back (timeouts, unreadable 200s)."""
    charged: int = 0
    """Tokens charged to the budget: the reported usage + each unreported try's worst case."""
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


UNKNOWN = -1
"""A try's billed tokens when the endpoint may have billed it without saying: charged at its worst case."""


class Retry(Exception):
    """A try that failed in a way another try may not: the status or error, the server's Retry-After, and
    what the try may have been billed (``UNKNOWN``: its worst case)."""

    def __init__(self, message: str, retry_after: float | None = None, billed: int = 0):
        super().__init__(message)
        self.retry_after, self.billed = retry_after, billed


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
        self.prompt_bound = PromptBound(settings.tokenizer)

    async def complete(self, messages: list[dict[str, str]]) -> Outcome:
        worst = self.prompt_bound(messages) + self.settings.max_tokens
        outcome = Outcome()
        body = json.dumps({"model": self.settings.model, "messages": messages, "max_tokens": self.settings.max_tokens,
                           "temperature": self.settings.temperature})
        async with self.slots:
            for attempt in range(self.settings.max_retries + 1):
                if self.budget is not None and not await self.budget.reserve(worst):
                    outcome.skipped = attempt == 0
                    outcome.error = None if attempt == 0 else f"token budget spent after {attempt} tries"
                    return outcome
                if self.requests:
                    await self.requests.take(1)
                if self.tokens:
                    await self.tokens.take(worst)
                billed, retry_after, final = UNKNOWN, None, True
                try:
                    billed = await self._try(body, outcome)
                    outcome.error = None
                except Retry as error:
                    outcome.error, retry_after, billed, final = str(error)[:300], error.retry_after, error.billed, False
                except Failure as error:  # retrying will not help (401, 400, ...): not billed
                    outcome.error, billed = str(error)[:300], 0
                finally:  # a cancelled or crashed try counts as unreported: charged its worst case
                    await self._charge(outcome, worst, billed)
                if final or attempt == self.settings.max_retries:
                    return outcome
                outcome.retries += 1
                ceiling = min(self.settings.backoff_max_s, self.settings.backoff_s * 2**attempt)
                await asyncio.sleep(retry_after if retry_after is not None else random.uniform(0, ceiling))
        return outcome

    async def _charge(self, outcome: Outcome, worst: int, billed: int) -> None:
        charged = worst if billed == UNKNOWN else billed
        outcome.unreported_tries += billed == UNKNOWN
        outcome.charged += charged
        if self.budget is not None:
            await self.budget.settle(worst, charged)

    async def _try(self, body: str, outcome: Outcome) -> int:
        """One try: fills ``outcome`` and returns the tokens the endpoint reported billing."""
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
                                                 connector=aiohttp.TCPConnector(limit=0))
        try:
            async with self.session.post(self.endpoint, data=body, headers=self.headers) as response:
                payload = await response.read()
                status = response.status
                retry_after = _seconds(response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError) as error:  # the endpoint may have answered (and billed) it
            raise Retry(f"{type(error).__name__}: {error}", billed=UNKNOWN) from error
        if status in RETRIED_STATUS:
            raise Retry(f"HTTP {status}: {payload[:200].decode('utf-8', 'replace')}", retry_after)
        if status != 200:
            raise Failure(f"HTTP {status}: {payload[:200].decode('utf-8', 'replace')}")
        try:
            completion = json.loads(payload)
        except ValueError as error:
            raise Retry(f"malformed response: {type(error).__name__}: {error}", billed=UNKNOWN) from error
        billed = _reported(completion, outcome)
        try:
            choice = completion["choices"][0]
            content, finish = choice["message"].get("content"), choice.get("finish_reason")
        except (LookupError, AttributeError, TypeError) as error:
            raise Retry(f"malformed response: {type(error).__name__}: {error}", billed=billed) from error
        outcome.content, outcome.finish_reason = content, finish
        return billed

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _reported(completion: object, outcome: Outcome) -> int:
    """Adds a response's ``usage`` to ``outcome``; returns its total, ``UNKNOWN`` where it has none."""
    usage = completion.get("usage") if isinstance(completion, dict) else None
    try:
        prompt, answer = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (TypeError, KeyError, ValueError):
        return UNKNOWN
    outcome.prompt_tokens += prompt
    outcome.completion_tokens += answer
    return prompt + answer


class Failure(Exception):
    """A try that another try would not fix (a 4xx other than 408/409/429)."""


def _seconds(value: str | None) -> float | None:
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None
