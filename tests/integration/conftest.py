"""Integration tests share one Ray head node, one ``mlflow server`` and one end-to-end job.

The end-to-end job (``jobs.pipeline`` on the tiny recipe as LLaVA-NeXT, submitted with ``ray job
submit``) starts in the background with the first integration test and runs beside the tests that
do not need it; tests that read its results (the ``pipeline_run`` fixture) run after all others.
Its recipe, data and starting checkpoint are shared: the training fault and resume tests run the
same recipe, so that its losses are their reference.
"""

from __future__ import annotations

import pytest
import yaml

from jobs import compose
from llava_platform.data.synthetic import write_synthetic_dataset
from tests.helpers.pipeline_job import SECRET, SECRET_VARIABLES, PipelineJob, PipelineRun
from tests.helpers.ray_head import JOB_RUNTIME_ENV, RayHead
from tests.helpers.recipes import NEXT_MODEL, RECIPE, STEPS, tiny_pipeline_overrides


def pytest_collection_modifyitems(config, items):
    """Integration tests that wait for the end-to-end job run last (stable otherwise)."""
    def key(item):
        layer = item.nodeid.split("/")[1] if item.nodeid.startswith("tests/") else ""
        return ("unit", "integration", "chaos").index(layer) if layer in ("unit", "integration", "chaos") else -1, \
            layer == "integration" and "pipeline_run" in item.fixturenames
    items.sort(key=key)


@pytest.fixture(scope="session")
def pipeline_job(ray_cluster: RayHead, mlflow_server, serve_port, tmp_path_factory) -> PipelineJob:
    """Submit the end-to-end job (synthetic data -> compose -> preprocess -> stage 1 streamed -> stage 2
    from shards -> evaluate both -> Serve -> one question over HTTP) and return without waiting."""
    root = tmp_path_factory.mktemp("pipeline")
    overrides = (*tiny_pipeline_overrides(root, steps=STEPS), *NEXT_MODEL, f"tracking.uri={mlflow_server}")
    write_synthetic_dataset(root / "data", train=24, eval=8, seed=0)  # the job finds it and reuses it
    initial = compose.main(["--recipe", RECIPE, "--output", str(root / "initial"), *overrides])
    runtime_env = yaml.safe_load(JOB_RUNTIME_ENV.read_text())
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **dict.fromkeys(SECRET_VARIABLES, SECRET)}
    (root / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    job = ray_cluster.submit("jobs.pipeline", "--recipe", RECIPE, "--output", str(root / "out"), "--port",
                             str(serve_port), *overrides, log=root / "job.log", runtime_env=root / "runtime_env.yaml")
    return PipelineJob(root, overrides, initial, job, serve_port)


@pytest.fixture(scope="session", autouse=True)
def _start_the_pipeline_job_first(request):
    """When any selected test reads the end-to-end job, it starts with the first integration test (it is
    the longest), not when first read."""
    if any("pipeline_run" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("pipeline_job")


@pytest.fixture(scope="session")
def pipeline_run(pipeline_job: PipelineJob) -> PipelineRun:
    """The end-to-end job, once it has succeeded."""
    return PipelineRun(pipeline_job, pipeline_job.job.wait())
