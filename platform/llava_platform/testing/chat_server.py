"""A scripted OpenAI-protocol teacher for the tests and ``jobs.perf.datagen``, in its own process.

    with ChatServer(service_time=0.05) as server:      # python -m llava_platform.testing.chat_server --port N ...
        server.url          # http://127.0.0.1:<port>/v1
        server.stats()      # {"requests": n, "answered": {"<first caption>|<type>|<context hash>": times answered}}

Answers depend on the request alone, so a test knows what each image gets. The image's first caption
(the first line of the last user message) picks the script:

- ``FAULT:<kind>`` answers 200 with a bad response: ``refuse``, ``leak`` (mentions "the caption"),
  ``empty``, ``truncated`` (``finish_reason: length``), ``unparseable``, ``turns`` (answer before question);
- ``RETRY:<status>`` fails the first try of each request with ``429``, ``500``, ``timeout`` (answers after
  ``--timeout-sleep`` seconds) or ``malformed`` (a 200 whose body is not JSON), then answers well;
- ``ALWAYS:500`` fails every try;
- anything else: a well-formed response of the type the system message asks for.

Every answer waits ``service_time`` seconds first (the benchmark's fixed service time). Usage is counted
as a tokenizer would, so it varies with the text: ``count_tokens`` (pieces of at most 4 word characters,
and each other non-space character) + ``TEMPLATE_TOKENS`` per message. Every try the server computes is
billed, as a real API bills it: answers sent after the client gave up (``timeout``) and a ``malformed``
200's (its usage is lost with its body); ``stats()["billed"]`` is the total, the truth a token cap is
checked against. A 429/500 is not billed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter

from aiohttp import web

from llava_platform.testing.local_servers import free_port

GOOD = {
    "conversation": "Question:\nWhat is in the picture?\n===\nAnswer:\nThere are {c}.\n===\nQuestion:\nWhy might "
                    "they be placed like that?\n===\nAnswer:\nMost likely to show their colours side by side.",
    "detail": "The picture shows {c}, drawn on a plain background.",
    "reasoning": "Question:\nWhat could these shapes be used for?\n===\nAnswer:\nShapes like {c} are typical of a "
                 "colour-learning exercise, so they most likely teach children colours and positions.",
}
BAD = {
    "refuse": "I'm sorry, but I cannot help with that.",
    "leak": "Question:\nWhat is shown?\n===\nAnswer:\nThe caption says there is a shape.",
    "empty": "",
    "unparseable": "There is a shape in the image and nothing more to say.",
    "turns": "Answer:\nA shape.\n===\nQuestion:\nWhat is it?",
}


TEMPLATE_TOKENS = 4
"""Tokens the scripted chat template adds per message."""
_PIECE = re.compile(r"\w{1,4}|[^\w\s]")


def count_tokens(text: str) -> int:
    """The scripted tokenizer: pieces of at most 4 word characters, and each other non-space character."""
    return len(_PIECE.findall(text))


def kind_of(system: str) -> str:
    if "conversation" in system:
        return "conversation"
    return "detail" if "Describe the image in detail" in system else "reasoning"


def make_app(service_time: float, timeout_sleep: float) -> web.Application:
    """The scripted server: one asyncio loop (a fixed service time costs no thread per request in flight)."""
    state = {"requests": 0, "first": None, "last": None, "tries": Counter(), "answered": Counter(), "billed": 0}

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": state["requests"], "answered": dict(state["answered"]),
                                  "first_request_at": state["first"], "last_answer_at": state["last"],
                                  "billed": state["billed"]})

    async def reset(request: web.Request) -> web.Response:
        state.update(requests=0, first=None, last=None, tries=Counter(), answered=Counter(), billed=0)
        return web.json_response({})

    async def complete(request: web.Request) -> web.Response:
        body = await request.json()
        messages = body["messages"]
        kind = kind_of(messages[0]["content"])
        caption = messages[-1]["content"].split("\n")[0]
        digest = hashlib.sha256(messages[-1]["content"].encode()).hexdigest()[:8]
        key = f"{caption}|{kind}|{digest}"  # images may share a first caption
        state["first"] = state["first"] or time.time()
        state["requests"] += 1
        state["tries"][key] += 1
        first_try = state["tries"][key] == 1
        prompt = sum(count_tokens(m["content"]) + TEMPLATE_TOKENS for m in messages)
        await asyncio.sleep(service_time)
        if caption == "ALWAYS:500" or (caption.startswith("RETRY:") and first_try):
            fault = caption.split(":", 1)[1]
            if fault == "timeout":
                await asyncio.sleep(timeout_sleep)
            elif fault == "malformed":  # computed and billed, its body (and usage) garbled on the way
                state["billed"] += prompt + count_tokens(GOOD[kind])
                return web.Response(status=200, body=b'{"choices": [', content_type="application/json")
            else:
                return web.json_response({"error": {"message": f"scripted {fault}"}}, status=int(fault),
                                         headers={"Retry-After": "0"})
        finish = "stop"
        if caption.startswith("FAULT:"):
            fault = caption.split(":", 1)[1]
            content, finish = ("Question:\nWhat is", "length") if fault == "truncated" else (BAD[fault], "stop")
            if kind == "detail" and fault == "leak":  # a description is prose
                content = content.split("Answer:\n")[1]
        else:
            content = GOOD[kind].format(c=caption.rstrip("."))
        state["answered"][key] += 1
        state["last"] = time.time()
        answer = count_tokens(content)
        state["billed"] += prompt + answer
        return web.json_response({
            "id": "chat-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}})

    app = web.Application(client_max_size=16 << 20)
    app.add_routes([web.get("/stats", stats), web.delete("/reset", reset), web.post("/v1/chat/completions", complete)])
    return app


class ChatServer:
    """The server in a subprocess (so that it shares no interpreter lock with the job it serves)."""

    def __init__(self, service_time: float = 0.0, timeout_sleep: float = 3.0):
        self.port = free_port()
        self.args = ["--port", str(self.port), "--service-time", str(service_time), "--timeout-sleep",
                     str(timeout_sleep)]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ChatServer:
        self.process = subprocess.Popen([sys.executable, "-m", "llava_platform.testing.chat_server", *self.args])
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stats()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def reset(self) -> None:
        """Forget the counts and times (a benchmark's next level)."""
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{self.port}/reset", method="DELETE"),
                               timeout=5).close()

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as response:
            return json.loads(response.read())

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service-time", type=float, default=0.0)
    parser.add_argument("--timeout-sleep", type=float, default=3.0)
    cli = parser.parse_args()
    web.run_app(make_app(cli.service_time, cli.timeout_sleep), host="127.0.0.1", port=cli.port, print=None,
                backlog=1024, access_log=None)
