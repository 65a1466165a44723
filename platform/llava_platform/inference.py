"""Model inputs and greedy answers from a LLaVA checkpoint, shared by the server and the evaluation job.

Prompts are built by the checkpoint's own chat template and images tiled by its own processor, so
inference sees exactly what training produced (the template and tiling are saved with the export).
Nothing here knows Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from llava_platform.data.collate import pad_tile_stacks


def encode_chat(processor, conversation: list[dict[str, Any]],
                images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
    """One conversation as model inputs with batch dimension 1, ready for the assistant's turn.

    Args:
        conversation: chat-template messages; an image is a ``{"type": "image"}`` content part, and
            ``images`` holds the pictures in the order their parts appear.

    Returns:
        ``input_ids``/``attention_mask`` (1, L), and for images ``pixel_values`` (plus ``image_sizes``
        for LLaVA-NeXT).

    Raises:
        jinja2.TemplateError: the template refuses the conversation (e.g. roles out of order).
        ValueError: image parts and ``images`` do not pair up.
    """
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    # the template writes the BOS token itself (as training's tokenisation sees it): none added on top
    return dict(processor(images=list(images) or None, text=prompt, add_special_tokens=False, return_tensors="pt"))


def prompt_token_ids(processor, conversation: list[dict[str, Any]]) -> list[int]:
    """The prompt of ``encode_chat`` as token ids with one ``<image>`` token per image (not expanded to the
    image's feature count): what engines that expand placeholders themselves (vLLM) take."""
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def question_conversation(question: str, with_image: bool) -> list[dict[str, Any]]:
    """A single user turn: the image first (as in training), then the question."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


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
    sizes = [item["image_sizes"] for item in items if "image_sizes" in item]
    if sizes:
        merged["image_sizes"] = torch.cat(sizes)
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


def answer_questions(model, processor, items: Sequence[tuple[Image.Image | None, str]], *,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers to (image or ``None``, question) pairs, all in one ``generate`` call.

    Answers end at the template's end-of-turn token (the checkpoint's ``generation_config``); special
    tokens are dropped and whitespace stripped.
    """
    tokenizer = processor.tokenizer
    encoded = [encode_chat(processor, question_conversation(question, image is not None),
                           [image] if image is not None else []) for image, question in items]
    inputs = merge_inputs(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        output = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, inputs["input_ids"].shape[1]:].cpu()
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]
