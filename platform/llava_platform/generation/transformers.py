"""The transformers engine: a checkpoint loaded in this process, answering batches with ``model.generate``.

Requests with the same sampling settings share one ``generate`` call (``complete``); a streamed request
generates on its own. ``generate_calls`` counts the calls, so callers see the batching work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llava_platform.generation.engine import EngineResources, log_dtype, resolve_dtype
from llava_platform.generation.request import Completion, GenerationRequest, Prepared, prepare_request
from llava_platform.inference import end_token_ids, merge_inputs
from llava_platform.sampling import GREEDY_BELOW


class TransformersEngine:
    """A loaded checkpoint that prepares requests and generates for several at once (``GenerationEngine``)."""

    def __init__(self, model, processor, device: str):
        self.model, self.processor, self.device = model, processor, device
        self.model.to(device).eval()
        self.tokenizer = processor.tokenizer
        self.context_length = model.config.text_config.max_position_embeddings
        self.generate_calls = 0
        self._lock = threading.Lock()  # one generate at a time per replica: batching is the concurrency

    @classmethod
    def open(cls, checkpoint: str | Path, *, model_name: str, device: str, dtype: str, vllm: Any,
             adapters: dict[str, str]) -> TransformersEngine:
        """Load ``checkpoint`` on ``device`` in ``dtype`` (``resolve_dtype``: ``auto`` is the checkpoint's own).

        Raises:
            ValueError: ``adapters`` given (unmerged LoRA adapters are the vllm engine's).
        """
        from llava_platform.model.compose import load_pretrained_llava

        if adapters:
            raise ValueError("lora_adapters: unmerged LoRA adapters are served by the vllm engine only "
                             "(set engine: vllm, or serve the merged export)")
        resolved = resolve_dtype(dtype, checkpoint)
        model, processor = load_pretrained_llava(str(checkpoint), dtype=getattr(torch, resolved))
        log_dtype("transformers", model_name, dtype, resolved)
        return cls(model, processor, device)

    @staticmethod
    def resources(cpus: float, gpus: float) -> EngineResources:
        """The model lives in the caller's process: all of a replica's resources are the caller's."""
        return EngineResources(caller_cpus=cpus, caller_gpus=gpus, engine_cpus=0.0, engine_gpus=0.0)

    def prepare(self, request: GenerationRequest) -> Prepared:
        return prepare_request(self.processor, request, self.context_length)

    def batch_size(self, configured: int) -> int:
        return configured

    async def complete(self, items: Sequence[Prepared]) -> list[Completion | Exception]:
        return await asyncio.to_thread(self.generate, items)

    async def stats(self) -> dict[str, int]:
        return {"generate_calls": self.generate_calls}

    async def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")

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

    def _generate(self, inputs: dict[str, torch.Tensor], request: GenerationRequest, **options) -> torch.Tensor:
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
        text, finish = cut_at_stop(self.tokenizer.decode(kept, skip_special_tokens=True), item.request.stop, finish)
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

        Setting ``cancel`` (client gone, stop string seen) ends the generation at the next token, so the
        replica's lock is not held for tokens nobody reads. When it ends, ``item.generated`` holds the token
        count and finish reason.
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


def cut_at_stop(text: str, stops: Sequence[str], finish: str) -> tuple[str, str]:
    """The text up to the first stop string it holds (the finish reason then ``stop``)."""
    for stop in stops:
        if stop and stop in text:
            text, finish = text[: text.index(stop)], "stop"
    return text, finish


def _sampling_key(request: GenerationRequest) -> tuple:
    """Requests with equal keys can share a ``generate`` call (greedy ignores the seed)."""
    if request.temperature < GREEDY_BELOW:
        return ("greedy",)
    return ("sample", request.temperature, request.top_p, request.seed)


def _sampling_kwargs(request: GenerationRequest) -> dict:
    if request.temperature < GREEDY_BELOW:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
