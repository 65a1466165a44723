"""jobs.compose writes a self-describing starting checkpoint that plain transformers loads."""

import json

from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from jobs import compose


def test_compose_job_writes_a_self_describing_checkpoint(tmp_path):
    out = compose.main(["--recipe", "tiny_cpu_demo", "--output", str(tmp_path / "initial")])
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    assert "name: tiny-cpu-demo" in (out / "llava_platform_recipe.yaml").read_text()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.do_pad  # the last stage's image mode is `pad`
    assert "[INST]" in processor.chat_template  # stage 2's `mistral` template
    assert isinstance(AutoModelForImageTextToText.from_pretrained(out), LlavaForConditionalGeneration)
