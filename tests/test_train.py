"""jobs.train on 2 CPU workers: stage 1 then stage 2 with Ray Train + DeepSpeed, then the export."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from jobs import compose, train
from llava_platform.data.synthetic import write_synthetic_dataset
from llava_platform.train.checkpoint import PROJECTOR_FILE, save_projector


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    files = write_synthetic_dataset(root / "data", train=24, eval=1, seed=0)
    initial = compose.main(["--recipe", "tiny_cpu_demo", "--output", str(root / "initial")])
    overrides = [
        f"stage1.data.train_files=[{files['stage1']}]", f"stage2.data.train_files=[{files['stage2']}]",
        f"stage1.data.image_root={root / 'data'}", f"stage2.data.image_root={root / 'data'}",
        "stage1.global_batch_size=4", "stage1.micro_batch_size=2", "stage2.global_batch_size=4",
        "stage2.micro_batch_size=2", "stage1.max_steps=3", "stage2.max_steps=3",
    ]
    return root, initial, overrides


def state(path):
    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


def test_two_stages_zero2(ray_local, setup):
    root, initial, overrides = setup
    out = train.main(["--recipe", "tiny_cpu_demo", "--model", str(initial), "--output", str(root / "zero2"),
                      "--stage", "all", *overrides])
    projector = load_file(str(out["stage1"] / PROJECTOR_FILE))
    before = state(initial)
    assert set(projector) == {n for n in before if "multi_modal_projector" in n}
    assert any(not torch.equal(projector[n], before[n]) for n in projector), "stage 1 did not train the projector"
    after = state(out["stage2"] / "export")
    vision = [n for n in before if n.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(after[n], before[n]) for n in vision), "the frozen tower changed"
    lm = [n for n in before if n.startswith("model.language_model.layers.")]
    assert any(not torch.equal(after[n], before[n]) for n in lm), "stage 2 did not train the language model"
    assert (out["stage1"] / "quarantine.jsonl").exists()


def test_stage2_alone_zero3_exports_full_weights(ray_local, setup):
    root, initial, overrides = setup
    before = state(initial)
    given = {n: t + 0.01 for n, t in before.items() if "multi_modal_projector" in n}  # a stand-in stage-1 result
    projector = save_projector(given, root / "given")
    out = train.main(["--recipe", "tiny_cpu_demo", "--model", str(initial), "--output", str(root / "zero3"),
                      "--stage", "2", *overrides, "stage2.deepspeed.zero_stage=3", f"stage2.init_from={projector}",
                      "stage2.deepspeed.gradient_checkpointing=true"])
    # The file itself (a reload would fill gaps with random weights). transformers writes the llava-hf key
    # layout, so compare counts and sizes here and values after the reload below.
    saved = load_file(str(out["stage2"] / "export" / "model.safetensors"))
    assert len(saved) == len(before) and all(t.numel() > 0 for t in saved.values())  # gathered, not Size([0])
    after = state(out["stage2"] / "export")
    vision = [n for n in before if n.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(after[n], before[n]) for n in vision)
    assert set(load_file(str(projector))) == set(given)


def test_stage2_alone_needs_a_projector(setup):
    root, initial, overrides = setup
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--recipe", "tiny_cpu_demo", "--model", str(initial), "--output", str(root / "x"), "--stage", "2",
                    *overrides])
    assert exit_info.value.code == 2


def test_lora_recipes_are_refused_until_wired(setup):
    root, initial, overrides = setup
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--recipe", "tiny_cpu_demo", "--model", str(initial), "--output", str(root / "y"), "--stage", "2",
                    *overrides, "stage2.tunable=[projector]", "stage2.lora={r: 4, alpha: 8}"])
    assert exit_info.value.code == 2
