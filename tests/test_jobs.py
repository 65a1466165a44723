"""The job entrypoints run for real on the tiny recipe."""

import json

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


def test_pipeline_job_trains_saves_and_answers(tmp_path):
    summary = pipeline.main(["--recipe", "tiny_cpu_demo", "--output", str(tmp_path), "--steps", "8"])
    assert summary["last_loss"] < summary["first_loss"]
    assert isinstance(summary["answer"], str)
    assert (tmp_path / "tiny-cpu-demo" / "checkpoint" / "model.safetensors").exists()


def test_pipeline_job_runs_llava_next(tmp_path):
    summary = pipeline.main([
        "--recipe", "tiny_cpu_demo", "--output", str(tmp_path), "--steps", "3", "model.arch=llava_next",
        "model.image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]]", "stage1.data.image_mode=anyres",
        "stage2.data.image_mode=anyres",
    ])
    assert summary["last_loss"] < summary["first_loss"]
