"""The chat page at ``GET /``, in a real headless Chromium against the real endpoint.

A person's first session: the page asks for the API key the server needs, an image is uploaded, a
question asked, the answer streams in and equals the API's greedy answer to the same request; a
follow-up question continues the conversation; a request the server refuses shows its 4xx message.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from tests.helpers import browser
from tests.helpers.endpoint import KEY, MODEL, client

QUESTION = "What colour is the top shape?"
FOLLOW_UP = "And the bottom one?"


def greedy_answer(server: str, messages: list[dict], max_tokens: int) -> str:
    reply = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                   temperature=0)
    return reply.choices[0].message.content


def answers(page) -> list[str]:
    return [text for text in page.locator(".assistant .text").all_inner_texts()]


def test_upload_ask_stream_continue_and_see_errors_in_a_real_browser(server, tmp_path):
    image = tmp_path / "shapes.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(image)
    image_url = f"data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()}"

    with browser.page(tmp_path / "profile") as page:
        page.goto(f"{server}/")
        # the server needs a key: the page says so and shows the field
        page.get_by_text("this server needs an API key").wait_for(timeout=30_000)
        page.fill("#api-key", KEY)
        page.press("#api-key", "Enter")
        page.locator("#model", has_text=MODEL).wait_for(timeout=30_000)

        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        page.set_input_files("#image", str(image))
        page.locator("#preview:not([hidden])").wait_for()
        page.fill("#question", QUESTION)
        page.click("#send")
        page.locator(".assistant[data-done=true]").wait_for(timeout=60_000)
        first = answers(page)[0]
        browser.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=browser.ARTIFACTS / "chat-page.png", full_page=True)

        asked = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                              {"type": "text", "text": QUESTION}]}]
        assert first == greedy_answer(server, asked, 8), "the page's streamed answer is not the API's greedy one"
        assert page.locator(".user img").count() == 1 and page.locator("#preview").is_hidden()

        # the conversation goes on: the page sends the whole history
        page.fill("#question", FOLLOW_UP)
        page.click("#send")
        page.locator(".assistant[data-done=true]").nth(1).wait_for(timeout=60_000)
        history = [*asked, {"role": "assistant", "content": first}, {"role": "user", "content": [
            {"type": "text", "text": FOLLOW_UP}]}]
        assert answers(page)[1] == greedy_answer(server, history, 8)

        # a request the server refuses: its message is shown to the person, the conversation is unchanged
        page.fill("#max-tokens", "1000")
        page.fill("#question", "One more?")
        page.click("#send")
        error = page.locator("#error")
        error.wait_for(state="visible", timeout=30_000)
        assert error.inner_text().startswith("400: ") and "max_tokens" in error.inner_text()
        assert page.locator(".message").count() == 4 and page.input_value("#question") == "One more?"
        page.screenshot(path=browser.ARTIFACTS / "chat-page-error.png", full_page=True)

    png = Image.open(io.BytesIO((browser.ARTIFACTS / "chat-page.png").read_bytes()))
    assert png.size[0] > 300 and png.size[1] > 200
