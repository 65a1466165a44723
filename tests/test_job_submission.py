"""`ray job submit` against a real head node (`ray start --head` on 127.0.0.1), as users run the jobs.

The head gets its own temp folder and ports, so it lives beside the test session's local Ray
instance; only its own processes are stopped at the end (`ray stop` would stop every Ray on the machine).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import psutil
import pytest

from conftest import REPO_ROOT, free_port, tiny_pipeline_overrides
from llava_platform import tracking

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head_node():
    """A one-node Ray cluster started like a real head node; yields its job-submission address."""
    temp_dir = tempfile.mkdtemp(prefix="rayjs-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}  # job entrypoints run `python` from this venv
    env.pop("RAY_ADDRESS", None)
    command = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host",
               "127.0.0.1", "--num-cpus", "4", "--temp-dir", temp_dir, "--disable-usage-stats",
               *[str(part) for flag, port in ports.items() for part in (flag, port)]]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=120)
    yield f"http://127.0.0.1:{dashboard}", env
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or []):
            process.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, *entrypoint: str, timeout: int = 900) -> str:
    """`ray job submit` from the repository root; returns the job's output, fails the test if the job failed."""
    result = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env",
         "jobs/runtime_env.yaml", "--", "python", "-m", *entrypoint],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def submitted_pipeline(head_node, mlflow_server, tmp_path_factory):
    """The tiny LLaVA-NeXT pipeline submitted as a job, stopping after its evaluation."""
    root = tmp_path_factory.mktemp("submitted")
    address, env = head_node
    output = submit(address, env, "jobs.pipeline", "--recipe", "tiny_cpu_demo", "--output", str(root / "out"),
                    "--no-serve", *tiny_pipeline_overrides(root), f"tracking.uri={mlflow_server}",
                    "model.arch=llava_next", "model.image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]]",
                    "stage1.data.image_mode=anyres", "stage2.data.image_mode=anyres")
    return root, output


def test_pipeline_job_produces_its_mlflow_runs_and_model(submitted_pipeline, mlflow_server):
    root, output = submitted_pipeline
    assert "accuracy stage2" in output and "succeeded" in output
    runs = json.loads((root / "out" / "train" / "mlflow_runs.json").read_text())["runs"]
    client = tracking.client_for(mlflow_server)
    parent = client.get_run(runs["parent"])
    assert parent.info.status == "FINISHED" and parent.data.params["model.arch"] == "llava_next"
    for stage in ("stage1", "stage2"):
        run = client.get_run(runs[stage])
        assert run.data.tags[tracking.PARENT_TAG] == runs["parent"] and run.info.status == "FINISHED"
        assert "eval/accuracy" in run.data.metrics and client.get_metric_history(runs[stage], "loss")
    assert tracking.registered_version(mlflow_server, runs["stage2"]) is not None


def test_preprocess_and_deploy_jobs(head_node, submitted_pipeline, mlflow_server):
    """The other jobs the same way: preprocess to shards, then deploy the registered model and call it."""
    root, _ = submitted_pipeline
    address, env = head_node
    runs = json.loads((root / "out" / "train" / "mlflow_runs.json").read_text())["runs"]
    name, version = tracking.registered_version(mlflow_server, runs["stage2"])
    shards = root / "shards"
    submit(address, env, "jobs.preprocess", "--recipe", "tiny_cpu_demo", "--stage", "2", "--model",
           str(root / "out" / "initial"), "--output", str(shards), *tiny_pipeline_overrides(root))
    assert json.loads((shards / "manifest.json").read_text())["counts"]["kept"] == 24

    port = free_port()
    submit(address, env, "jobs.deploy", "--model", f"models:/{name}/{version}", "--model-name", "submitted",
           "--tracking-uri", mlflow_server, "--http-host", "127.0.0.1", "--http-port", str(port))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    deadline = time.monotonic() + 120  # the job returns once the deployment is accepted; the replica may still load
    while True:
        try:
            reply = client.chat.completions.create(model="submitted", max_tokens=4, temperature=0,
                                                   messages=[{"role": "user", "content": "Hello"}])
            break
        except (openai.APIConnectionError, openai.InternalServerError, openai.NotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens <= 4
