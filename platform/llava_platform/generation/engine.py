"""The one interface every generation engine implements, and the one place that maps a name to an engine.

The Serve app (``serve/app.py``) and batch inference (``pipelines/evaluate.py``) hold a
``GenerationEngine`` and call only its methods: neither branches on which engine it is. ``open_engine``
(the ``engine`` setting: ``transformers`` or ``vllm``) builds one; ``ENGINES`` is the registry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llava_platform.generation.request import Completion, GenerationRequest, Prepared
from llava_platform.inference import Media, media_parts, question_conversation

DTYPES = ("float32", "bfloat16", "float16")
"""What an engine may run a checkpoint in (``dtype``; ``auto``: the checkpoint's own)."""


def resolve_dtype(name: str, checkpoint: str | Path) -> str:
    """The dtype an engine runs ``checkpoint`` in: ``name``, or for ``auto`` the checkpoint's own
    (``config.json``'s ``dtype``/``torch_dtype``, its text config's where the top level has none; float32
    where neither says or there is no ``config.json``). Both engines resolve it here, so they run a
    checkpoint alike out of the box.

    Raises:
        ValueError: a name other than ``auto`` or one of ``DTYPES``.
    """
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype is {name!r}; use one of auto, {', '.join(DTYPES)}")
        return name
    path = Path(checkpoint) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}  # none: loading will name what is missing
    found = [c.get("dtype") or c.get("torch_dtype") for c in (config, config.get("text_config") or {})]
    own = next((d for d in found if d), "float32")
    return own if own in DTYPES else "float32"


def log_dtype(engine: str, model_name: str, setting: str, dtype: str) -> None:
    """Each engine says what it runs in (the replica's log)."""
    how = "the checkpoint's own" if setting == "auto" else "set in the config"
    logging.getLogger("llava_platform.generation").warning("%s engine: %s in %s (%s)", engine, model_name, dtype, how)


class GenerationEngine(Protocol):
    """What answers requests for one checkpoint."""

    processor: Any
    """The checkpoint's processor (its tokenizer decodes token ids where a caller needs to)."""

    def prepare(self, request: GenerationRequest) -> Prepared:
        """Render and tile one request (``prepare_request``): the same on every engine.

        Raises:
            RequestError: a 400 the client caused (template, media, context length, a setting this engine lacks).
        """

    async def complete(self, items: Sequence[Prepared]) -> list[Completion | Exception]:
        """Whole answers to ``items``, in order; a request that failed gets its exception in its place."""

    def stream(self, item: Prepared) -> AsyncIterator[str]:
        """The answer's text pieces as they come; ``item.generated`` holds the completion at the end. Closing
        the iterator early (client gone, stop string seen) cancels the generation."""

    def batch_size(self, configured: int) -> int:
        """How many requests a caller should hand to one ``complete`` call, given the configured size (an engine
        that batches continuously on its own takes them one at a time, so none waits for another's answer)."""

    async def stats(self) -> dict[str, int]:
        """This engine's counters (``generate_calls``; ``finished``/``aborted`` requests)."""

    async def check_health(self) -> None:
        """Raises when the engine can no longer answer (the caller replaces it)."""


@dataclass(frozen=True)
class EngineResources:
    """Where a replica's CPUs and GPUs go: to the process that calls the engine, or to an engine of its own."""

    caller_cpus: float
    caller_gpus: float
    engine_cpus: float
    engine_gpus: float


class EngineKind(Protocol):
    """An engine class: how it opens on a checkpoint, and how it splits a replica's resources."""

    @classmethod
    def open(cls, checkpoint: str | Path, *, model_name: str, device: str, dtype: str, vllm: Any,
             adapters: dict[str, str]) -> GenerationEngine: ...

    @staticmethod
    def resources(cpus: float, gpus: float) -> EngineResources: ...


def engine_kinds() -> dict[str, EngineKind]:
    """The registry: the ``engine`` setting's names and their classes (imported here, on first use)."""
    from llava_platform.generation.transformers import TransformersEngine
    from llava_platform.generation.vllm import VllmClient

    return {"transformers": TransformersEngine, "vllm": VllmClient}


def open_engine(name: str, checkpoint: str | Path, *, model_name: str, device: str, dtype: str,
                vllm: Any = None, adapters: dict[str, str] | None = None) -> GenerationEngine:
    """The engine ``name`` on a resolved checkpoint folder.

    Args:
        vllm: the vLLM engine's settings (``VllmSettings``; ``config.schema.VllmConfig.build()``).
        adapters: LoRA adapter name -> peft folder, served unmerged (engines that support it).

    Raises:
        ValueError: an unknown engine, or a setting the engine does not take (named).
    """
    kinds = engine_kinds()
    if name not in kinds:
        raise ValueError(f"engine {name!r}: use one of {', '.join(kinds)}")
    return kinds[name].open(checkpoint, model_name=model_name, device=device, dtype=dtype, vllm=vllm,
                            adapters=adapters or {})


def answer_questions(engine: GenerationEngine, items: Sequence[tuple[Media, str]], *, max_new_tokens: int
                     ) -> list[str]:
    """Greedy answers to (media, question) pairs, in order, as batch inference and the registry report them: one
    user turn (the media first, then the question, as in training), the whole answer decoded and stripped.

    Raises:
        Exception: the first request that failed (batch inference has no client to answer a 4xx to).
    """
    import asyncio

    prepared = []
    for media, question in items:
        images, videos = media_parts(media)
        conversation = question_conversation(question, len(images), len(videos))
        prepared.append(engine.prepare(GenerationRequest(conversation=conversation, images=images, videos=videos,
                                                         max_tokens=max_new_tokens, temperature=0.0)))
    completions = asyncio.run(engine.complete(prepared))
    for completion in completions:
        if isinstance(completion, Exception):
            raise completion
    return [completion.text.strip() for completion in completions]
