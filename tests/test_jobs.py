"""The job entrypoints run for real on the tiny recipe."""

import json
import urllib.request

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from conftest import free_port, tiny_pipeline_overrides
from jobs import compose, pipeline
from llava_platform import tracking
from llava_platform.evaluation import is_correct


def test_compose_job_writes_a_self_describing_checkpoint(tmp_path):
    out = compose.main(["--recipe", "tiny_cpu_demo", "--output", str(tmp_path / "initial")])
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    assert "name: tiny-cpu-demo" in (out / "llava_platform_recipe.yaml").read_text()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.do_pad  # the last stage's image mode is `pad`
    assert "[INST]" in processor.chat_template  # stage 2's `mistral` template
    assert isinstance(AutoModelForImageTextToText.from_pretrained(out), LlavaForConditionalGeneration)


SECRET = "s3cr3t-f0r-the-leak-check"


def test_pipeline_job_end_to_end(ray_local, mlflow_server, tmp_path, monkeypatch, capfd):
    """Synthetic data -> compose -> stage 1 -> stage 2 -> evaluate both -> Serve -> one question over HTTP.

    Secrets given by environment variable appear in no MLflow param or tag and in no log line.
    """
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    port = free_port()
    result = pipeline.main(["--recipe", "tiny_cpu_demo", "--output", str(tmp_path / "out"), "--port", str(port),
                            *tiny_pipeline_overrides(tmp_path), f"tracking.uri={mlflow_server}"])
    assert set(result["scores"]) == {"stage1", "stage2"}
    for scores in result["scores"].values():
        assert scores["count/short"] + scores["count/mc"] == 8 and 0 <= scores["accuracy"] <= 1
    demo = result["demo"]
    assert isinstance(demo["answer"], str) and demo["correct"] == is_correct(demo["answer"], demo["gold"], "short")
    assert demo["question"].startswith("What colour is the")

    client = tracking.client_for(mlflow_server)
    runs = result["runs"]
    name, version = result["model_uri"].removeprefix("models:/").split("/")
    assert client.get_model_version(name, version).run_id == runs["stage2"]
    for stage in ("stage1", "stage2"):  # each stage's scores land on its own run
        metrics = client.get_run(runs[stage]).data.metrics
        assert metrics["eval/accuracy"] == pytest.approx(result["scores"][stage]["accuracy"])
        assert client.get_run(runs[stage]).data.tags[tracking.PARENT_TAG] == runs["parent"]
    for run in ("parent", "stage1", "stage2"):
        data = client.get_run(runs[run]).data
        assert not any(SECRET in str(v) for v in [*data.params.values(), *data.tags.values()])
    assert SECRET not in "".join(capfd.readouterr())
    with pytest.raises(OSError):  # the endpoint was shut down at the end (no --keep-serving)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_preprocess_job_materialises_shards(ray_local, tmp_path):
    from jobs import preprocess as preprocess_job
    from llava_platform.config import load_recipe
    from llava_platform.data.synthetic import write_synthetic_dataset
    from pipelines.preprocess import read_shards, stage_fingerprint

    files = write_synthetic_dataset(tmp_path / "data", train=8, eval=1, seed=0)
    initial = compose.main(["--recipe", "tiny_cpu_demo", "--output", str(tmp_path / "initial")])
    overrides = [f"stage2.data.train_files=[{files['stage2']}]", f"stage2.data.image_root={tmp_path / 'data'}"]
    manifest = preprocess_job.main(["--recipe", "tiny_cpu_demo", "--stage", "2", "--model", str(initial),
                                    "--output", str(tmp_path / "shards"), *overrides])
    assert manifest["counts"]["kept"] == 8
    data = load_recipe("tiny_cpu_demo", overrides).stage2.data
    assert read_shards(tmp_path / "shards", recipe_hash=stage_fingerprint(data.model_dump(), str(initial))).count() == 8
