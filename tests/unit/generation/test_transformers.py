"""The transformers engine without Ray Serve: one generate call per batch, the same answers as one at a time."""

import asyncio
import json
import logging

import pytest
import torch

from llava_platform.config.schema import ServeLimits
from llava_platform.generation.engine import answer_questions, open_engine, resolve_dtype
from llava_platform.generation.request import RequestError
from llava_platform.generation.transformers import TransformersEngine
from serve.openai_api import parse_chat_request
from tests.helpers.requests import chat, data_url, image_part, text_part

LIMITS = ServeLimits(max_tokens=16, max_images=2, max_image_bytes=50_000, max_image_pixels=200 * 200)


def test_auto_is_the_checkpoints_own_dtype_on_every_engine(tmp_path):
    """``resolve_dtype``: both engines run a checkpoint in its config.json's dtype unless told otherwise (vLLM's
    own ``auto`` would run a float32 checkpoint in bfloat16 on CPUs)."""
    for config, expected in (({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "float16"}, "float16"),
                             ({"text_config": {"dtype": "bfloat16"}}, "bfloat16"), ({}, "float32")):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert resolve_dtype("auto", tmp_path) == expected, config
    assert resolve_dtype("float32", tmp_path) == "float32"
    with pytest.raises(ValueError, match="dtype is 'fp8'"):
        resolve_dtype("fp8", tmp_path)


def test_the_engine_runs_the_checkpoint_in_its_dtype_and_says_so(saved_checkpoints, caplog):
    with caplog.at_level(logging.WARNING, logger="llava_platform.generation"):
        engine = open_engine("transformers", saved_checkpoints["llava"], model_name="m", device="cpu", dtype="auto")
    assert engine.model.dtype == torch.float32
    assert "transformers engine: m in float32 (the checkpoint's own)" in caplog.text
    converted = open_engine("transformers", saved_checkpoints["llava"], model_name="m", device="cpu", dtype="bfloat16")
    assert converted.model.dtype == torch.bfloat16


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
