"""Packed rows compute exactly what their samples compute one by one (float64, no dropout): per-token log-probs
and gradients, for LLaVA, LLaVA-NeXT (several aspect ratios) and OneVision (an image, two images, a video,
text only). A negative control packs the same samples with an all-ones attention mask (what a naive packer
sends: it turns transformers' packed-sequence masking off) and must differ."""

from __future__ import annotations

import pytest
import torch

from llava_platform.data.collate import collate, collate_onevision, pack_tokens
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.records import RowBuilder
from tests.helpers.media import encode_video, grey_ramp, png, random_picture
from tests.helpers.models import compose, compose_onevision
from tests.helpers.specs import row_spec

TOLERANCE = 1e-10

QUESTIONS = {  # kind: (question, image sizes, video)
    "wide": ("<image>\nWhat colour is the shape?", [(40, 90)], False),
    "tall": ("<image>\nWhere is the shape?", [(100, 30)], False),
    "square": ("<image>\nDescribe it.", [(50, 50)], False),
    "text": ("What is 7 plus 7?", [], False),
    "two": ("<image>\n<image>\nWhich one is red?", [(30, 30), (50, 20)], False),
    "video": ("<image>\nWhen does it turn blue?", [], True),
}
ARCH_SAMPLES = {"llava": ["wide", "text", "square", "tall"], "llava_next": ["wide", "tall", "text", "square"],
                "llava_onevision": ["wide", "two", "text", "video", "tall"]}


@pytest.fixture(scope="module", params=sorted(ARCH_SAMPLES))
def model_and_rows(request, towers):
    arch = request.param
    model, processor = compose_onevision(towers) if arch == "llava_onevision" else compose(towers, arch)
    model = model.double().eval()
    mode = "pad" if arch == "llava" else "anyres"
    template = "qwen_1_5" if arch == "llava_onevision" else "vicuna_v1"
    builder = RowBuilder.from_processor(processor, row_spec(template=template, image_mode=mode, max_length=4096,
                                                           video_frames=4))
    rows = []
    for seed, kind in enumerate(ARCH_SAMPLES[arch]):
        question, sizes, video = QUESTIONS[kind]
        record = {"id": kind, "conversations": [{"from": "human", "value": question},
                                                {"from": "gpt", "value": f"Answer {seed}, red."}]}
        images = [png(random_picture(h, w, seed + i)) for i, (h, w) in enumerate(sizes)]
        rows.append(builder.build(record, images, encode_video(grey_ramp(8)) if video else None))
    return arch, model, processor, rows


def visual_batch(arch: str, processor, rows: list[dict]) -> dict[str, torch.Tensor]:
    """The samples collated as training collates them (the visual tensors are what packing keeps)."""
    settings = ImageSettings.from_processor(processor)
    pad = processor.tokenizer.pad_token_id
    columns = ([row["input_ids"] for row in rows], [row["labels"] for row in rows])
    if arch == "llava_onevision":
        batch = collate_onevision(*columns, [r["tiles"] for r in rows], [r["image_sizes"] for r in rows],
                                  [r["frames"] for r in rows], pad_token_id=pad, image_mean=settings.image_mean,
                                  image_std=settings.image_std)
    else:
        batch = collate(*columns, [r["tiles"] for r in rows], [r["image_size"] for r in rows], pad_token_id=pad,
                        anyres=arch == "llava_next", image_mean=settings.image_mean, image_std=settings.image_std)
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probability of each next token, (batch, length - 1)."""
    logits = model(**batch, use_cache=False).logits
    ids = batch["input_ids"]
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def supervised_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the supervised tokens' cross-entropies (labels shifted as transformers shifts them)."""
    logits = model(**batch, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")


def one_by_one(model, arch, processor, rows):
    """Per sample: next-token log-probs; and the gradient of the summed supervised loss."""
    model.zero_grad()
    probs = []
    for row in rows:
        batch = visual_batch(arch, processor, [row])
        with torch.no_grad():
            probs.append(log_probs(model, batch)[0])
        supervised_loss(model, batch).backward()
    return probs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def packed(model, arch, processor, rows, *, all_ones_mask: bool = False):
    """The samples in one packed row (``pack_tokens``): the same per-sample log-probs and gradient."""
    model.zero_grad()
    batch = visual_batch(arch, processor, rows)
    batch.update(pack_tokens([r["input_ids"] for r in rows], [r["labels"] for r in rows], [len(rows)],
                             pad_token_id=processor.tokenizer.pad_token_id))
    batch.pop("attention_mask")
    if all_ones_mask:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        row = log_probs(model, batch)[0]
    probs, start = [], 0
    for r in rows:
        n = len(r["input_ids"])
        probs.append(row[start:start + n - 1])  # the boundary prediction (into the next sample) is not compared
        start += n
    supervised_loss(model, batch).backward()
    return probs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_packed_row_computes_what_its_samples_compute_one_by_one(model_and_rows):
    arch, model, processor, rows = model_and_rows
    alone, alone_grads = one_by_one(model, arch, processor, rows)
    together, together_grads = packed(model, arch, processor, rows)
    for kind, a, b in zip(ARCH_SAMPLES[arch], alone, together, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() < TOLERANCE, (arch, kind, (a - b).abs().max())
    assert alone_grads.keys() == together_grads.keys() and len(alone_grads) > 10
    for name, grad in alone_grads.items():
        assert (grad - together_grads[name]).abs().max() < TOLERANCE * max(1.0, grad.abs().max()), (arch, name)
    assert any("vision_tower" in n and g.abs().max() > 0 for n, g in alone_grads.items())  # images did flow


def test_an_all_ones_mask_lets_packed_samples_see_each_other(model_and_rows):
    """The negative control: the same packed row with an all-ones attention mask must not match."""
    arch, model, processor, rows = model_and_rows
    alone, _ = one_by_one(model, arch, processor, rows)
    leaked, _ = packed(model, arch, processor, rows, all_ones_mask=True)
    later = [(a - b).abs().max() for a, b in zip(alone[1:], leaked[1:], strict=True)]
    assert max(later) > 1e-6, f"{arch}: the mask made no difference ({later})"


def test_packing_is_exact_through_lora_adapters(towers):
    """LoRA wraps the language model in peft; the packed row's position ids must still reach attention (the
    adapters' B matrices are made non-zero so their gradients, and the A matrices', are not trivially 0)."""
    from llava_platform.model.trainability import apply_lora

    model, processor = compose(towers, "llava")
    model = apply_lora(model.double().eval(), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.1)
    builder = RowBuilder.from_processor(processor, row_spec(template="vicuna_v1", image_mode="pad", max_length=4096))
    rows = []
    for seed, kind in enumerate(["wide", "text", "square"]):
        question, sizes, _ = QUESTIONS[kind]
        record = {"id": kind, "conversations": [{"from": "human", "value": question},
                                                {"from": "gpt", "value": f"Answer {seed}, red."}]}
        rows.append(builder.build(record, [png(random_picture(h, w, seed)) for h, w in sizes], None))
    alone, alone_grads = one_by_one(model, "llava", processor, rows)
    together, together_grads = packed(model, "llava", processor, rows)
    for a, b in zip(alone, together, strict=True):
        assert (a - b).abs().max() < TOLERANCE
    lora = {n: g for n, g in alone_grads.items() if "lora_" in n}
    assert lora and all(g.abs().max() > 0 for g in lora.values())
    for name, grad in alone_grads.items():
        assert (grad - together_grads[name]).abs().max() < TOLERANCE * max(1.0, grad.abs().max()), name
    leaked, _ = packed(model, "llava", processor, rows, all_ones_mask=True)
    assert max((a - b).abs().max() for a, b in zip(alone[1:], leaked[1:], strict=True)) > 1e-6
