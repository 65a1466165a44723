"""One endpoint application for the serving tests (the API's and the chat page's), deployed once."""

from __future__ import annotations

import pytest

from jobs import deploy
from tests.helpers.endpoint import KEY, MODEL, config


@pytest.fixture(scope="package")
def serve_base(ray_cluster, serve_port) -> str:
    """Ray Serve's address on the head node; applications add their route prefix."""
    return f"http://127.0.0.1:{serve_port}"


@pytest.fixture(scope="package")
def server(serve_base, serve_port, saved_checkpoints):
    """The tiny LLaVA checkpoint at ``/endpoint``, one replica, API key ``KEY``, model name ``MODEL``."""
    from ray import serve

    deploy.run(config("endpoint", "/endpoint", serve_port, num_replicas=1), model=str(saved_checkpoints["llava"]),
               model_name=MODEL, api_key=KEY)
    yield f"{serve_base}/endpoint"
    serve.delete("endpoint")
