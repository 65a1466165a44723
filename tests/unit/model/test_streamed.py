"""``model.streamed``: the composed checkpoint written one shard at a time is the one ``compose_llava`` +
``save_llava`` write (names, tower weights, config, processor), and plain transformers loads it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from llava_platform.model.checkpoint_index import tensor_index
from llava_platform.model.compose import save_llava
from llava_platform.model.streamed import write_composed_llava, write_pretrained_llava
from llava_platform.model.tiny import save_tiny_language_model
from tests.helpers.models import PINPOINTS, TILE, compose

CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


@pytest.mark.parametrize("arch, family, language", [("llava", "clip", "llama"), ("llava_next", "siglip", "qwen2")])
def test_the_streamed_checkpoint_is_the_in_memory_one(towers, tmp_path, arch, family, language):
    language_model = towers["llama"] if language == "llama" else \
        str(save_tiny_language_model(tmp_path / "qwen2", family="qwen2", tie_word_embeddings=True))
    options = dict(arch=arch, projector="mlp2x_gelu", vision_feature_layer=-2, image_size=TILE,
                   image_mode="anyres" if arch == "llava_next" else "pad", template="vicuna_v1",
                   pinpoints=PINPOINTS if arch == "llava_next" else None)
    torch.manual_seed(0)  # the projector (and NeXT's image_newline) are drawn in the same order on both paths
    model, processor = compose(dict(towers, llama=language_model), arch, family=family)
    save_llava(model, processor, tmp_path / "in_memory")
    torch.manual_seed(0)
    params = write_composed_llava(towers[family], language_model, tmp_path / "streamed", shard_bytes=40_000,
                                  **options)
    assert params == sum(p.numel() for p in model.parameters())

    expected, written = tensor_index(tmp_path / "in_memory"), tensor_index(tmp_path / "streamed")
    assert set(written) == set(expected)  # save_pretrained's names, tied weights once
    for name, location in expected.items():  # the same bytes: towers, resized embeddings, fresh projector
        assert torch.equal(written[name].read(), location.read()), name
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    shards = {file.name for file in (tmp_path / "streamed").glob("model-*.safetensors")}
    assert len(shards) > 1 and set(index["weight_map"].values()) == shards and set(index["weight_map"]) == set(written)
    for file in ("config.json", "generation_config.json", "processor_config.json", "chat_template.jinja"):
        assert json.loads((tmp_path / "streamed" / file).read_text()) == \
            json.loads((tmp_path / "in_memory" / file).read_text()) if file.endswith(".json") else \
            (tmp_path / "streamed" / file).read_text() == (tmp_path / "in_memory" / file).read_text(), file

    reloaded = CLASSES[arch].from_pretrained(tmp_path / "streamed")  # plain transformers, every weight found
    assert reloaded.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            assert torch.equal(reloaded.get_parameter(name), parameter), name


def test_a_pretrained_checkpoint_keeps_its_weight_files(saved_checkpoints, tmp_path):
    model_type, params = write_pretrained_llava(str(saved_checkpoints["llava"]), tmp_path / "out", template="chatml",
                                                image_mode="square")
    assert model_type == "llava" and params > 0
    for file in saved_checkpoints["llava"].glob("*.safetensors"):
        assert os.path.samefile(file, tmp_path / "out" / file.name)  # hard-linked, not rewritten
    processor_config = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert processor_config["image_processor"]["do_pad"] is False
    assert "<|im_start|>" in (tmp_path / "out" / "chat_template.jinja").read_text()
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")


def test_new_vocabulary_rows_are_the_old_rows_mean():
    from llava_platform.model.compose import resized_rows

    old = torch.arange(12, dtype=torch.float32).view(4, 3)
    grown = resized_rows(old, 6)
    assert torch.equal(grown[:4], old) and torch.equal(grown[4], old.mean(0)) and torch.equal(grown[5], old.mean(0))
    assert torch.equal(resized_rows(old, 3), old[:3])  # a padded vocabulary shrinks to the tokenizer's
