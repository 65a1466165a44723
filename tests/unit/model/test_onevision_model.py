"""The tiny LLaVA-OneVision checkpoint: transformers' own class in the llava-hf layout, fed by our rows and
our serving inputs alike, for one image, several images and a video."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText

from llava_platform.data.collate import collate_onevision
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.records import RowBuilder
from llava_platform.data.video import sample_video
from llava_platform.generation.engine import answer_questions
from llava_platform.generation.transformers import TransformersEngine
from llava_platform.inference import encode_chat, question_conversation
from llava_platform.model.compose import load_pretrained_llava, load_processor
from tests.helpers.media import encode_video, grey_ramp, png, random_picture
from tests.helpers.specs import row_spec, video_limits


@pytest.fixture(scope="module")
def loaded(onevision_checkpoint):
    model, processor = load_pretrained_llava(str(onevision_checkpoint))
    return model.eval(), processor


def test_the_export_is_transformers_own_onevision_in_the_llava_hf_layout(onevision_checkpoint):
    model = AutoModelForImageTextToText.from_pretrained(str(onevision_checkpoint))
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    config = AutoConfig.from_pretrained(str(onevision_checkpoint))
    assert (config.vision_aspect_ratio, config.vision_feature_select_strategy) == ("anyres_max_2", "full")
    assert config.image_grid_pinpoints[-1] == [168, 168] and config.vision_config.model_type == "siglip_vision_model"
    with safe_open(str(onevision_checkpoint / "model.safetensors"), framework="pt") as weights:
        names = list(weights.keys())
    assert any(n.startswith("vision_tower.vision_model.encoder.") for n in names)  # what vLLM and the hub read
    assert "model.image_newline" in names or "image_newline" in names
    saved = json.loads((onevision_checkpoint / "processor_config.json").read_text())
    video = saved["video_processor"]
    assert video["video_processor_type"] == "LlavaOnevisionVideoProcessor" and video["size"] == {"height": 56,
                                                                                                "width": 56}
    assert saved["vision_aspect_ratio"] == "anyres_max_2" and saved["image_processor"]["size"]["height"] == 56


@pytest.fixture(scope="module")
def rows(loaded):
    _, processor = loaded
    builder = RowBuilder.from_processor(processor, row_spec(template="qwen_1_5", image_mode="anyres", max_length=4096,
                                                           video_frames=4))

    def record(value, answer, **media):
        return {"id": "r", **media, "conversations": [{"from": "human", "value": value},
                                                       {"from": "gpt", "value": answer}]}

    return {
        "image": builder.build(record("<image>\nWhat colour?", "Red.", image="a.png"), png(random_picture(100, 300))),
        "multi_image": builder.build(record("<image>\n<image>\nWhich?", "First.", image=["a.png", "b.png"]),
                                     [png(random_picture(60, 60, 1)), png(random_picture(90, 50, 2))]),
        "video": builder.build(record("<image>\nWhen?", "Frame 2.", video="v.mp4"), [], encode_video(grey_ramp(12))),
    }


def test_a_batch_of_all_three_kinds_trains(loaded, rows):
    """The model itself checks that every placeholder token gets exactly one feature: our counts are its."""
    model, processor = loaded
    settings = ImageSettings.from_processor(processor)
    batch = collate_onevision(*(list(column) for column in zip(*[
        (r["input_ids"], r["labels"], r["tiles"], r["image_sizes"], r["frames"]) for r in rows.values()], strict=True)),
        pad_token_id=processor.tokenizer.pad_token_id, image_mean=settings.image_mean, image_std=settings.image_std)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    model.zero_grad()


@pytest.mark.parametrize("kind", ["image", "multi_image", "video"])
def test_serving_inputs_are_the_training_rows_prompt(loaded, rows, kind):
    """What the server and the evaluation feed the model is the training row up to the answer."""
    _, processor = loaded
    images = {"image": [random_picture(100, 300)], "video": [],
              "multi_image": [random_picture(60, 60, 1), random_picture(90, 50, 2)]}[kind]
    videos = [sample_video(encode_video(grey_ramp(12)), video_limits(frames=4)).frames] if kind == "video" else []
    question = {"image": "What colour?", "multi_image": "Which?", "video": "When?"}[kind]
    served = encode_chat(processor, question_conversation(question, len(images), len(videos)), images, videos)
    row = rows[kind]
    prompt = served["input_ids"][0].tolist()
    assert row["input_ids"][: len(prompt)].tolist() == prompt
    assert (row["labels"][: len(prompt)] == -100).all() and (row["labels"][len(prompt):] != -100).any()
    settings = ImageSettings.from_processor(processor)
    if kind == "video":
        expected = collate_onevision([[0]], [[0]], [row["tiles"]], [[]], [row["frames"]], pad_token_id=0,
                                     image_mean=settings.image_mean, image_std=settings.image_std)
        torch.testing.assert_close(served["pixel_values_videos"], expected["pixel_values_videos"], rtol=0, atol=0)
    else:
        assert served["batch_num_images"].tolist() == [len(images)]
        assert served["image_sizes"].tolist() == row["image_sizes"].tolist()


def test_mixed_questions_answer_alike_batched_or_alone(loaded):
    model, processor = loaded
    video = sample_video(encode_video(grey_ramp(12)), video_limits(frames=4))
    pair = [random_picture(60, 60, 1), random_picture(90, 50, 2)]
    items = [(random_picture(100, 300), "What colour?"), (pair, "Which?"), (video, "When?"), (None, "Hello")]
    torch.manual_seed(0)
    engine = TransformersEngine(model, processor, "cpu")
    batched = answer_questions(engine, items, max_new_tokens=5)
    alone = [answer_questions(engine, [item], max_new_tokens=5)[0] for item in items]
    assert batched == alone and len(batched) == 4


def test_a_video_for_a_model_without_video_is_refused(saved_checkpoints):
    processor = load_processor(str(saved_checkpoints["llava"]))
    frames = [random_picture(20, 20)] * 2
    with pytest.raises(ValueError, match="llava_onevision"):
        encode_chat(processor, question_conversation("When?", 0, 1), [], [frames])


def test_the_training_embeddings_are_transformers_own(loaded, rows):
    """``onevision_inputs_embeds`` (the fixed module order every ZeRO-3 rank runs) gives exactly the loss of
    transformers' forward, for every kind of batch, and names a placeholder count that does not pair up."""
    from llava_platform.train.deepspeed_engine import onevision_inputs_embeds

    model, processor = loaded
    settings = ImageSettings.from_processor(processor)
    text = {"input_ids": rows["image"]["input_ids"][:5], "labels": rows["image"]["input_ids"][:5],
            "tiles": rows["video"]["tiles"], "image_sizes": rows["video"]["image_sizes"],
            "frames": rows["image"]["frames"]}
    for chosen in (["image"], ["multi_image"], ["video"], ["image", "video", "multi_image"], None):
        picked = [text] if chosen is None else [rows[kind] for kind in chosen]
        batch = collate_onevision([r["input_ids"] for r in picked], [r["labels"] for r in picked],
                                  [r["tiles"] for r in picked], [r["image_sizes"] for r in picked],
                                  [r["frames"] for r in picked], pad_token_id=processor.tokenizer.pad_token_id,
                                  image_mean=settings.image_mean, image_std=settings.image_std)
        with torch.no_grad():
            expected = model(**batch).loss
            visual = {k: batch.get(k) for k in ("pixel_values", "image_sizes", "batch_num_images",
                                                 "pixel_values_videos")}
            embeds = onevision_inputs_embeds(model.model, batch["input_ids"], **visual)
            got = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="video features and video tokens do not match"):
        onevision_inputs_embeds(model.model, batch["input_ids"], pixel_values_videos=torch.zeros(1, 4, 3, 56, 56))
