"""vLLM's async engine (continuous batching, paged KV cache, prefix caching) over an exported checkpoint.

``VllmEngine`` is a plain class that a Ray actor hosts (``serve/`` and ``pipelines/`` start it). The actor
runs in the engine's own environment (``.venv-vllm/`` from ``make vllm``; pyproject.toml's
``[dependency-groups]`` say why it is separate), which has vLLM, Ray and PIL but not this project's
dependencies: so this module imports only the standard library (and ``llava_platform.sampling``, which
needs nothing more) at the top and vLLM inside the methods,
and what crosses to it is plain data (``EngineRequest``: token ids, PIL images, sampling settings).

The prompt is built on the caller's side by the checkpoint's own chat template, exactly as for the
transformers engine, and tokenised without expanding the image placeholders (one ``<image>`` token per
image): vLLM expands them with the checkpoint's processor. The engine loads the exported folder as it
is (llava-hf layout, ``model/layout.py``): no conversion at serve time.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llava_platform.sampling import GREEDY_BELOW

CPU_KV_CACHE_BYTES = 1 << 30
"""The KV cache on a CPU machine when the settings give none (vLLM's own default, a share of the
machine's memory as on a GPU, is refused on a 24 GiB machine)."""

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes vLLM 0.32's CPU attention backend runs (``CPUAttentionBackend.get_supported_head_sizes``)."""


@dataclass(frozen=True)
class VllmSettings:
    """How the engine runs (``config.schema.VllmConfig.build()``: each setting's meaning and default are there)."""

    max_model_len: int | None
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int | None
    """``None``: ``gpu_memory_utilization`` on GPUs, ``CPU_KV_CACHE_BYTES`` on CPUs."""
    max_num_seqs: int
    max_lora_rank: int | None
    """LoRA adapters served unmerged up to this rank (``None``: no LoRA)."""
    enable_prefix_caching: bool
    enforce_eager: bool
    in_process: bool
    """The engine core in the actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    python: str | None
    """The engine environment's interpreter; ``None``: ``default_engine_python()``."""
    num_cpus: float
    num_gpus: float
    env: dict[str, str]
    dtype: str
    """The deployment's ``dtype``, resolved before vLLM sees it (``generation.engine.resolve_dtype``)."""


SEVERAL_IMAGES_ON_VLLM = (
    "vLLM's LLaVA-OneVision tiles every image of a prompt as a lone anyres image, while OneVision (and "
    "transformers, and our training) gives each image of a several-image message one base-size tile; send "
    "several images to the transformers engine")
"""Why the vllm engine refuses a OneVision request with several images (vLLM 0.32 has no ``batch_num_images``)."""

VLLM_ONEVISION_ASPECT_RATIO = "anyres_max_9"
"""The only ``vision_aspect_ratio`` vLLM 0.32 runs LLaVA-OneVision with: its token count
(``_get_num_unpadded_features``) and its feature merge (``_merge_image_patch_embeddings``) both hard-code
``anyres_max_9`` and never read the checkpoint's setting. A checkpoint with another N would get other image
features than it was trained on (more tokens, none pooled) whenever an image's grid exceeds N tiles' worth:
the engine refuses it at start (every published OneVision checkpoint is ``anyres_max_9``)."""


def onevision_refusal(config: dict[str, Any]) -> str | None:
    """Why vLLM cannot run this checkpoint as it was trained (``None``: it can): a OneVision checkpoint whose
    ``vision_aspect_ratio`` is not ``VLLM_ONEVISION_ASPECT_RATIO``."""
    if config.get("model_type") != "llava_onevision":
        return None
    ratio = config.get("vision_aspect_ratio", VLLM_ONEVISION_ASPECT_RATIO)
    if ratio == VLLM_ONEVISION_ASPECT_RATIO:
        return None
    return (f"its vision_aspect_ratio is {ratio}, and vLLM 0.32 runs LLaVA-OneVision as "
            f"{VLLM_ONEVISION_ASPECT_RATIO} whatever the checkpoint says (other image features than in training "
            "for large images); serve it with engine: transformers")


@dataclass(frozen=True)
class EngineRequest:
    """One generation: the prompt's token ids (image placeholders not expanded) and its images, in order."""

    request_id: str
    prompt_token_ids: list[int]
    images: list[Any]
    """PIL images, one per ``<image>`` token of the prompt."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    lora: tuple[str, str] | None = None
    """``(name, folder)`` of a peft LoRA adapter to apply (the engine must have been started with LoRA)."""
    videos: list[Any] = field(default_factory=list)
    """Each ``<video>`` token's frames as uint8 (frames, T, T, 3), already at the tile size (OneVision;
    ``inference.engine_video``): vLLM's processor resizes nothing, so its pixels are the transformers engine's."""


@dataclass(frozen=True)
class EngineDelta:
    """What one step of a generation added: new text, tokens so far and, at the end, the finish reason."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    """``stop`` (end of turn or a stop string), ``length`` or ``abort``; ``None`` until the last delta."""
    token_ids: tuple[int, ...] = ()
    """The tokens this delta added (``answer``: all of them)."""
    prompt_tokens: int = 0
    """The prompt's length as the engine ran it (image placeholders expanded by vLLM's own processor)."""


class EngineStartError(RuntimeError):
    """The engine could not start on this checkpoint: the message names the model and the reason."""


ENGINE_PYTHON_ENV = "LLAVA_VLLM_PYTHON"
"""Names the engine environment's interpreter (the image sets it to /opt/vllm-venv/bin/python)."""


def default_engine_python() -> str | None:
    """The engine environment's interpreter: ``$LLAVA_VLLM_PYTHON``, else the checkout's ``.venv-vllm/bin/python``
    when ``make vllm`` built it, else ``None`` (vLLM is importable beside the caller)."""
    explicit = os.environ.get(ENGINE_PYTHON_ENV)
    if explicit:
        return explicit
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    local = os.path.join(repo_root, ".venv-vllm", "bin", "python")
    return local if os.path.exists(local) else None


def text_head_size(config: dict[str, Any]) -> int:
    """The language model's attention head size from a LLaVA ``config.json`` (``head_dim``, else hidden/heads)."""
    text = config.get("text_config", config)
    return int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])


class VllmEngine:
    """One vLLM ``AsyncLLM`` over a checkpoint folder. Call ``start`` once, then ``generate`` concurrently."""

    def __init__(self, model_dir: str, model_name: str, settings: VllmSettings):
        self.model_dir, self.model_name, self.settings = model_dir, model_name, settings
        self.engine = None
        self.finished = self.aborted = 0

    async def start(self) -> dict[str, Any]:
        """Load the checkpoint and run one token through it, so a broken model fails here, not on a request.

        Returns:
            ``{"max_model_len": ..., "head_size": ...}``.

        Raises:
            EngineStartError: the folder is no checkpoint, vLLM does not support its architecture, its
                head size does not run on this platform, or the first generation fails.
        """
        import json

        if self.settings.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        config_path = os.path.join(self.model_dir, "config.json")
        if not os.path.exists(config_path):
            raise EngineStartError(f"model {self.model_name}: {self.model_dir} has no config.json (not a checkpoint)")
        with open(config_path) as file:
            config = json.load(file)
        from vllm.platforms import current_platform

        refusal = onevision_refusal(config)
        if refusal:
            raise EngineStartError(f"model {self.model_name}: {refusal}")
        head_size = text_head_size(config)
        if current_platform.is_cpu() and head_size not in CPU_HEAD_SIZES:
            raise EngineStartError(f"model {self.model_name}: its attention head size is {head_size}; vLLM's CPU "
                                   f"attention runs {', '.join(map(str, CPU_HEAD_SIZES))}")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        kv_cache = s.kv_cache_memory_bytes or (CPU_KV_CACHE_BYTES if current_platform.is_cpu() else None)
        args = AsyncEngineArgs(model=self.model_dir, served_model_name=self.model_name, dtype=s.dtype,
                               max_model_len=s.max_model_len, gpu_memory_utilization=s.gpu_memory_utilization,
                               kv_cache_memory_bytes=kv_cache, max_num_seqs=s.max_num_seqs,
                               enable_prefix_caching=s.enable_prefix_caching, enforce_eager=s.enforce_eager,
                               enable_lora=s.max_lora_rank is not None, max_lora_rank=s.max_lora_rank or 16,
                               disable_log_stats=True)
        try:
            self.engine = AsyncLLM.from_engine_args(args)
            async for _ in self.generate(EngineRequest("warm-up", [config.get("text_config", config).get(
                    "bos_token_id") or 1], [], max_tokens=1, temperature=0.0)):
                pass
        except Exception as error:  # noqa: BLE001 - re-raised with the model's name and the cause
            raise EngineStartError(f"model {self.model_name}: vLLM cannot run {self.model_dir}: "
                                   f"{type(error).__name__}: {error}") from error
        self.finished = 0
        return {"max_model_len": self.engine.model_config.max_model_len, "head_size": head_size}

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        """Stream one generation; cancelling the consumer aborts the request in the engine."""
        import zlib

        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        greedy = request.temperature < GREEDY_BELOW
        sampling = SamplingParams(max_tokens=request.max_tokens, temperature=0.0 if greedy else request.temperature,
                                  top_p=1.0 if greedy else request.top_p, seed=request.seed, stop=list(request.stop),
                                  skip_special_tokens=True, output_kind=RequestOutputKind.DELTA)
        prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_token_ids)}
        if request.images:
            prompt["multi_modal_data"] = {"image": request.images if len(request.images) > 1 else request.images[0]}
        if request.videos:  # vLLM takes a video as its frames, (frames, height, width, 3) uint8
            videos = list(request.videos)
            prompt.setdefault("multi_modal_data", {})["video"] = videos if len(videos) > 1 else videos[0]
        tokens, finish, prompt_tokens = 0, None, 0
        try:
            lora = LoRARequest(request.lora[0], zlib.crc32(request.lora[0].encode()) + 1, request.lora[1]) \
                if request.lora else None
            async for output in self.engine.generate(prompt, sampling, request.request_id, lora_request=lora):
                piece = output.outputs[0]
                ids = tuple(piece.token_ids)
                if output.finished and piece.finish_reason == "stop" and not isinstance(piece.stop_reason, str):
                    ids = ids[:-1]  # the end-of-turn token: not part of the answer (transformers counts it neither)
                tokens += len(ids)
                prompt_tokens = prompt_tokens or len(output.prompt_token_ids or ())
                finish = piece.finish_reason if output.finished else None
                yield EngineDelta(piece.text, tokens, finish, ids, prompt_tokens)
        finally:
            if finish is None:  # cancelled (client gone) or failed: vLLM has aborted it
                self.aborted += 1
            else:
                self.finished += 1

    async def answer(self, requests: list[EngineRequest]) -> list[EngineDelta]:
        """Whole answers to many requests at once (batch inference): all in the engine together, continuously
        batched; each result holds the full text, every token id, the token count and the finish reason."""
        import asyncio

        async def one(request: EngineRequest) -> EngineDelta:
            text, ids, last = "", [], None
            async for last in self.generate(request):
                text += last.text
                ids += last.token_ids
            return EngineDelta(text, last.completion_tokens, last.finish_reason, tuple(ids), last.prompt_tokens)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    def stats(self) -> dict[str, int]:
        """Requests finished and aborted (a cancelled stream counts as aborted)."""
        return {"finished": self.finished, "aborted": self.aborted}

    def ping(self) -> bool:
        """Health: the engine is loaded and its core still running."""
        return self.engine is not None and not self.engine.errored
