"""The model stage 3 aligned (``dpo_run``), served from the Model Registry behind the OpenAI API: the official
client asks it an image question over HTTP."""

from __future__ import annotations

import pytest

from jobs import deploy
from tests.helpers.endpoint import KEY, MODEL, client, config
from tests.helpers.requests import data_url


@pytest.fixture(scope="module")
def dpo_server(serve_base, serve_port, dpo_run, mlflow_server):
    from ray import serve

    result, _, _ = dpo_run
    deploy.run(config("dpo", "/dpo", serve_port, num_replicas=1), model=result.model_uri, model_name=MODEL,
               api_key=KEY, tracking_uri=mlflow_server)
    yield f"{serve_base}/dpo"
    serve.delete("dpo")


def test_the_aligned_model_answers_over_http_from_the_registry(dpo_server, dpo_run):
    result, _, _ = dpo_run
    assert result.model_uri.startswith("models:/tiny-dpo-cpu/")
    reply = client(dpo_server).chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url((56, 56))}},
            {"type": "text", "text": "What colour is the left shape?"}]}])
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
