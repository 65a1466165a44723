"""The vLLM engine actor itself (its CPU build, in .venv-vllm/): LLaVA-NeXT parity with transformers,
aborting a cancelled request, and engines that cannot start naming the model and the reason.

The endpoint tests (``test_endpoint.py``) run the same HTTP suite on both engines with the LLaVA-1.5
checkpoint; here the engine is driven directly, as a Serve replica or a Ray Data actor does.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
import ray

from jobs import deploy
from llava_platform.config.schema import ServeLimits
from llava_platform.generation.vllm import VllmClient, start_vllm_engine
from llava_platform.model.compose import save_llava
from llava_platform.model.tiny import save_tiny_language_model
from llava_platform.vllm_engine import EngineRequest, EngineStartError
from serve.openai_api import parse_chat_request
from tests.helpers.endpoint import KEY, VLLM_TEST_SETTINGS, config, reference_engine, vllm_test_settings
from tests.helpers.losses import found_loss, record_loss
from tests.helpers.models import compose
from tests.helpers.requests import chat, data_url, image_part, text_part

SETTINGS = vllm_test_settings()
LIMITS = ServeLimits(max_tokens=300, max_images=2, max_image_bytes=200_000, max_image_pixels=512 * 512)


@pytest.fixture(scope="module")
def next_engine(ray_cluster, saved_checkpoints):
    generator = VllmClient(saved_checkpoints["llava_next"], "tiny-next", SETTINGS)
    yield generator
    ray.kill(generator.engine)


def test_llava_next_answers_token_for_token_as_transformers(next_engine, saved_checkpoints):
    """anyres tiling, the image-newline rows and the unpadding run in vLLM's own code: same answers."""
    reference = reference_engine(saved_checkpoints["llava_next"])
    for i, size in enumerate([(40, 30), (30, 90), (120, 50)]):
        request = parse_chat_request(chat(text_part(f"Question {i}?"), image_part(data_url(size)), max_tokens=12,
                                          temperature=0), LIMITS)
        expected = reference.generate([reference.prepare(request)])[0]
        prepared = next_engine.prepare(request)
        [got] = asyncio.run(next_engine.complete([prepared]))
        assert (got.completion_tokens, got.prompt_tokens) == (expected.completion_tokens, expected.prompt_tokens)
        assert got.text == expected.text, size  # both decode the answer's token ids whole


def test_a_cancelled_request_is_aborted_in_the_engine(next_engine):
    """What a client that disconnects from a stream causes: the engine stops generating for it."""
    before = ray.get(next_engine.engine.stats.remote())
    request = EngineRequest("cancel-me", [1, 43, 280], [], max_tokens=300, temperature=0.0)
    stream = next_engine.engine.generate.options(num_returns="streaming").remote(request)
    ray.get(next(stream))  # the first delta: the request is running
    ray.cancel(stream)
    deadline = time.time() + 30
    while time.time() < deadline and ray.get(next_engine.engine.stats.remote())["aborted"] == before["aborted"]:
        time.sleep(0.2)
    after = ray.get(next_engine.engine.stats.remote())
    assert after["aborted"] == before["aborted"] + 1 and after["finished"] == before["finished"]


@pytest.mark.chaos  # 23 s of engines failing to start; make chaos runs it with every fault test
@pytest.mark.fault("vllm: an engine that cannot start (no checkpoint, a head size the CPU build lacks, "
                   "OneVision other than anyres_max_9)")
def test_an_engine_that_cannot_start_names_the_model_and_the_reason(ray_cluster, towers, onevision_checkpoint,
                                                                   tmp_path, serve_port, record_property):
    """Each start must fail with an error naming the model and the reason: one that starts (or hangs past
    the engine's start timeout) instead is a lost start."""
    from ray import serve

    (tmp_path / "empty").mkdir()
    sixteen = save_tiny_language_model(tmp_path / "llama16", heads=2)  # hidden 32 / 2 heads: head size 16
    heads16 = save_llava(*compose({**towers, "llama": str(sixteen)}, "llava"), tmp_path / "heads16")
    app = config("vllm-bad", "/vllm-bad", serve_port, num_replicas=1, max_constructor_retry_count=1)
    app["applications"][0]["args"]["vllm"] = VLLM_TEST_SETTINGS
    starts = {
        "no checkpoint": (lambda: start_vllm_engine(tmp_path / "empty", "empty-folder", SETTINGS),
                          r"model empty-folder: .*empty has no config.json"),
        # vLLM 0.32 would run it as anyres_max_9: other image features than the model was trained on
        "anyres_max_2": (lambda: start_vllm_engine(onevision_checkpoint, "max2", SETTINGS),
                         r"model max2: its vision_aspect_ratio is anyres_max_2.*engine: transformers"),
        "head size 16, deployed": (lambda: deploy.run(app, model=str(heads16), model_name="heads-16", api_key=KEY,
                                                      engine="vllm"),
                                   r"(?s)failed.*model heads-16: its attention head size is 16"),
    }
    started = []
    for name, (start, reason) in starts.items():
        try:
            engine = start()
            started.append(name)
            if isinstance(engine, ray.actor.ActorHandle):
                ray.kill(engine)
        except (EngineStartError, RuntimeError) as error:
            if not re.search(reason, str(error)):
                started.append(f"{name} (refused, but: {error})")
    serve.delete("vllm-bad")
    loss, = record_loss(record_property, found_loss("engine starts not refused", started, checked=len(starts)))
    assert not loss.count, loss
