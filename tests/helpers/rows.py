"""Collated micro-batches built in memory, for tests that drive DeepSpeed ranks directly (no Ray Data)."""

from __future__ import annotations

import numpy as np
import torch


def micro_batch(processor, recipe, image: bool, seed: int, answer: str | None = None) -> dict[str, torch.Tensor]:
    """One row (a random image and a colour question, or a text-only sum) collated as stage 2 collates it;
    ``answer`` replaces the gold answer (``red``, or the sum)."""
    return packed_micro_batch(processor, recipe, [(image, seed, answer)], packed=False)


def packed_micro_batch(processor, recipe, samples: list[tuple[bool, int, str | None]], *,
                       packed: bool = True) -> dict[str, torch.Tensor]:
    """``micro_batch``'s rows, ``(image, seed, answer)`` each, packed into one row as a packed stage collates
    them (``collate.pack_tokens``), or one row each (``packed=False``)."""
    from PIL import Image

    from llava_platform.data.collate import collate, pack_tokens
    from llava_platform.data.conversation import tokenize_conversation
    from llava_platform.data.image_settings import ImageSettings
    from llava_platform.data.templates import resolve_chat_template

    data = recipe.stage2.data
    settings = ImageSettings.from_processor(processor)
    rows = []
    for image, seed, answer in samples:
        if image:
            picture = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 70, 3), dtype=np.uint8))
            turns = [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                     {"from": "gpt", "value": answer or "red"}]
            tiles, size, tokens = settings.tile(picture, data.image_mode), (40, 70), [
                settings.token_count((40, 70), data.image_mode)]
        else:
            turns = [{"from": "human", "value": f"What is {seed} plus {seed}?"},
                     {"from": "gpt", "value": answer or str(2 * seed)}]
            tiles, size, tokens = None, None, []
        sample = tokenize_conversation(turns, processor.tokenizer, resolve_chat_template(data.template,
                                                                                         processor.chat_template),
                                       tokens_per_image=tokens, image_token="<image>", max_length=256,
                                       truncation="drop")
        rows.append((sample, tiles, size))
    pad = processor.tokenizer.pad_token_id
    ids, labels = [r[0].input_ids for r in rows], [r[0].labels for r in rows]
    batch = collate(ids, labels, [r[1] for r in rows], [r[2] for r in rows], pad_token_id=pad,
                    anyres=data.image_mode == "anyres", image_mean=settings.image_mean, image_std=settings.image_std)
    if packed:
        del batch["attention_mask"]
        batch.update(pack_tokens(ids, labels, [len(rows)], pad_token_id=pad))
    return batch


def onevision_micro_batch(processor, recipe, kind: str, seed: int) -> dict[str, torch.Tensor]:
    """One OneVision row collated as stage 2 collates it: ``I`` a lone image, ``M`` two images, ``V`` a
    video, ``T`` text only."""
    from llava_platform.data.collate import collate_onevision
    from llava_platform.data.image_settings import ImageSettings
    from llava_platform.data.records import RowBuilder
    from tests.helpers.media import encode_video, grey_ramp, png, random_picture

    settings = ImageSettings.from_processor(processor)
    builder = RowBuilder.from_processor(processor, recipe.stage2.data.row_spec())
    question = {"I": "<image>\nWhat colour?", "M": "<image>\n<image>\nWhich?", "V": "<image>\nWhen?",
                "T": f"What is {seed} plus {seed}?"}[kind]
    record = {"id": str(seed), "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]}
    images = {"I": [png(random_picture(40, 70, seed))], "M": [png(random_picture(30, 30, seed)),
                                                              png(random_picture(50, 20, seed + 1))]}.get(kind, [])
    video = encode_video(grey_ramp(8)) if kind == "V" else None
    row = builder.build(record, images, video)
    return collate_onevision([row["input_ids"]], [row["labels"]], [row["tiles"]], [row["image_sizes"]],
                             [row["frames"]], pad_token_id=processor.tokenizer.pad_token_id,
                             image_mean=settings.image_mean, image_std=settings.image_std)


def preference_rows(processor, recipe, kinds: str, seed: int) -> dict[str, np.ndarray]:
    """Stage 3's preference rows built as its preprocessing builds them (``RowBuilder.build_pair``), as a
    micro-batch's columns: one pair per letter of ``kinds`` (``I`` on an image, ``T`` text only), the chosen answer
    ``red`` (or the sum), the rejected ``blue`` (or the sum plus one); no reference log-probabilities yet."""
    from llava_platform.data.records import RowBuilder
    from tests.helpers.media import png, random_picture

    builder = RowBuilder.from_processor(processor, recipe.stage3.data.row_spec())
    rows = []
    for i, kind in enumerate(kinds):
        image = kind == "I"
        question = "<image>\nWhat colour is the shape?" if image else f"What is {seed + i} plus {seed + i}?"
        answers = ("Red.", "Blue.") if image else (str(2 * (seed + i)), str(2 * (seed + i) + 1))
        chosen, rejected = ({"id": f"{seed}-{i}", "conversations": [{"from": "human", "value": question},
                                                                    {"from": "gpt", "value": answer}]}
                            for answer in answers)
        rows.append(builder.build_pair(chosen, rejected, [png(random_picture(40, 70, seed + i))] if image else []))
    columns = {}
    for name in rows[0]:
        column = np.empty(len(rows), dtype=object)
        column[:] = [row[name] for row in rows]
        columns[name] = column
    return columns
