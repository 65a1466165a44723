"""Batched generation without Ray Serve: one generate call per batch, the same answers as one at a time."""

import pytest
import torch

from llava_platform.inference import end_token_ids, merge_inputs
from serve.app import serving_dtype
from serve.generation import Generator
from serve.openai_api import ApiError, Limits, parse_chat_request
from tests.helpers.requests import chat, data_url, image_part, text_part

LIMITS = Limits(max_tokens=16, max_images=2, max_image_bytes=50_000, max_image_pixels=200 * 200)


def test_serving_dtype():
    assert serving_dtype("auto", "cpu") == torch.float32
    assert serving_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="args.dtype is 'fp8'"):
        serving_dtype("fp8", "cuda")


@pytest.fixture(scope="module")
def generators(saved_checkpoints):
    return {arch: Generator(path) for arch, path in saved_checkpoints.items()}


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_batched_generation_matches_one_at_a_time(generators, arch):
    generator = generators[arch]
    requests = [parse_chat_request(chat(text_part(f"Question {i}?"), *([image_part(data_url((30 + 10 * i, 40)))]
                                                                       if i % 2 == 0 else []),
                                        max_tokens=4 + i, temperature=0), LIMITS) for i in range(3)]
    prepared = [generator.prepare(r) for r in requests]
    alone = [generator.generate([p])[0] for p in prepared]
    calls = generator.generate_calls
    together = generator.generate(prepared)
    assert generator.generate_calls == calls + 1, "requests with the same sampling settings share one generate"
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in alone]
    assert all(c.completion_tokens <= r.max_tokens for c, r in zip(together, requests, strict=True))
    assert all(c.prompt_tokens == p.prompt_tokens > 0 for c, p in zip(together, prepared, strict=True))


def test_prompt_over_the_context_is_refused(generators):
    generator = generators["llava"]
    long = parse_chat_request(chat(text_part("word " * generator.context_length), max_tokens=4), LIMITS)
    with pytest.raises(ApiError, match="over the model's context") as error:
        generator.prepare(long)
    assert error.value.code == "context_length_exceeded"


def test_merge_inputs_left_pads_and_pads_tile_stacks():
    first = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.ones(1, 3, 3, 2, 2), "image_sizes": torch.tensor([[10, 20]])}
    second = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
              "pixel_values": torch.ones(1, 5, 3, 2, 2), "image_sizes": torch.tensor([[30, 40]])}
    merged = merge_inputs([first, second], pad_token_id=0)
    assert merged["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert merged["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert merged["pixel_values"].shape == (2, 5, 3, 2, 2) and merged["pixel_values"][0, 3:].abs().sum() == 0
    assert merged["image_sizes"].tolist() == [[10, 20], [30, 40]]


def test_merge_inputs_pads_several_images_per_request_like_concatenating_padded_requests():
    torch.manual_seed(0)
    pixels = [torch.rand(2, 3, 3, 2, 2), torch.rand(1, 5, 3, 2, 2), torch.rand(3, 1, 3, 2, 2)]
    items = [{"input_ids": torch.tensor([[1]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
              "pixel_values": p} for p in pixels]
    expected = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, 5 - p.shape[1])) for p in pixels])
    assert torch.equal(merge_inputs(items, pad_token_id=0)["pixel_values"], expected)


@pytest.mark.parametrize(("eos", "expected"), [(None, set()), (2, {2}), ([2, 7], {2, 7}), ((2, 7), {2, 7})])
def test_end_token_ids_accepts_one_id_a_list_or_none(eos, expected):
    from transformers import GenerationConfig

    assert end_token_ids(GenerationConfig(eos_token_id=eos)) == expected
