"""The endpoint applications for the serving tests, each deployed once: one per engine.

``server`` (the transformers engine) is shared with the chat page's browser test and the load
scenario; ``vllm_server`` runs the same checkpoint on vLLM's CPU build; ``endpoint`` is either, so a
test that takes it runs once per engine: both engines pass the same tests.
"""

from __future__ import annotations

import pytest

from jobs import deploy
from tests.helpers.endpoint import KEY, MODEL, VLLM_TEST_SETTINGS, config


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


@pytest.fixture(scope="package")
def vllm_server(serve_base, serve_port, saved_checkpoints):
    """The same checkpoint at ``/vllm-endpoint`` on the vLLM engine (its CPU build, in .venv-vllm/)."""
    from ray import serve

    app = config("vllm-endpoint", "/vllm-endpoint", serve_port, num_replicas=1)
    app["applications"][0]["args"]["vllm"] = VLLM_TEST_SETTINGS
    deploy.run(app, model=str(saved_checkpoints["llava"]), model_name=MODEL, api_key=KEY, engine="vllm")
    yield f"{serve_base}/vllm-endpoint"
    serve.delete("vllm-endpoint")


@pytest.fixture(params=["transformers", "vllm"])
def endpoint(request) -> str:
    """The endpoint's URL on each engine in turn."""
    return request.getfixturevalue("server" if request.param == "transformers" else "vllm_server")
