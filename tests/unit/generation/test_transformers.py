"""The transformers engine without Ray Serve: one generate call per batch, the same answers as one at a time."""

import asyncio

import pytest
import torch

from llava_platform.config.schema import ServeLimits
from llava_platform.generation.engine import answer_questions, open_engine
from llava_platform.generation.request import RequestError
from llava_platform.generation.transformers import TransformersEngine, serving_dtype
from serve.openai_api import parse_chat_request
from tests.helpers.requests import chat, data_url, image_part, text_part

LIMITS = ServeLimits(max_tokens=16, max_images=2, max_image_bytes=50_000, max_image_pixels=200 * 200)


def test_serving_dtype():
    assert serving_dtype("auto", "cpu") == torch.float32
    assert serving_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype is 'fp8'"):
        serving_dtype("fp8", "cuda")


@pytest.fixture(scope="module")
def generators(saved_checkpoints):
    return {arch: open_engine("transformers", path, model_name=arch, device="cpu", dtype="auto")
            for arch, path in saved_checkpoints.items()}


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
    with pytest.raises(RequestError, match="over the model's context") as error:
        generator.prepare(long)
    assert error.value.code == "context_length_exceeded"


def test_complete_is_generate_off_the_event_loop_and_answer_questions_strips(generators):
    engine = generators["llava"]
    assert isinstance(engine, TransformersEngine) and engine.batch_size(8) == 8
    request = parse_chat_request(chat(text_part("Hello?"), max_tokens=4, temperature=0), LIMITS)
    prepared = engine.prepare(request)
    [completion] = asyncio.run(engine.complete([prepared]))
    assert completion == engine.generate([engine.prepare(request)])[0]
    assert answer_questions(engine, [(None, "Hello?")], max_new_tokens=4) == [completion.text.strip()]
    assert asyncio.run(engine.stats())["generate_calls"] >= 2


def test_unmerged_adapters_are_refused_by_name(saved_checkpoints):
    with pytest.raises(ValueError, match="lora_adapters: unmerged LoRA adapters are served by the vllm engine"):
        open_engine("transformers", saved_checkpoints["llava"], model_name="m", device="cpu", dtype="auto",
                    adapters={"a": "/x"})
    with pytest.raises(ValueError, match="engine 'tgi': use one of transformers, vllm"):
        open_engine("tgi", saved_checkpoints["llava"], model_name="m", device="cpu", dtype="auto")
