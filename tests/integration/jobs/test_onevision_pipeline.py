"""LLaVA-OneVision through the whole platform (``onevision_run``): synthetic one-image, two-image and video
questions, preprocessed to Parquet shards, two stages on Ray Train + DeepSpeed, an export plain transformers
loads, scored per kind of input, and served (``serve/test_onevision_serving.py`` asks the export)."""

import json
from pathlib import Path

import ray
from transformers import AutoModelForImageTextToText

from llava_platform import tracking
from llava_platform.data.synthetic import ONEVISION_SOURCES
from tests.helpers.recipes import ONEVISION_FRAMES


def test_every_step_ran_and_the_shards_hold_all_three_kinds(onevision_run):
    result, root = onevision_run
    for step in ("synthetic data", "compose", "preprocess", "train", "evaluate"):
        assert step in result.timings, f"no {step} step"
    manifest = json.loads((root / "shards2" / "manifest.json").read_text())
    assert manifest["counts"]["read"] == manifest["counts"]["kept"] == 18
    # stage 2 read a LLaVA-NeXT data YAML of three sources, one per kind of input: counted each
    assert [(Path(s["source"]).name, s["strategy"], s["kept"]) for s in manifest["sources"]] == \
        [(name, "all", 6) for name in ONEVISION_SOURCES.values()]
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


def test_stage_two_trained_on_packed_rows(onevision_run, mlflow_server):
    """Stage 2 packs several samples (of any kind) per row: its params say so and its steps were balanced."""
    result, _ = onevision_run
    run = tracking.client_for(mlflow_server).get_run(result.runs["stage2"])
    assert run.data.params["data.packing.max_tokens"] == "1024" and run.data.params["loss"] == "token_mean"
    history = tracking.client_for(mlflow_server).get_metric_history(result.runs["stage2"], "straggler_ratio")
    assert sorted(m.step for m in history) == [1, 2] and all(m.value == 1.0 for m in history)  # one worker


PLAIN_TRANSFORMERS = """
import json, sys
import numpy as np
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image
processor = AutoProcessor.from_pretrained(sys.argv[1])
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
video = np.stack([np.full((56, 56, 3), 20 * i, np.uint8) for i in range(4)])  # frames at the tile size
images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (70, 90), (20, 200, 20))]
question = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "When?"}]}]
text = processor.apply_chat_template(question, add_generation_prompt=True)
inputs = processor(text=text, videos=[video], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
two = processor(text="<image><image>Which?", images=[images], return_tensors="pt")
print(json.dumps({"processor": type(processor).__name__, "video_processor": type(processor.video_processor).__name__,
                  "video_tokens": int((inputs["input_ids"] == processor.video_token_id).sum()),
                  "video_pixels": inputs["pixel_values_videos"][0].tolist(),
                  "image_tokens": int((two["input_ids"] == processor.image_token_id).sum()),
                  "generated": out.shape[1] - inputs["input_ids"].shape[1]}))
"""


def test_plain_transformers_with_torchvision_loads_the_whole_processor(onevision_run):
    """Where torchvision is installed (the vLLM environment has it), ``AutoProcessor`` loads the processor we
    saved without one, video processor included, and counts and normalises as our pipeline does."""
    import subprocess

    import numpy as np
    import torch

    from llava_platform.data.image_settings import ImageSettings
    from llava_platform.data.tiling import normalize_tiles
    from llava_platform.model.compose import load_processor
    from llava_platform.vllm_engine import default_engine_python

    _, root = onevision_run
    export = root / "out" / "train" / "stage2" / "export"
    python = default_engine_python()
    assert python, "make vllm builds the environment this test runs plain transformers in"
    done = subprocess.run([python, "-c", PLAIN_TRANSFORMERS, str(export)], capture_output=True,
                          text=True, timeout=300, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    settings = ImageSettings.from_processor(load_processor(str(export)))
    assert (seen["processor"], seen["video_processor"]) == ("LlavaOnevisionProcessor", "LlavaOnevisionVideoProcessor")
    assert seen["video_tokens"] == settings.video_token_count(4) and seen["generated"] == 3
    assert seen["image_tokens"] == 2 * settings.stacked_token_count()
    frames = np.stack([np.full((3, 56, 56), 20 * i, np.uint8) for i in range(4)])
    ours = normalize_tiles(torch.as_tensor(frames), settings.image_mean, settings.image_std)
    torch.testing.assert_close(torch.tensor(seen["video_pixels"]), ours, rtol=0, atol=1e-6)
