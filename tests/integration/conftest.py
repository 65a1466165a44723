"""Integration tests share one Ray head node, one ``mlflow server`` and one end-to-end job.

The end-to-end job (``jobs.pipeline`` on the tiny recipe as LLaVA-NeXT, submitted with ``ray job
submit``) runs once; the tests that read it (the ``pipeline_run`` fixture) run after all others. Its
recipe, data and starting checkpoint (``pipeline_recipe``) are shared: the training fault test runs
the same recipe, so that the job's losses are its reference.
"""

from __future__ import annotations

import pytest
import yaml

from jobs import compose
from llava_platform.data.synthetic import write_synthetic_dataset
from tests.helpers.corpus import write_eval_with_bad_rows
from tests.helpers.pipeline_job import SECRET, SECRET_VARIABLES, PipelineRecipe, PipelineRun
from tests.helpers.ray_head import JOB_RUNTIME_ENV, RayHead
from tests.helpers.recipes import (
    DPO_RECIPE,
    NEXT_MODEL,
    ONEVISION_RECIPE,
    RECIPE,
    STEPS,
    dpo_pipeline_overrides,
    onevision_pipeline_overrides,
    tiny_pipeline_overrides,
    write_preference_pairs,
    zero3,
)


def pytest_collection_modifyitems(config, items):
    """Integration tests that wait for the end-to-end job run last (stable otherwise)."""
    def key(item):
        layer = item.nodeid.split("/")[1] if item.nodeid.startswith("tests/") else ""
        return ("unit", "integration", "chaos").index(layer) if layer in ("unit", "integration", "chaos") else -1, \
            layer == "integration" and "pipeline_run" in item.fixturenames
    items.sort(key=key)


@pytest.fixture(scope="session")
def pipeline_recipe(mlflow_server, tmp_path_factory) -> PipelineRecipe:
    """The end-to-end job's recipe, data (bad evaluation records among the good) and starting checkpoint,
    prepared in this process; the job finds the same data, and composes the same weights (seeded)."""
    root = tmp_path_factory.mktemp("pipeline")
    files = write_synthetic_dataset(root / "data", train=24, eval=8, seed=0)
    evaluation = write_eval_with_bad_rows(files["eval"])
    overrides = (*tiny_pipeline_overrides(root, steps=STEPS), *NEXT_MODEL, *zero3("stage1"),
                 "model.tiny.text_heads=2",  # head size 32: the export also runs on vLLM's CPU build
                 f"evaluation.data_files=[{evaluation}]", "evaluation.batch_size=4", f"tracking.uri={mlflow_server}")
    initial = compose.main(["--recipe", RECIPE, "--output", str(root / "initial"), *overrides])
    return PipelineRecipe(root, overrides, initial)


@pytest.fixture(scope="session")
def pipeline_run(ray_cluster: RayHead, pipeline_recipe: PipelineRecipe, serve_port) -> PipelineRun:
    """Submit the end-to-end job (synthetic data -> compose -> preprocess -> stage 1 streamed, ZeRO-3 ->
    stage 2 from shards, ZeRO-2 -> evaluate both -> Serve -> one question over HTTP) with secrets in its
    environment, and wait until it has succeeded."""
    root = pipeline_recipe.root
    runtime_env = yaml.safe_load(JOB_RUNTIME_ENV.read_text())
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **dict.fromkeys(SECRET_VARIABLES, SECRET)}
    (root / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    job = ray_cluster.submit("jobs.pipeline", "--recipe", RECIPE, "--output", str(pipeline_recipe.output), "--port",
                             str(serve_port), *pipeline_recipe.overrides, log=root / "job.log",
                             runtime_env=root / "runtime_env.yaml")
    return PipelineRun(pipeline_recipe, serve_port, job.wait())


@pytest.fixture(scope="session")
def onevision_run(ray_cluster: RayHead, mlflow_server, tmp_path_factory):
    """The tiny LLaVA-OneVision recipe through the whole platform, in this process (synthetic one-image,
    two-image and video questions -> compose -> preprocess to shards -> stage 1 -> stage 2 -> evaluate);
    returns (its ``PipelineResult``, its output folder). ``serve/test_onevision_serving.py`` deploys the export."""
    from jobs import pipeline

    root = tmp_path_factory.mktemp("onevision")
    result = pipeline.main(["--recipe", ONEVISION_RECIPE, "--output", str(root / "out"), "--no-serve",
                            *onevision_pipeline_overrides(root, mlflow_server)])
    return result, root


@pytest.fixture(scope="session")
def dpo_run(ray_cluster: RayHead, mlflow_server, tmp_path_factory):
    """The tiny DPO recipe through the whole platform, in this process (synthetic data -> compose -> stage 1 ->
    stage 2 -> stage 3 on image and text-only preference pairs with bad records among them, ZeRO-3 on two ranks
    -> evaluate stage 2 and stage 3 -> the held-out preference pairs); returns (its ``PipelineResult``, its root,
    the pairs' counts by kind). ``serve/test_dpo_serving.py`` serves the registered model."""
    from jobs import pipeline, synthetic_data

    root = tmp_path_factory.mktemp("dpo")
    overrides = dpo_pipeline_overrides(root, mlflow_server)
    synthetic_data.run(root / "data", train=24, eval=4, seed=0)  # the job reuses it (same sizes and seed)
    counts = write_preference_pairs(root / "data", root / "pairs.jsonl")
    result = pipeline.main(["--recipe", DPO_RECIPE, "--output", str(root / "out"), "--no-serve", *overrides])
    return result, root, counts
