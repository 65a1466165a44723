"""LLaVA-OneVision through the whole platform (``onevision_run``): synthetic one-image, two-image and video
questions, preprocessed to Parquet shards, two stages on Ray Train + DeepSpeed, an export plain transformers
loads, scored per kind of input, and served (``serve/test_onevision_serving.py`` asks the export)."""

import json

import ray
from transformers import AutoModelForImageTextToText

from llava_platform import tracking
from tests.helpers.recipes import ONEVISION_FRAMES


def test_every_step_ran_and_the_shards_hold_all_three_kinds(onevision_run):
    result, root = onevision_run
    for step in ("synthetic data", "compose", "preprocess", "train", "evaluate", "serve"):
        assert step in result.timings, f"no {step} step"
    manifest = json.loads((root / "shards2" / "manifest.json").read_text())
    assert manifest["counts"]["read"] == manifest["counts"]["kept"] == 18
    rows = ray.data.read_parquet([str(root / "shards2" / "shards" / name) for name in manifest["shards"]]).take_all()
    kinds = [row["modality"] for row in rows]
    assert sorted(set(kinds)) == ["image", "multi_image", "video"] and kinds.count("video") == 6
    for row in rows:  # the uint8 tensors come back from Parquet as they went in
        frames, sizes = row["frames"], list(row["image_sizes"])
        assert frames.dtype == row["tiles"].dtype == "uint8"
        if row["modality"] == "video":
            assert frames.shape == (ONEVISION_FRAMES, 3, 56, 56) and sizes == [] and row["tiles"].shape[0] == 0
        elif row["modality"] == "multi_image":
            assert row["tiles"].shape == (2, 3, 56, 56) and len(sizes) == 2 and frames.shape[0] == 0
        else:
            assert row["tiles"].shape[0] >= 2 and len(sizes) == 1 and frames.shape[0] == 0  # base + anyres grid


def test_the_export_is_plain_transformers_onevision_and_registered(onevision_run, mlflow_server):
    result, root = onevision_run
    model = AutoModelForImageTextToText.from_pretrained(str(root / "out" / "train" / "stage2" / "export"))
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert model.config.vision_aspect_ratio == "anyres_max_4"
    client = tracking.client_for(mlflow_server)
    name, version = result.model_uri.removeprefix("models:/").split("/")
    assert client.get_model_version(name, version).run_id == result.runs["stage2"]


def test_the_evaluation_scores_each_kind_of_input(onevision_run, mlflow_server):
    result, root = onevision_run
    scores = result.scores["stage2"]
    assert (scores["count/image"], scores["count/multi_image"], scores["count/video"]) == (3, 3, 3)
    predictions = [json.loads(line) for line in (root / "out" / "eval" / "stage2" / "predictions.jsonl")
                   .read_text().splitlines()]
    assert sorted(p["modality"] for p in predictions) == ["image"] * 3 + ["multi_image"] * 3 + ["video"] * 3
    metrics = tracking.client_for(mlflow_server).get_run(result.runs["stage2"]).data.metrics
    assert metrics["eval/count/video"] == 3 and "eval/accuracy/multi_image" in metrics
    assert result.demo is not None and result.demo["answer"] is not None  # the endpoint answered over HTTP
