"""The run's token cap holds against what the endpoint bills, not against what the client happened to see.

The scripted teacher (``llava_platform.testing.chat_server``) bills every try it computes, as a real API
does: a malformed 200 (whose usage is lost with its body) and an answer sent after the client gave up,
with variable, tokenizer-like usage. The cap is checked against the server's own total.
"""

from __future__ import annotations

import asyncio

import pytest

from llava_platform.datagen.annotations import Box, ImageContext
from llava_platform.datagen.client import MESSAGE_OVERHEAD, ChatClient, ClientSettings, PromptBound
from llava_platform.datagen.prompts import context_text, load_prompts
from llava_platform.testing.chat_server import TEMPLATE_TOKENS, ChatServer, count_tokens


class Ledger:
    """The run's budget, in memory (``pipelines.generate.TokenLedger`` is the Ray actor of the same rule)."""

    def __init__(self, cap: int):
        self.cap, self.reserved, self.used = cap, 0, 0

    async def reserve(self, tokens: int) -> bool:
        if self.used + self.reserved + tokens > self.cap:
            return False
        self.reserved += tokens
        return True

    async def settle(self, reserved: int, used: int) -> None:
        self.reserved -= reserved
        self.used += used


PROMPTS = load_prompts()


def messages(caption: str, n: int) -> list[dict[str, str]]:
    """``jobs.generate_data``'s own request for a detailed description (its few-shot system prompt)."""
    boxes = (Box("square", 0.1, 0.2, 0.4, 0.5), Box("circle", 0.5, 0.5, 0.9, 0.8))
    context = ImageContext(f"img{n}", f"img{n}.jpg", (caption, f"A red square, number {n}, beside a blue circle."),
                           boxes)
    return PROMPTS.messages("detail", context_text(context))


CAPTIONS = ["RETRY:malformed", "RETRY:timeout", "RETRY:429", "plain"] * 6


async def run_all(url: str, budget, max_tokens: int = 64) -> list:
    client = ChatClient(ClientSettings(url=url, model="teacher", concurrency=4, max_tokens=max_tokens,
                                       max_retries=2, timeout_s=0.5, backoff_s=0.01), budget=budget)
    try:
        return await asyncio.gather(*(client.complete(messages(c, n)) for n, c in enumerate(CAPTIONS)))
    finally:
        await client.close()


@pytest.fixture()
def teacher():
    with ChatServer(timeout_sleep=1.0) as server:
        yield server


def test_every_billed_try_is_charged_and_the_cap_holds_against_the_bill(teacher):
    uncapped = asyncio.run(run_all(teacher.url, Ledger(10**9)))
    billed_in_full = teacher.stats()["billed"]
    assert all(o.error is None for o in uncapped)
    assert sum(o.unreported_tries for o in uncapped) == 12  # each malformed and each timed-out first try
    assert sum(o.charged for o in uncapped) >= billed_in_full  # never less than the bill

    cap = billed_in_full // 2  # half of what the whole job needs: the cap must stop it
    teacher.reset()
    ledger = Ledger(cap)
    capped = asyncio.run(run_all(teacher.url, ledger))
    billed = teacher.stats()["billed"]
    assert any(o.skipped for o in capped) and any(o.content for o in capped)
    assert billed <= ledger.used <= cap, (billed, ledger.used, cap)


def test_last_try_accounting_undercounts_the_bill(teacher):
    """Negative control: counting only the usage each request's last (successful) try reported, as the
    client did before, is less than the server billed, so a cap checked that way can be passed."""
    outcomes = asyncio.run(run_all(teacher.url, Ledger(10**9)))
    billed = teacher.stats()["billed"]
    last_try_only = sum(count_tokens(m["content"]) + TEMPLATE_TOKENS for n, c in enumerate(CAPTIONS)
                        for m in messages(c, n)) + sum(count_tokens(o.content) for o in outcomes)
    assert last_try_only < billed
    assert sum(o.prompt_tokens + o.completion_tokens for o in outcomes) < billed  # the reported part alone


def test_the_prompt_bound_holds_and_a_known_tokenizer_counts_exactly(tmp_path):
    from llava_platform.model.tiny import build_tiny_tokenizer

    texts = ["A red square.", "Ünïcödé ✓ and 1,000.5 symbols!!", "x" * 300, "word " * 80]
    bound = PromptBound()
    for text in texts:
        chat = [{"role": "user", "content": text}]
        assert bound(chat) == len(text.encode("utf-8")) + MESSAGE_OVERHEAD
        assert bound(chat) >= count_tokens(text) + TEMPLATE_TOKENS  # the scripted teacher's count
    tokenizer = build_tiny_tokenizer(300)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tokenizer.save_pretrained(tmp_path)
    exact = PromptBound(str(tmp_path))
    for text in texts:
        chat = [{"role": "system", "content": "Describe."}, {"role": "user", "content": text}]
        counted = len(tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"])
        assert exact(chat) == counted <= bound(chat)  # a byte-level BPE: never more tokens than bytes
