"""The vLLM engine behind the endpoint and the batch-inference job: a Ray actor in vLLM's own environment.

    engine = start_vllm_engine("/path/to/export", "tiny", VllmSettings(...))   # blocks until it has started
    generator = VllmGenerator(checkpoint, "tiny", settings)                     # what a Serve replica holds

``start_vllm_engine`` runs ``llava_platform.vllm_engine.VllmEngine`` as an async actor with the engine
environment's interpreter (``py_executable``; ``make vllm`` builds it) and the core library on its
``PYTHONPATH`` (that environment has vLLM and Ray, not this project). The actor is owned by its caller:
it dies with the Serve replica or the Ray Data actor that started it.

``VllmGenerator`` is the replica's side: it prepares requests with the checkpoint's processor exactly
as the transformers ``Generator`` does (``prepare_request``: same validation, same errors), then sends
the prompt's token ids and images to the engine and reads its deltas as a Ray streaming generator.
Closing the stream (client gone) cancels the actor task, which aborts the request inside vLLM.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import ray

import llava_platform
from llava_platform.data.image_settings import ImageSettings
from llava_platform.inference import engine_video, prompt_token_ids
from llava_platform.model.compose import load_processor
from llava_platform.vllm_engine import (
    ENGINE_PYTHON_ENV,
    SEVERAL_IMAGES_ON_VLLM,
    EngineDelta,
    EngineRequest,
    VllmEngine,
    VllmSettings,
    default_engine_python,
)
from serve.generation import Completion, Prepared, prepare_request
from serve.openai_api import ApiError

START_TIMEOUT_S = 600
"""How long an engine may take to load its checkpoint (a 110B model from network storage takes minutes)."""


def start_vllm_engine(model_dir: str | Path, model_name: str, settings: VllmSettings) -> ray.actor.ActorHandle:
    """Start a ``VllmEngine`` actor on ``model_dir`` and wait until it has generated its first token.

    Raises:
        EngineStartError: (as the Ray task error's cause) the model and why vLLM cannot run it.
        RuntimeError: the engine environment is missing (``make vllm`` not run), with what to do.
    """
    python = settings.python or default_engine_python()
    # the core library by path: the same on every node of a cluster built from our image (/app/platform)
    core = str(Path(llava_platform.__file__).parent.parent)
    runtime_env: dict = {"env_vars": {"PYTHONPATH": core, **settings.env}}
    if python:
        if not Path(python).exists():
            raise RuntimeError(f"vllm.python (or ${ENGINE_PYTHON_ENV}): {python} does not exist; build the engine "
                               "environment with "
                               "`make vllm` (CPU) or see README 'The vLLM engine'")
        runtime_env["py_executable"] = python
    engine = ray.remote(VllmEngine).options(
        num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, runtime_env=runtime_env, max_concurrency=10_000,
    ).remote(str(model_dir), model_name, settings)
    try:
        ray.get(engine.start.remote(), timeout=START_TIMEOUT_S)
    except ray.exceptions.RayTaskError as error:
        ray.kill(engine)
        if error.cause is None:
            raise
        raise error.cause from error
    return engine


class VllmGenerator:
    """A Serve replica's handle on its vLLM engine: requests prepared here, generated there."""

    def __init__(self, checkpoint: str | Path, model_name: str, settings: VllmSettings,
                 adapters: dict[str, str] | None = None):
        """``adapters``: LoRA adapter name -> peft adapter folder, served unmerged on ``checkpoint`` (which
        must hold what the adapters' stage trained in full: a training run's ``adapter_base``)."""
        self.adapters = {name: str(Path(folder).resolve()) for name, folder in (adapters or {}).items()}
        if self.adapters:
            settings = replace(settings, max_lora_rank=settings.max_lora_rank or lora_rank(self.adapters.values()))
        self.engine = start_vllm_engine(checkpoint, model_name, settings)  # first: it names what is wrong
        self.processor = load_processor(str(checkpoint))
        self.onevision = ImageSettings.from_processor(self.processor).onevision
        config = json.loads((Path(checkpoint) / "config.json").read_text())
        self.context_length = int(settings.max_model_len or config["text_config"]["max_position_embeddings"])

    def prepare(self, request) -> Prepared:
        if self.onevision and len(request.images) > 1:
            raise ApiError(400, f"messages: {SEVERAL_IMAGES_ON_VLLM}", param="messages", code="unsupported_on_engine")
        return prepare_request(self.processor, request, self.context_length)

    def _engine_request(self, item: Prepared) -> EngineRequest:
        request = item.request
        videos = [engine_video(self.processor, frames) for frames in request.videos]
        return EngineRequest(request_id=uuid.uuid4().hex, images=list(request.images), videos=videos,
                             max_tokens=request.max_tokens,
                             prompt_token_ids=prompt_token_ids(self.processor, request.conversation),
                             temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                             stop=tuple(s for s in request.stop if s),
                             lora=(item.adapter, self.adapters[item.adapter]) if item.adapter else None)

    async def deltas(self, item: Prepared) -> AsyncIterator[EngineDelta]:
        """The engine's deltas for one request; the last one carries the finish reason."""
        stream = self.engine.generate.options(num_returns="streaming").remote(self._engine_request(item))
        try:
            async for ref in stream:
                yield await ref
        finally:
            ray.cancel(stream)  # a no-op once it has finished; otherwise vLLM aborts the request

    async def stream(self, item: Prepared) -> AsyncIterator[str]:
        """The answer's text pieces; ``item.generated`` holds the counts and finish reason at the end."""
        text, delta = "", None
        async for delta in self.deltas(item):
            text += delta.text
            if delta.text:
                yield delta.text
        # the prompt as vLLM ran it: its own processor expanded the image placeholders
        item.generated = Completion(text=text, finish_reason=_finish(delta),
                                    prompt_tokens=delta.prompt_tokens if delta else item.prompt_tokens,
                                    completion_tokens=delta.completion_tokens if delta else 0)

    async def complete(self, item: Prepared) -> Completion:
        async for _ in self.stream(item):
            pass
        return item.generated

    async def stats(self) -> dict[str, int]:
        return await self.engine.stats.remote()

    async def check_health(self) -> None:
        """Raises when the engine actor is gone or its core has failed (Serve then replaces the replica)."""
        if not await asyncio.wait_for(self.engine.ping.remote(), timeout=30):
            raise RuntimeError("the vLLM engine has failed")


LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM accepts."""


def lora_rank(folders) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that covers every adapter's ``r``.

    Raises:
        ValueError: a folder without ``adapter_config.json`` (not a peft adapter), or a rank above 512.
    """
    ranks = []
    for folder in folders:
        config = Path(folder) / "adapter_config.json"
        if not config.exists():
            raise ValueError(f"lora_adapters: {folder} has no adapter_config.json (not a peft LoRA adapter)")
        ranks.append(int(json.loads(config.read_text())["r"]))
    rank = max(ranks)
    if rank > LORA_RANKS[-1]:
        raise ValueError(f"lora_adapters: rank {rank} is above vLLM's largest, {LORA_RANKS[-1]}")
    return next(r for r in LORA_RANKS if r >= rank)


def _finish(delta: EngineDelta | None) -> str:
    if delta is None or delta.finish_reason in (None, "abort"):
        return "stop"
    return delta.finish_reason
