"""OpenAI request validation without Ray Serve: every refusal is a 400 that names the problem."""

import base64

import pytest

from llava_platform.config.schema import ServeLimits
from llava_platform.generation.request import GenerationRequest, RequestError
from serve.openai_api import parse_chat_request
from tests.helpers.losses import http_outcome, record_loss, requests_loss
from tests.helpers.requests import bilevel_png, chat, data_url, image_part, text_part

LIMITS = ServeLimits(max_tokens=16, max_images=2, max_image_bytes=50_000, max_image_pixels=200 * 200)


def test_valid_request_keeps_parts_and_decodes_images():
    parsed = parse_chat_request(chat(text_part(), image_part(data_url()), max_tokens=8, stop="\n"), LIMITS)
    assert parsed.conversation == [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                                 {"type": "image"}]}]
    assert [im.size for im in parsed.images] == [(40, 30)] and parsed.max_tokens == 8 and parsed.stop == ["\n"]
    assert parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, LIMITS).max_tokens == 16


@pytest.mark.parametrize(("body", "expected"), [
    ([], "JSON object"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "at least one message"),
    (chat(text_part(), role="robot"), "'robot' is not one of"),
    (chat({"type": "audio"}), "a part must be"),
    (chat(image_part("data:image/png;base64,@@@not-base64@@@")), "not valid base64"),
    (chat(image_part("data:image/png;base64," + base64.b64encode(b"plain text").decode())), "not a decodable image"),
    (chat(image_part(data_url(size=(300, 300)))), "pixels"),
    (chat(image_part(data_url(size=(4, 100)))), "aspect ratio of 25.0:1"),
    (chat(image_part("data:image/png;base64," + "A" * 80_000)), "byte limit"),
    (chat(*[image_part(data_url())] * 3), "at most 2"),
    (chat(text_part(), max_tokens=17), "cap of 16"),
    (chat(image_part("https://example.com/cat.png")), "fetches no remote URLs"),
    (chat(image_part("file:///etc/passwd")), "fetches no remote URLs"),
    (chat(text_part(), temperature=5), "temperature"),
    (chat(text_part(), seed=2**64), "seed"),
    (chat(text_part("look: <image>")), "may not contain <image>"),
    (chat(text_part("\ud800")), "not valid Unicode"),
    (chat({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}), "image_url.url is missing"),
    (chat(text_part(), tools=[{"type": "function", "function": {"name": "f"}}]), "tools: not implemented"),
    (chat(text_part(), tool_choice="auto"), "tool_choice: not implemented"),
    (chat(text_part(), response_format={"type": "json_object"}), "response_format: only {'type': 'text'}"),
    (chat(text_part(), logprobs=True), "logprobs"),
    (chat(text_part(), top_logprobs=2), "top_logprobs: not implemented"),
    (chat(text_part(), n=2), "n: "),
    (chat(text_part(), frequency_penalty=0.5), "frequency_penalty"),
    (chat(text_part(), best_of=3), "best_of: not a field this server knows"),
])
def test_bad_requests_get_a_400_that_names_the_problem(body, expected):
    with pytest.raises(RequestError) as error:
        parse_chat_request(body, LIMITS)
    assert error.value.status == 400 and expected in error.value.message
    assert error.value.body()["error"]["type"] == "invalid_request_error"


def test_fields_that_cannot_change_the_answer_are_accepted():
    parsed = parse_chat_request(chat(text_part(), user="u-1", metadata={"k": "v"}, store=False, n=1, logprobs=False,
                                     response_format={"type": "text"}, stream_options={"include_usage": True},
                                     frequency_penalty=0, presence_penalty=0.0), LIMITS)
    assert parsed.conversation[0]["content"] == [{"type": "text", "text": "What is this?"}]


def test_a_request_without_a_seed_has_none():
    """``GenerationRequest`` is a plain dataclass: its seed defaults to ``None``, not to a pydantic ``FieldInfo``."""
    assert GenerationRequest(conversation=[]).seed is None
    assert parse_chat_request(chat(text_part()), LIMITS).seed is None
    assert parse_chat_request(chat(text_part(), seed=7), LIMITS).seed == 7


def test_allow_listed_hosts_are_fetched_with_the_given_function():
    fetched = []
    limits = ServeLimits(allowed_image_hosts=("images.internal",))
    png = base64.b64decode(data_url().split(",")[1])
    parsed = parse_chat_request(chat(image_part("https://images.internal/a.png")), limits,
                                fetcher=lambda url, max_bytes, kind: fetched.append((url, kind)) or png)
    assert fetched == [("https://images.internal/a.png", "image")] and len(parsed.images) == 1


@pytest.mark.fault("security: a decompression bomb (40000 x 40000 px in a 200 kB PNG)")
def test_an_image_bomb_is_refused_from_its_header_before_decoding(record_property):
    import resource

    png = bilevel_png(40_000, 40_000)  # 4.8 GB once decoded to RGB
    assert len(png) < 1_000_000
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    limits = ServeLimits(max_tokens=16, max_images=2, max_image_bytes=2_000_000, max_image_pixels=200 * 200)
    try:
        parse_chat_request(chat(image_part(url)), limits)
        outcome = "ok"  # accepted: the bomb would be decoded
    except RequestError as error:
        outcome = http_outcome(error.status) if "pixels" in error.message else "wrong"
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    loss, = record_loss(record_property, requests_loss([outcome], "4xx"))
    assert not loss.count, f"the bomb was not refused with a 400 naming the pixels: {outcome}"
    assert grown_kib < 200_000, f"the peak memory grew by {grown_kib} KiB: the image was decoded"
