"""The job entrypoints run for real on the tiny recipe."""

import json

import numpy as np
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from jobs import compose, pipeline


def test_compose_job_writes_a_self_describing_checkpoint(tmp_path):
    out = compose.main(["--recipe", "tiny_cpu_demo", "--output", str(tmp_path / "initial")])
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    assert "name: tiny-cpu-demo" in (out / "llava_platform_recipe.yaml").read_text()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.do_pad  # the last stage's image mode is `pad`
    assert "ASSISTANT:" in processor.chat_template
    assert isinstance(AutoModelForImageTextToText.from_pretrained(out), LlavaForConditionalGeneration)


def test_pipeline_job_end_to_end(ray_local, tmp_path):
    result = pipeline.main(["--recipe", "tiny_cpu_demo", "--output", str(tmp_path), "--steps", "12",
                            "--records", "24"])
    assert (result["report"].read, result["report"].kept) == (24, 24)
    assert np.mean(result["losses"][-3:]) < np.mean(result["losses"][:3])
    assert set(result["accuracy"]) == {"short", "mc"}
    assert all(0.0 <= value <= 1.0 for value in result["accuracy"].values())
    assert isinstance(result["answer"], str)
    reloaded = AutoModelForImageTextToText.from_pretrained(result["checkpoint"])
    assert isinstance(reloaded, LlavaForConditionalGeneration)


def test_pipeline_job_runs_llava_next(ray_local, tmp_path):
    result = pipeline.main([
        "--recipe", "tiny_cpu_demo", "--output", str(tmp_path), "--steps", "4", "--records", "8",
        "model.arch=llava_next", "model.image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]]",
        "stage1.data.image_mode=anyres", "stage2.data.image_mode=anyres",
    ])
    assert result["report"].kept == 8 and len(result["losses"]) == 4


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
