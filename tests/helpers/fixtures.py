"""Session fixtures: tiny towers and checkpoints saved once, and the real servers every layer shares.

Each expensive set-up is paid once per test run: one Ray head node (``ray_cluster``), one ``mlflow
server``, one moto S3 server, one set of tiny checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llava_platform.model.compose import save_llava
from llava_platform.model.tiny import save_tiny_language_model, save_tiny_vision_tower
from tests.helpers.models import MODEL_ARCHS, TILE, compose, compose_onevision
from tests.helpers.ray_head import RayHead
from tests.helpers.servers import S3_TEST_ENV, MlflowServer, MotoServer

RAY_LOGICAL_CPUS = 8
"""The head node's CPU budget on the 2-core machines: a submitted job, a Ray Train run (2 workers x
0.5), its preprocessing actors (0.25 each) and a Serve replica (0.25) fit side by side."""


@pytest.fixture(scope="session")
def towers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("towers")
    return {
        "clip": str(save_tiny_vision_tower(root / "clip", family="clip", image_size=TILE, patch_size=14)),
        "siglip": str(save_tiny_vision_tower(root / "siglip", family="siglip", image_size=TILE, patch_size=14)),
        # one head of 32: vLLM's CPU attention runs head sizes from 32 up (llava_platform.vllm_engine.CPU_HEAD_SIZES)
        "llama": str(save_tiny_language_model(root / "llama", heads=1)),
        "qwen2": str(save_tiny_language_model(root / "qwen2", family="qwen2", heads=1)),
    }


@pytest.fixture(scope="session")
def tokenizer(towers):
    from transformers import AutoTokenizer

    from llava_platform.model.compose import add_image_token

    tok = AutoTokenizer.from_pretrained(towers["llama"])
    add_image_token(tok)
    return tok


@pytest.fixture(scope="session")
def saved_checkpoints(towers, tmp_path_factory) -> dict[str, Path]:
    """Composed tiny LLaVA and LLaVA-NeXT checkpoints, saved in folders whose names avoid 'llava'."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: save_llava(*compose(towers, arch), root / f"ckpt_{i}") for i, arch in enumerate(MODEL_ARCHS)}


@pytest.fixture(scope="session")
def onevision_checkpoint(towers, tmp_path_factory) -> Path:
    """A composed tiny LLaVA-OneVision checkpoint (SigLIP + Qwen2, anyres_max_2)."""
    return save_llava(*compose_onevision(towers), tmp_path_factory.mktemp("checkpoints") / "ckpt_onevision")


@pytest.fixture(scope="session")
def ray_head():
    """The run's Ray head node (``ray start --head``), with moto's credentials for every worker."""
    head = RayHead(num_cpus=RAY_LOGICAL_CPUS, env=S3_TEST_ENV).start()
    yield head
    import ray

    ray.shutdown()
    head.stop()


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    """This test process joined to the head node as a driver; its workers get moto's credentials."""
    import ray

    # Workers' output stays in the head's log folder (<temp dir>/session_latest/logs), out of pytest's.
    ray.init(address=ray_head.address, runtime_env={"env_vars": S3_TEST_ENV}, log_to_driver=False)
    return ray_head


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1 (a real HTTP server in its own process)."""
    server = MotoServer()
    os.environ.update(S3_TEST_ENV)
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 for the whole session; yields its URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def serve_port() -> int:
    """The HTTP port of Ray Serve on the session's head node: one proxy per node, shared by every application."""
    from tests.helpers.servers import free_port

    return free_port()
