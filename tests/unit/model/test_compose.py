"""Compose tiny LLaVA / LLaVA-NeXT from saved towers, train a step, save, reload with plain transformers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)
from transformers.activations import LinearActivation

from llava_platform.data.conversation import IGNORE_INDEX, tokenize_conversation
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.templates import resolve_chat_template
from llava_platform.data.tiling import normalize_tiles
from llava_platform.model.compose import (
    ModelCompositionError,
    compose_llava,
    load_pretrained_llava,
    load_processor,
)
from tests.helpers.models import TILE, compose

CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat colour is the square?"},
    {"from": "gpt", "value": "red"},
]


def make_batch(processor, image_size, mode):
    """One training sample through our own tiling and tokenisation (what the data pipeline does)."""
    settings = ImageSettings.from_processor(processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*image_size, 3), dtype=np.uint8))
    tiles = torch.from_numpy(settings.tile(image, mode))
    sample = tokenize_conversation(
        CONVERSATION, processor.tokenizer, resolve_chat_template("vicuna_v1", None),
        tokens_per_image=[settings.token_count(image_size, mode)], image_token="<image>", max_length=4096,
        truncation="drop",
    )
    pixels = normalize_tiles(tiles, settings.image_mean, settings.image_std)
    batch = {
        "input_ids": torch.tensor([sample.input_ids]),
        "labels": torch.tensor([sample.labels]),
        "pixel_values": pixels if mode != "anyres" else pixels[None],
    }
    if mode == "anyres":
        batch["image_sizes"] = torch.tensor([image_size])
    return batch, settings.token_count(image_size, mode)


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_compose_forward_backward(towers, arch, family):
    model, processor = compose(towers, arch, family)
    assert type(model) is CLASSES[arch]
    assert not any(p.is_meta for p in model.parameters())
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.vision_feature_select_strategy == ("default" if family == "clip" else "full")
    mode = "anyres" if arch == "llava_next" else "pad"
    batch, _ = make_batch(processor, (40, 90), mode)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    projector_grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert projector_grad is not None and projector_grad.abs().sum() > 0
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_towers_carry_their_pretrained_weights(towers):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    model, _ = compose(towers, "llava")
    clip = CLIPVisionModel.from_pretrained(towers["clip"]).state_dict()
    ours = model.model.vision_tower.state_dict()
    assert clip.keys() == ours.keys()
    assert all(torch.equal(ours[k], clip[k]) for k in clip)
    llama = LlamaForCausalLM.from_pretrained(towers["llama"])
    q = model.model.language_model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q, llama.model.layers[1].self_attn.q_proj.weight)
    rows = llama.model.embed_tokens.weight.shape[0]  # the original rows survive the image-token resize
    assert torch.equal(model.get_input_embeddings().weight[:rows], llama.model.embed_tokens.weight)


@pytest.mark.parametrize("size", [(40, 90), (90, 40), (56, 56), (20, 150), (111, 57)])
def test_image_features_match_the_token_count(saved_checkpoints, size):
    """Geometry's token count == the model's packed features == the processor's placeholder expansion."""
    processor = AutoProcessor.from_pretrained(saved_checkpoints["llava_next"])
    model = LlavaNextForConditionalGeneration.from_pretrained(saved_checkpoints["llava_next"])
    batch, expected = make_batch(processor, size, "anyres")
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
        ).pooler_output
    assert sum(f.shape[0] for f in features) == expected
    image = Image.new("RGB", (size[1], size[0]))
    expanded = processor(text="<image>", images=image)["input_ids"][0]
    assert expanded.count(model.config.image_token_id) == expected


def test_linear_projector_is_one_linear_map(towers):
    model, _ = compose(towers, "llava", projector="linear")
    projector = model.model.multi_modal_projector
    assert isinstance(projector.act, LinearActivation) and model.config.projector_hidden_act == "linear"
    a, b = torch.randn(3, projector.linear_1.in_features), torch.randn(3, projector.linear_1.in_features)
    with torch.no_grad():
        zero = projector(torch.zeros_like(a))
        torch.testing.assert_close(projector(a + b) - zero, (projector(a) - zero) + (projector(b) - zero))


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_save_and_reload_with_plain_transformers(saved_checkpoints, arch):
    """No code of ours at load time; the folder name does not contain 'llava'."""
    path = saved_checkpoints[arch]
    assert "llava" not in path.name
    assert json.loads((path / "config.json").read_text())["model_type"] == arch
    assert (path / "model.safetensors").exists() and (path / "chat_template.jinja").exists()
    processor = AutoProcessor.from_pretrained(path)
    reloaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(reloaded) is CLASSES[arch]
    mode = "anyres" if arch == "llava_next" else "pad"
    batch, _ = make_batch(processor, (40, 90), mode)
    ours, _ = load_pretrained_llava(str(path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, ours.eval()(**batch).logits, rtol=0, atol=0)


def test_saved_model_trains_then_round_trips(saved_checkpoints, tmp_path):
    """A few optimizer steps change the weights; the saved result reloads with identical logits."""
    model, processor = load_pretrained_llava(str(saved_checkpoints["llava"]))
    batch, _ = make_batch(processor, (40, 90), "pad")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "trained")
    processor.save_pretrained(tmp_path / "trained")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)
    assert (batch["labels"] != IGNORE_INDEX).sum() > 0


def test_generate_from_the_saved_processor(saved_checkpoints):
    """The HF way to prompt (apply_chat_template with tokenize=True) gives one BOS and stops at EOS."""
    processor = load_processor(str(saved_checkpoints["llava"]))
    model = LlavaForConditionalGeneration.from_pretrained(saved_checkpoints["llava"]).eval()
    image = Image.new("RGB", (30, 20), "red")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    bos = processor.tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos
    assert ids.count(model.config.image_token_id) == 16
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output[0, : len(ids)].tolist() == ids and 0 < output.shape[1] - len(ids) <= 4


@pytest.mark.parametrize("template, end_of_turn", [("vicuna_v1", "</s>"), ("chatml", "<|im_end|>"),
                                                   ("llama3", "<|eot_id|>")])
def test_generation_stops_at_the_templates_end_of_turn(towers, template, end_of_turn):
    model, processor = compose_llava(
        towers["clip"], towers["llama"], arch="llava", projector="mlp2x_gelu", vision_feature_layer=-2,
        image_size=TILE, image_mode="pad", template=template,
    )
    stop = model.generation_config.eos_token_id
    stop = stop if isinstance(stop, list) else [stop]
    assert processor.tokenizer.convert_tokens_to_ids(end_of_turn) in stop
    assert processor.tokenizer.eos_token_id in stop


def test_pretrained_checkpoint_adopts_the_recipes_template_and_mode(saved_checkpoints, tmp_path):
    from llava_platform.config.build import build_model
    from llava_platform.config.schema import ModelConfig

    config = ModelConfig(arch="llava", pretrained=str(saved_checkpoints["llava"]), image_size=TILE)
    model, processor = build_model(config, image_mode="square", template="chatml", work_dir=tmp_path)
    assert "<|im_start|>" in processor.chat_template and not processor.image_processor.do_pad
    with pytest.raises(ModelCompositionError, match="is a llava checkpoint but model.arch is 'llava_next'"):
        build_model(ModelConfig(arch="llava_next", pretrained=str(saved_checkpoints["llava"]),
                                image_grid_pinpoints=[(56, 112)], image_size=TILE),
                    image_mode="anyres", template="chatml", work_dir=tmp_path)


def test_composition_errors(towers):
    with pytest.raises(ModelCompositionError, match="model.image_size is 336 but vision tower .* takes 56 px"):
        compose_llava(towers["clip"], towers["llama"], arch="llava", projector="mlp2x_gelu", vision_feature_layer=-2,
                      image_size=336, image_mode="pad", template="vicuna_v1")
    with pytest.raises(ModelCompositionError, match="model type 'llama' is not supported"):
        compose_llava(towers["llama"], towers["llama"], arch="llava", projector="mlp2x_gelu", vision_feature_layer=-2,
                      image_size=TILE, image_mode="pad", template="vicuna_v1")
    with pytest.raises(ModelCompositionError, match="vision_feature_layer -5 is outside the tower's 2 layers"):
        compose_llava(towers["clip"], towers["llama"], arch="llava", projector="mlp2x_gelu", vision_feature_layer=-5,
                      image_size=TILE, image_mode="pad", template="vicuna_v1")
    with pytest.raises(ModelCompositionError, match="arch llava_next serves anyres images, not 'pad'"):
        compose(towers, "llava_next", mode="pad")
    with pytest.raises(ModelCompositionError, match="not a LLaVA checkpoint"):
        load_pretrained_llava(towers["llama"])


@pytest.mark.parametrize("family, tied", [("mistral", False), ("qwen2", True)])
def test_compose_with_other_language_models(towers, tmp_path, family, tied):
    """Mistral, and Qwen2 with tied input/output embeddings (small Qwen models tie them)."""
    from llava_platform.model.tiny import save_tiny_language_model

    language = save_tiny_language_model(tmp_path / family, family=family, tie_word_embeddings=tied)
    model, processor = compose_llava(
        towers["clip"], str(language), arch="llava", projector="mlp2x_gelu", vision_feature_layer=-2,
        image_size=TILE, image_mode="pad", template="chatml",
    )
    assert model.config.text_config.model_type == family
    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embeddings.shape[0] == len(processor.tokenizer)
    assert (embeddings.data_ptr() == head.data_ptr()) == tied
    batch, _ = make_batch(processor, (40, 90), "pad")
    model(**batch).loss.backward()
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)
