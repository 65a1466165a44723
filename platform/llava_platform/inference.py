"""Model inputs from a LLaVA checkpoint, shared by the engines (``generation/``), training's checks and tests.

Prompts are built by the checkpoint's own chat template and images tiled by its own processor, so
inference sees exactly what training produced (the template and tiling are saved with the export).
Nothing here knows Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from llava_platform.data.collate import collate_onevision, pad_tile_stacks
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.templates import IMAGE_PLACEHOLDER, VIDEO_TOKEN
from llava_platform.data.video import SampledVideo


def encode_chat(processor, conversation: list[dict[str, Any]], images: Sequence[Image.Image],
                videos: Sequence[Sequence[Image.Image]] = ()) -> dict[str, torch.Tensor]:
    """One conversation as model inputs with batch dimension 1, ready for the assistant's turn.

    Args:
        conversation: chat-template messages; an image is a ``{"type": "image"}`` content part, a video
            a ``{"type": "video"}`` part; ``images`` holds the pictures in the order their parts appear.
        videos: each video's sampled frames (``data/video.py``; OneVision checkpoints only).

    Returns:
        ``input_ids``/``attention_mask`` (1, L), and for images ``pixel_values`` (plus ``image_sizes``
        for LLaVA-NeXT and OneVision, and OneVision's ``batch_num_images``; ``pixel_values_videos``).

    Raises:
        jinja2.TemplateError: the template refuses the conversation (e.g. roles out of order).
        ValueError: image parts and ``images`` do not pair up, or videos for a model without video.
    """
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    settings = ImageSettings.from_processor(processor)
    if settings.onevision:
        return encode_onevision_prompt(processor, settings, prompt, images, videos)
    if videos:
        raise ValueError("this model takes no video (a llava_onevision checkpoint does)")
    # the template writes the BOS token itself (as training's tokenisation sees it): none added on top
    return dict(processor(images=list(images) or None, text=prompt, add_special_tokens=False, return_tensors="pt"))


def encode_onevision_prompt(processor, settings: ImageSettings, prompt: str, images: Sequence[Image.Image],
                            videos: Sequence[Sequence[Image.Image]]) -> dict[str, torch.Tensor]:
    """A rendered OneVision prompt and its media as model inputs, tiled and counted exactly as the training
    rows are (``data/records.py``: the same ``ImageSettings`` functions, parity-tested against transformers'
    processor, which here cannot take videos: its video half is torchvision code).

    Raises:
        ValueError: placeholders and media do not pair up.
    """
    if len(videos) > 1 or (videos and images):
        raise ValueError("a OneVision request has one video, or images, as its training records do")
    if prompt.count(IMAGE_PLACEHOLDER) != len(images) or prompt.count(VIDEO_TOKEN) != len(videos):
        raise ValueError(f"the prompt has {prompt.count(IMAGE_PLACEHOLDER)} image and {prompt.count(VIDEO_TOKEN)} "
                         f"video placeholders for {len(images)} image(s) and {len(videos)} video(s)")
    sizes = [(image.height, image.width) for image in images]
    if len(images) == 1:
        tiles, per_image = settings.tile(images[0], "anyres"), settings.token_count(sizes[0], "anyres")
    else:
        tiles = (np.concatenate([settings.tile_stacked(image) for image in images]) if images
                 else np.zeros((0, 3, settings.tile_size, settings.tile_size), np.uint8))
        per_image = settings.stacked_token_count()
    frames = [settings.tile_frames(list(video)) for video in videos]
    text = prompt.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * per_image)
    if frames:
        text = text.replace(VIDEO_TOKEN, VIDEO_TOKEN * settings.video_token_count(len(frames[0])))
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    batch = collate_onevision([ids], [ids], [tiles], [sizes], [frames[0] if frames else None],
                              pad_token_id=processor.tokenizer.pad_token_id, image_mean=settings.image_mean,
                              image_std=settings.image_std)
    batch.pop("labels")
    return batch


def engine_video(processor, frames: Sequence[Image.Image]) -> np.ndarray:
    """A video's sampled frames as an engine that tiles for itself (vLLM) takes them: uint8 (frames, T, T, 3),
    resized exactly as ``encode_chat`` resizes them, so that the engine's own resize to T x T changes nothing."""
    return ImageSettings.from_processor(processor).tile_frames(list(frames)).transpose(0, 2, 3, 1).copy()


def prompt_token_ids(processor, conversation: list[dict[str, Any]]) -> list[int]:
    """The prompt of ``encode_chat`` as token ids with one ``<image>`` token per image (not expanded to the
    image's feature count): what engines that expand placeholders themselves (vLLM) take."""
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def question_conversation(question: str, with_image: bool | int, videos: int = 0) -> list[dict[str, Any]]:
    """A single user turn: the images (``with_image``: whether one, or how many) and videos first (as in
    training), then the question."""
    parts = [{"type": "image"}] * int(with_image) + [{"type": "video"}] * videos
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


Media = Image.Image | Sequence[Image.Image] | SampledVideo | None
"""What a question is asked about: nothing, an image, several images (OneVision) or a video's sampled frames."""


def media_parts(media: Media) -> tuple[list[Image.Image], list[list[Image.Image]]]:
    """``media`` as (images, videos' frames) for ``encode_chat``."""
    if media is None:
        return [], []
    if isinstance(media, SampledVideo):
        return [], [list(media.frames)]
    if isinstance(media, Image.Image):
        return [media], []
    return list(media), []


def merge_inputs(items: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack single-request processor outputs into one batch: token ids left-padded (generation appends
    on the right), images concatenated in request order, LLaVA-NeXT tile stacks zero-padded to the longest.

    Shapes: ``input_ids``/``attention_mask`` (B, L); ``pixel_values`` (images, 3, T, T) or
    (images, max_tiles, 3, T, T); ``image_sizes`` (images, 2).
    """
    length = max(item["input_ids"].shape[1] for item in items)
    ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        size = item["input_ids"].shape[1]
        ids[row, length - size:] = item["input_ids"][0]
        mask[row, length - size:] = item["attention_mask"][0]
    merged = {"input_ids": ids, "attention_mask": mask}
    pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
    if pixels:
        if pixels[0].ndim == 5:  # LLaVA-NeXT: (images, tiles, 3, T, T), tile counts differ per request
            merged["pixel_values"] = pad_tile_stacks([image for p in pixels for image in p])
        else:
            merged["pixel_values"] = torch.cat(pixels)
    for name in ("image_sizes", "batch_num_images", "pixel_values_videos"):  # OneVision's are per request
        parts = [item[name] for item in items if name in item]
        if parts:
            merged[name] = torch.cat(parts)
    return merged


def end_token_ids(generation_config) -> set[int]:
    """The token ids that end an answer: a checkpoint's ``generation_config.eos_token_id`` as a set.

    Args:
        generation_config: a ``transformers.GenerationConfig``; its ``eos_token_id`` may be one id, a
            list or tuple of ids, or ``None``.

    Returns:
        The ids; empty when ``eos_token_id`` is ``None``.
    """
    ids = generation_config.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, list | tuple) else {ids}
