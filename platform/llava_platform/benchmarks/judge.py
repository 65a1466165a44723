"""A judge model behind any OpenAI-compatible endpoint (OpenAI, vLLM, our own Serve endpoint).

    judge = EndpointJudge("http://127.0.0.1:8000/v1", model="gpt-4o-2024-08-06", api_key=os.environ["OPENAI_API_KEY"])
    verdicts = judge.complete_all(prompts, max_tokens=256)   # None where the endpoint kept failing

Retries are the official ``openai`` client's: 429, 408, 409, 5xx, timeouts and dropped connections are
retried with exponential backoff and jitter (0.5 s doubling to 8 s), ``max_retries`` times; a 200 whose
body is not a chat completion is retried the same way here (the client does not). A prompt
that still fails is ``None``: the benchmark counts it as ``judge/failed`` and leaves it out of the score
(it never silently becomes a zero).
"""

from __future__ import annotations

import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import openai


@dataclass
class EndpointJudge:
    """Greedy (temperature 0) chat completions, ``concurrency`` at a time.

    Args:
        url: the API's base URL, as the ``openai`` client takes it (``https://api.openai.com/v1``).
        model: the judge model's name on that endpoint.
        api_key: its key (``jobs.score`` reads ``--judge-key-env``, default ``OPENAI_API_KEY``).
        max_retries: retries per prompt after the first try.
        timeout: seconds per try.
        concurrency: prompts in flight at once.
    """

    url: str
    model: str
    api_key: str = "none"
    max_retries: int = 5
    timeout: float = 120.0
    concurrency: int = 8
    failures: list[str] = field(default_factory=list)
    """The last error of each prompt that could not be judged."""

    def __post_init__(self):
        self.client = openai.OpenAI(base_url=self.url, api_key=self.api_key or "none", max_retries=self.max_retries,
                                    timeout=self.timeout)

    def complete(self, prompt: str, max_tokens: int) -> str | None:
        """The judge's reply, or ``None`` once the client's retries (HTTP errors) or ours (a 200 whose body
        is not a chat completion, which the client does not retry) are spent."""
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}], temperature=0.0,
                    max_tokens=max_tokens)
                return response.choices[0].message.content or ""
            except openai.OpenAIError as error:  # already retried by the client
                self.failures.append(f"{type(error).__name__}: {error}"[:300])
                return None
            except (ValueError, LookupError, AttributeError, TypeError) as error:  # a malformed 200
                if attempt == self.max_retries:
                    self.failures.append(f"malformed reply: {type(error).__name__}: {error}"[:300])
                    return None
                time.sleep(min(8.0, 0.5 * 2**attempt) * random.uniform(0.75, 1.0))
        return None

    def complete_all(self, prompts: list[str], max_tokens: int) -> list[str | None]:
        print(f"[judge] {len(prompts)} prompts to {self.model} at {self.url}", file=sys.stderr, flush=True)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            verdicts = list(pool.map(lambda prompt: self.complete(prompt, max_tokens), prompts))
        failed = sum(verdict is None for verdict in verdicts)
        if failed:
            print(f"[judge] {failed} of {len(prompts)} could not be judged; last error: {self.failures[-1]}",
                  file=sys.stderr, flush=True)
        return verdicts
