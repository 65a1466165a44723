"""Checkpoints we write use the llava-hf tensor names (what vLLM, SGLang and the hub read), and plain
transformers loads them with the same weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText

from llava_platform.model.layout import llava_hf_name, write_llava_hf_layout
from llava_platform.model.streamed import write_pretrained_llava
from llava_platform.train.partitioned import tensor_index
from tests.helpers.training import assert_llava_hf_layout


@pytest.mark.parametrize(("saved", "llava_hf"), [
    ("vision_tower.encoder.layers.0.mlp.fc1.weight", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
    ("vision_tower.embeddings.class_embedding", "vision_tower.vision_model.embeddings.class_embedding"),
    ("vision_tower.vision_model.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.bias"),
    ("language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.0.self_attn.q_proj.weight"),
    ("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
    ("image_newline", "image_newline"),
])
def test_only_the_vision_tower_gains_its_vision_model_wrapper(saved, llava_hf):
    assert llava_hf_name(saved) == llava_hf


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_saved_checkpoints_are_in_the_llava_hf_layout_and_load_with_the_same_weights(saved_checkpoints, tmp_path,
                                                                                     arch):
    folder = saved_checkpoints[arch]
    assert_llava_hf_layout(folder)  # save_llava wrote them so
    assert write_llava_hf_layout(folder) == 0  # nothing left to rename
    # transformers' own names (what save_pretrained writes for a model built from its config, as a
    # training export is) -> llava-hf, and both load the same weights
    plain = transformers_names(folder, tmp_path / "plain")
    renamed = tmp_path / "renamed"
    shutil.copytree(plain, renamed)
    assert write_llava_hf_layout(renamed) > 0
    assert_llava_hf_layout(renamed)
    expected = AutoModelForImageTextToText.from_pretrained(plain).state_dict()
    loaded = AutoModelForImageTextToText.from_pretrained(renamed).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_a_pretrained_checkpoint_in_transformers_names_is_rewritten_not_linked(saved_checkpoints, tmp_path):
    transformers_names(saved_checkpoints["llava"], tmp_path / "with_processor")
    write_pretrained_llava(str(tmp_path / "with_processor"), tmp_path / "out", template="chatml", image_mode="pad")
    assert_llava_hf_layout(tmp_path / "out")
    assert any(n.startswith("vision_tower.embeddings.") for n in tensor_index(tmp_path / "with_processor"))


def transformers_names(folder, out):
    """A copy of ``folder`` with the names transformers 5 gives the vision tower (``vision_tower.encoder...``)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({n.replace("vision_tower.vision_model.", "vision_tower."): t for n, t in tensors.items()}, file,
                  metadata={"format": "pt"})
    assert any(n.startswith("vision_tower.embeddings.") for n in tensor_index(out))
    return out
