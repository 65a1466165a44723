"""A LLaVA-OneVision checkpoint behind the OpenAI API: several images and a video in one message, on the
transformers engine over HTTP (the official client, streaming too) and on vLLM token for token."""

from __future__ import annotations

import asyncio

import pytest
import ray

from jobs import deploy
from llava_platform.config.schema import ServeLimits
from llava_platform.generation.request import RequestError
from llava_platform.generation.vllm import VllmClient
from llava_platform.model.compose import save_llava
from serve.openai_api import parse_chat_request
from tests.helpers.endpoint import KEY, MODEL, client, config, reference_engine, vllm_test_settings
from tests.helpers.media import encode_video, grey_ramp
from tests.helpers.models import VLLM_ONEVISION_MAX_TILES, compose_onevision
from tests.helpers.requests import chat, data_url, image_part, text_part, video_data_url, video_part

FRAMES = 4
VIDEO_LIMITS = {"max_videos": 1, "max_video_bytes": 100_000, "max_video_duration_s": 5.0, "max_video_frames": 40,
                "video_frames": FRAMES}
CLIP = video_data_url(encode_video(grey_ramp(12), fps=4))  # 3 s, 12 frames


@pytest.fixture(scope="module")
def onevision_server(serve_base, serve_port, onevision_run):
    """The export the OneVision pipeline trained (``onevision_run``), at ``/onevision``."""
    from ray import serve

    _, root = onevision_run
    app = config("onevision", "/onevision", serve_port, num_replicas=1)
    app["applications"][0]["args"]["limits"].update(VIDEO_LIMITS)
    deploy.run(app, model=str(root / "out" / "train" / "stage2" / "export"), model_name=MODEL, api_key=KEY)
    yield f"{serve_base}/onevision"
    serve.delete("onevision")


def ask(url, *parts, **options):
    return client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "Which one?"}]}],
        **{"max_tokens": 6, "temperature": 0, **options})


def test_two_images_and_a_video_are_answered_plain_and_streamed(onevision_server):
    pair = [image_part(data_url((40, 30))), image_part(data_url((70, 90), colour=(20, 200, 20)))]
    for parts in (pair, [video_part(CLIP)]):
        plain = ask(onevision_server, *parts)
        streamed = ask(onevision_server, *parts, stream=True, stream_options={"include_usage": True})
        chunks = list(streamed)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content  # greedy: the stream says what the plain call said
        assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    # the prompt counts what the model sees: 2 x (16 + 1) image tokens, then 4 x 4 + 1 video tokens
    two_images = ask(onevision_server, *pair).usage.prompt_tokens
    video = ask(onevision_server, video_part(CLIP)).usage.prompt_tokens
    text_only = client(onevision_server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Which one?"}], max_tokens=1).usage.prompt_tokens
    assert (two_images - text_only, video - text_only) == (2 * 17 + 2, FRAMES * 4 + 1 + 1)  # + one "\n" per part


@pytest.mark.parametrize(("video", "code", "words"), [
    (encode_video(grey_ramp(48), fps=4), "video_too_long", "12.0 s video"),  # 48 frames at 4 fps: 12 s > 5 s
    (encode_video(grey_ramp(48), fps=24), "too_many_frames", "48 frames"),  # 2 s, but 48 frames > 40
    (b"certainly not a video", "undecodable_video", "cannot decode"),
])
def test_bad_videos_get_a_400_naming_the_part(onevision_server, video, code, words):
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        ask(onevision_server, video_part(video_data_url(video)))
    body = error.value.body
    assert body["code"] == code and body["param"] == "messages.0.content.0" and words in body["message"]


def test_video_limits_on_count_size_and_source(onevision_server):
    import openai

    cases = [
        ([video_part(CLIP), video_part(CLIP)], "more than 1 video"),
        ([video_part(video_data_url(b"x" * 150_000))], "over the 100,000-byte limit"),
        ([video_part("https://example.com/clip.mp4")], "video URLs must be base64 data: URLs"),
        ([{"type": "video_url", "video_url": {}}], "video_url.url is missing"),
    ]
    for parts, words in cases:
        with pytest.raises(openai.BadRequestError) as error:
            ask(onevision_server, *parts)
        assert words in error.value.body["message"], words
    assert ask(onevision_server, video_part(CLIP)).choices[0].finish_reason in ("stop", "length")  # still serving


def test_a_model_without_video_refuses_a_video(server):
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        ask(server, video_part(CLIP))
    assert "llava_onevision" in error.value.body["message"]


# vLLM: OneVision's tiling, several images and video frames run in vLLM's own code

LIMITS = ServeLimits(max_tokens=64, max_images=3, max_image_bytes=200_000, max_image_pixels=512 * 512, **VIDEO_LIMITS)


@pytest.fixture(scope="module")
def onevision_vllm_checkpoint(towers, tmp_path_factory):
    """A tiny OneVision checkpoint as vLLM runs OneVision: ``anyres_max_9`` (the session's ``onevision_checkpoint``
    is ``anyres_max_2``, which vLLM refuses: see the engine-start fault test)."""
    return save_llava(*compose_onevision(towers, VLLM_ONEVISION_MAX_TILES),
                      tmp_path_factory.mktemp("checkpoints") / "ckpt_onevision_max9")


@pytest.fixture(scope="module")
def onevision_vllm(ray_cluster, onevision_vllm_checkpoint):
    generator = VllmClient(onevision_vllm_checkpoint, "tiny-onevision", vllm_test_settings())
    yield generator
    ray.kill(generator.engine)


@pytest.mark.chaos  # a vLLM engine of its own (~25 s); the suite's vLLM tests run the LLaVA checkpoints
@pytest.mark.parametrize("parts", [
    [image_part(data_url((40, 30)))],
    [image_part(data_url((130, 50)))],
    [image_part(data_url((50, 160)))],
    [image_part(data_url((160, 150)))],
    [video_part(CLIP)],
], ids=["image", "wide-image", "tall-image", "3x3-tiles", "video"])
def test_onevision_answers_token_for_token_on_vllm(onevision_vllm, onevision_vllm_checkpoint, parts):
    """The same prompt (vLLM counts the image tokens with its own processor), the same greedy tokens."""
    reference = reference_engine(onevision_vllm_checkpoint)
    request = parse_chat_request(chat(*parts, text_part("Which one?"), max_tokens=12, temperature=0), LIMITS)
    expected = reference.generate([reference.prepare(request)])[0]
    [got] = asyncio.run(onevision_vllm.complete([onevision_vllm.prepare(request)]))
    assert (got.completion_tokens, got.prompt_tokens) == (expected.completion_tokens, expected.prompt_tokens)
    assert got.text == expected.text  # both decode the answer's token ids whole


@pytest.mark.chaos
def test_several_images_are_refused_on_vllm(onevision_vllm):
    """vLLM 0.32 tiles each image of a prompt as anyres (no ``batch_num_images``): answering would not be the
    model's training, so the request is refused, naming the engine that takes it."""
    pair = [image_part(data_url((40, 30))), image_part(data_url((70, 90)))]
    with pytest.raises(RequestError) as error:
        onevision_vllm.prepare(parse_chat_request(chat(*pair, text_part("Which?"), max_tokens=4), LIMITS))
    assert error.value.status == 400 and "transformers engine" in error.value.message
