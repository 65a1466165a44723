"""GPT-assisted data generation, the Ray-free parts: contexts from COCO-style and JSON-lines annotations,
the versioned prompts, and responses parsed into LLaVA records or rejected with their reason."""

import json

import pytest

from llava_platform.data.synthetic import write_coco_style
from llava_platform.datagen.annotations import AnnotationFormatError, Box, ImageContext, read_coco, read_contexts
from llava_platform.datagen.parse import REASONS, Rejected, to_record
from llava_platform.datagen.prompts import PROMPT_VERSION, TYPES, PromptError, context_text, load_prompts

IMAGE = ImageContext("7", "images/a.jpg", ("A red circle.", "A circle on grey."), (Box("circle", 0.1, 0.2, 0.5, 0.6),))
PROMPTS = load_prompts()


def test_coco_style_annotations_give_captions_first_and_normalised_boxes(tmp_path):
    captions, instances = write_coco_style(tmp_path, images=3, seed=1)
    contexts = read_coco(str(captions), str(instances))
    assert [c.id for c in contexts] == ["0", "1", "2"] and all(len(c.captions) == 5 for c in contexts)
    coco = json.loads(instances.read_text())
    first = coco["images"][0]
    x, y, w, h = next(a["bbox"] for a in coco["annotations"] if a["image_id"] == 0)
    box = contexts[0].boxes[0]
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((x / first["width"], y / first["height"],
                                                                (x + w) / first["width"], (y + h) / first["height"]))
    assert contexts[0].image == first["file_name"] and (tmp_path / first["file_name"]).is_file()
    text = context_text(contexts[0])
    assert text.split("\n")[0] == contexts[0].captions[0] and f"{box.label}: [{box.x1:.3f}," in text


def test_bad_annotations_name_the_file_and_what_was_expected(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"id": 1, "image": "a.jpg", "captions": ["x"], "boxes": '
                                      '[{"label": "dog", "bbox": [10, 20, 30, 40]}]}\n')
    with pytest.raises(AnnotationFormatError, match=r"c.jsonl line 1: expected .*bbox.*0-1"):
        read_contexts(str(tmp_path / "c.jsonl"))
    (tmp_path / "caps.json").write_text('{"images": []}')
    with pytest.raises(AnnotationFormatError, match="COCO captions and instances"):
        read_coco(str(tmp_path / "caps.json"), str(tmp_path / "caps.json"))
    with pytest.raises(AnnotationFormatError, match="does not exist"):
        read_contexts(str(tmp_path / "nowhere.jsonl"))


def test_prompts_are_versioned_files_and_a_user_folder_overrides_them(tmp_path):
    assert PROMPTS.version == PROMPT_VERSION and set(PROMPTS.types) == set(TYPES)
    messages = PROMPTS.messages("conversation", context_text(IMAGE))
    assert messages[0]["role"] == "system" and messages[-1] == {"role": "user", "content": context_text(IMAGE)}
    assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * len(PROMPTS.types["conversation"].examples)
    for kind in ("conversation", "reasoning"):  # each shipped example parses as a good response of its type
        for _context, response in PROMPTS.types[kind].examples:
            assert to_record(IMAGE, kind, response, "stop", PROMPTS)["conversations"]
    (tmp_path / "detail.yaml").write_text("system: Describe it.\nquestions: [Describe this.]\n")
    custom = load_prompts(tmp_path, ("detail",))
    assert custom.version.startswith("custom-") and custom.detail_question("7") == "Describe this."
    (tmp_path / "detail.yaml").write_text("system: Describe it.\n")
    with pytest.raises(PromptError, match="detail.yaml: 'questions'"):
        load_prompts(tmp_path, ("detail",))
    with pytest.raises(PromptError, match="conversation.yaml: missing"):
        load_prompts(tmp_path, ("conversation",))


def test_a_conversation_becomes_alternating_turns_with_the_image_first_exactly_once():
    content = ("Question:\nWhat is it?\n===\nAnswer:\nA red circle <image>.\n===\nQuestion:\nWhy red?\n===\n"
               "Answer:\nRed draws the eye.")
    record = to_record(IMAGE, "conversation", content, "stop", PROMPTS)
    assert record["id"] == "7-conversation" and record["image"] == "images/a.jpg"
    assert [t["from"] for t in record["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert record["conversations"][0]["value"] == "<image>\nWhat is it?"
    assert sum(t["value"].count("<image>") for t in record["conversations"]) == 1


def test_a_detailed_description_answers_an_instruction_from_the_prompt():
    record = to_record(IMAGE, "detail", "A red circle sits on a grey background.", "stop", PROMPTS)
    question = record["conversations"][0]["value"]
    assert question.removeprefix("<image>\n") in PROMPTS.types["detail"].questions
    assert record["conversations"][1] == {"from": "gpt", "value": "A red circle sits on a grey background."}
    assert to_record(IMAGE, "detail", "Another text.", "stop", PROMPTS)["conversations"][0]["value"] == question


@pytest.mark.parametrize("kind, content, finish, reason", [
    ("conversation", "Question:\nWhat is", "length", "truncated"),
    ("detail", "   ", "stop", "empty"),
    ("detail", "I'm sorry, I cannot describe images.", "stop", "refused"),
    ("conversation", "A circle, nothing else.", "stop", "unparseable"),
    ("conversation", "Answer:\nA circle.\n===\nQuestion:\nWhat?", "stop", "wrong_turn_structure"),
    ("reasoning", "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?\n===\nAnswer:\nD.", "stop",
     "wrong_turn_structure"),
    ("conversation", "Question:\nWhat?\n===\nAnswer:\n", "stop", "wrong_turn_structure"),
    ("detail", "Answer:\nA shape.\n===\nQuestion:\nWhat is it?", "stop", "wrong_turn_structure"),
    ("conversation", "Question:\nWhat?\n===\nAnswer:\nThe caption mentions a circle.", "stop",
     "mentions_captions_or_boxes"),
    ("detail", "A circle inside its bounding box.", "stop", "mentions_captions_or_boxes"),
    ("detail", "A circle at [0.1, 0.2, 0.5, 0.6].", "stop", "mentions_captions_or_boxes"),
    ("detail", "A circle at the coordinates shown.", "stop", "mentions_captions_or_boxes"),
    ("detail", "word " * 801, "stop", "too_long"),
])
def test_bad_responses_are_rejected_with_their_reason(kind, content, finish, reason):
    with pytest.raises(Rejected) as rejected:
        to_record(IMAGE, kind, content, finish, PROMPTS)
    assert rejected.value.reason == reason and reason in REASONS
