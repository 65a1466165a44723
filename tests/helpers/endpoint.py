"""The serving tests' endpoint: its Serve config, API key and model name, and openai-client helpers."""

from __future__ import annotations

import openai
import yaml

from serve.app import default_config_path
from tests.helpers import requests as bodies

KEY = "test-key"
MODEL = "tiny"
VLLM_TEST_SETTINGS = {"max_model_len": 512, "kv_cache_memory_bytes": 64 << 20, "enforce_eager": True,
                      "in_process": True, "num_cpus": 0.25}
"""The vLLM engine on a 2-core test machine: a 64 MiB KV cache, no compilation, the engine core in the
actor's process (one process and ~1 GiB per engine). Its dtype is the deployment's (``auto``: the tiny
checkpoints' float32, as the transformers engine runs them)."""


def vllm_test_settings():
    """``VLLM_TEST_SETTINGS`` as the engine takes them (``VllmConfig(...).build()``)."""
    from llava_platform.config.schema import VllmConfig

    return VllmConfig(**VLLM_TEST_SETTINGS).build("auto")


def reference_engine(checkpoint):
    """The transformers engine in this process, float32: what the vLLM engine's answers are compared with."""
    from llava_platform.generation.engine import open_engine

    return open_engine("transformers", checkpoint, model_name="reference", device="cpu", dtype="float32")


def data_url(size=(40, 30)) -> str:
    return bodies.data_url(size, colour=(30, 200, 30))


def config(name, route, port, **deployment):
    """serve/config.yaml with a tiny deployment and small limits; the same HTTP options as every job's."""
    base = yaml.safe_load(default_config_path().read_text())
    app = base["applications"][0]
    app.update(name=name, route_prefix=route)
    app["args"]["limits"] = {"max_tokens": 32, "max_images": 2, "max_image_bytes": 200_000,
                             "max_image_pixels": 512 * 512}
    app["deployments"] = [{"name": "LlavaServer", "max_ongoing_requests": 64,
                           "ray_actor_options": {"num_cpus": 0.25}, **deployment}]
    base["http_options"] = {**base["http_options"], "host": "127.0.0.1", "port": port}
    return base


def client(url, key=KEY, prefix=""):
    return openai.OpenAI(base_url=f"{url}{prefix}/v1", api_key=key, max_retries=0, timeout=60)


def ask(url, text="What colour is it?", image=True, prefix="", **options):
    content = [{"type": "text", "text": text}] + ([{"type": "image_url", "image_url": {"url": data_url()}}]
                                                  if image else [])
    return client(url, prefix=prefix).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **{"max_tokens": 6, "temperature": 0,
                                                                          **options})
