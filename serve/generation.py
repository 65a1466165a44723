"""Batched generation with a LLaVA checkpoint: prompts and images in, answers and token counts out.

Nothing here knows Ray Serve: the deployment (``serve/app.py``) queues requests and hands them
over in batches. Prompts are built by the checkpoint's own chat template and images tiled by its
own processor, exactly as in training.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2 import TemplateError

from llava_platform.inference import encode_chat, end_token_ids, merge_inputs
from llava_platform.model.compose import load_pretrained_llava
from llava_platform.sampling import GREEDY_BELOW
from serve.openai_api import ApiError, ParsedChat


@dataclass
class Prepared:
    """One request's model inputs (batch dimension 1) and generation settings."""

    inputs: dict[str, torch.Tensor]
    prompt_tokens: int
    request: ParsedChat
    generated: Completion | None = None
    """Set by ``Generator.stream`` when the streamed generation ends: token count and finish reason."""
    adapter: str | None = None
    """The LoRA adapter the request names as its ``model`` (vLLM engine only), else ``None``."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    """``stop`` (end of turn or a stop string) or ``length`` (``max_tokens`` reached)."""
    prompt_tokens: int
    completion_tokens: int


def prepare_request(processor, request: ParsedChat, context_length: int) -> Prepared:
    """Render the prompt with the checkpoint's chat template and tile the images with its processor.

    Both engines prepare requests here, so they accept and refuse exactly the same ones.

    Raises:
        ApiError: 400 when the template refuses the conversation (e.g. roles out of order) or the
            prompt plus ``max_tokens`` does not fit the context.
    """
    try:
        inputs = encode_chat(processor, request.conversation, request.images, request.videos)
    except TemplateError as error:
        raise ApiError(400, f"messages: this model's chat template refuses the conversation: {error}",
                       param="messages") from error
    except ValueError as error:  # e.g. image tokens and images that do not pair up
        raise ApiError(400, f"messages: the processor refuses this input: {error}", param="messages") from error
    prompt_tokens = int(inputs["input_ids"].shape[1])
    if prompt_tokens + request.max_tokens > context_length:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens (images included) and max_tokens is "
                            f"{request.max_tokens}: over the model's context of {context_length}",
                       param="messages", code="context_length_exceeded")
    return Prepared(inputs=inputs, prompt_tokens=prompt_tokens, request=request)


class Generator:
    """A loaded checkpoint that prepares requests and generates for several at once.

    ``generate_calls`` counts calls to ``model.generate`` (a batch of N requests with the same
    sampling settings is one call), so tests and operators can see the batching work.
    """

    def __init__(self, checkpoint: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model, self.processor = load_pretrained_llava(str(checkpoint), dtype=dtype)
        self.model.to(device).eval()
        self.device = device
        self.tokenizer = self.processor.tokenizer
        self.context_length = self.model.config.text_config.max_position_embeddings
        self.generate_calls = 0
        self._lock = threading.Lock()  # one generate at a time per replica: batching is the concurrency

    def prepare(self, request: ParsedChat) -> Prepared:
        """``prepare_request`` with this checkpoint's processor and context."""
        return prepare_request(self.processor, request, self.context_length)

    def generate(self, batch: Sequence[Prepared]) -> list[Completion | Exception]:
        """Answer every prepared request; requests with the same sampling settings share one ``generate``.

        A group whose ``generate`` fails gets the exception in its places; the other groups are unaffected.
        """
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(batch):
            groups.setdefault(_sampling_key(item.request), []).append(index)
        results: list[Completion | Exception] = [RuntimeError("not generated")] * len(batch)
        for indices in groups.values():
            try:
                completions = self._generate_group([batch[i] for i in indices])
            except Exception as error:  # noqa: BLE001 - reported to exactly the requests it concerns
                completions = [error] * len(indices)
            for index, completion in zip(indices, completions, strict=True):
                results[index] = completion
        return results

    def _generate_group(self, group: Sequence[Prepared]) -> list[Completion]:
        request = group[0].request
        inputs = merge_inputs([item.inputs for item in group], self.tokenizer.pad_token_id)
        max_new = max(item.request.max_tokens for item in group)
        output = self._generate(inputs, request, max_new_tokens=max_new)
        new_tokens = output[:, inputs["input_ids"].shape[1]:].cpu()
        return [self._completion(item, tokens) for item, tokens in zip(group, new_tokens, strict=True)]

    def _generate(self, inputs: dict[str, torch.Tensor], request: ParsedChat, **options) -> torch.Tensor:
        """One ``model.generate`` under the replica's lock, seeded first when the request gives a seed.

        Args:
            inputs: model inputs on the CPU (``input_ids`` (B, L), ...); moved to the model's device here.
            request: its seed and sampling settings (temperature, top_p) apply to the whole call.
            **options: passed on to ``generate`` (``max_new_tokens``, ``streamer``, ``stopping_criteria``).

        Returns:
            The prompt and the generated tokens, (B, L + new), on the model's device.
        """
        with self._lock, torch.no_grad():
            if request.seed is not None:
                torch.manual_seed(request.seed)
            output = self.model.generate(**{k: v.to(self.device) for k, v in inputs.items()},
                                         pad_token_id=self.tokenizer.pad_token_id, **_sampling_kwargs(request),
                                         **options)
            self.generate_calls += 1
        return output

    def _completion(self, item: Prepared, tokens: torch.Tensor) -> Completion:
        ends = end_token_ids(self.model.generation_config) | {self.tokenizer.pad_token_id}
        kept = []
        for token in tokens.tolist()[: item.request.max_tokens]:
            if token in ends:
                break
            kept.append(token)
        finish = "stop" if len(kept) < min(len(tokens), item.request.max_tokens) else "length"
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        for stop in item.request.stop:
            if stop and stop in text:
                text, finish = text[: text.index(stop)], "stop"
        return Completion(text=text, finish_reason=finish, prompt_tokens=item.prompt_tokens,
                          completion_tokens=len(kept))

    async def stream(self, item: Prepared) -> AsyncIterator[str]:
        """``stream_pieces`` for the event loop: each piece is awaited off the loop; closing the iterator
        (client gone, stop string seen) cancels the generation and waits for its bookkeeping."""
        cancel = threading.Event()
        pieces = self.stream_pieces(item, cancel)
        try:
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                yield piece
        finally:
            cancel.set()
            await asyncio.to_thread(lambda: list(pieces))

    def stream_pieces(self, item: Prepared, cancel: threading.Event) -> Iterator[str]:
        """Yield the answer's text pieces as they are generated (one request, outside the batches).

        Setting ``cancel`` (client gone, stop string seen) ends the generation at the next token, so
        the replica's lock is not held for tokens nobody reads. When it ends,
        ``item.generated`` holds the token count and finish reason.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> bool:
                return cancel.is_set()

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        request, failure = item.request, []

        def run() -> None:
            try:
                output = self._generate(item.inputs, request, max_new_tokens=request.max_tokens, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([Cancelled()]))
                item.generated = self._completion(item, output[0, item.prompt_tokens:].cpu())
            except Exception as error:  # noqa: BLE001 - handed to the reader below
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if failure:
            raise failure[0]


def _sampling_key(request: ParsedChat) -> tuple:
    """Requests with equal keys can share a ``generate`` call (greedy ignores the seed)."""
    if request.temperature < GREEDY_BELOW:
        return ("greedy",)
    return ("sample", request.temperature, request.top_p, request.seed)


def _sampling_kwargs(request: ParsedChat) -> dict:
    if request.temperature < GREEDY_BELOW:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
