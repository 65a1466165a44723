"""Preference records (``data.preference``): LLaVA-NeXT's DPO format as two conversations on one prompt, and the
records a DPO stage must quarantine, each with its reason."""

from __future__ import annotations

import pytest

from llava_platform.data.conversation import MissingFieldError
from llava_platform.data.preference import IdenticalAnswersError, preference_pair

RECORD = {"id": "p-1", "image": "coco/1.jpg", "prompt": "What colour is the car?<image>", "chosen": "Red.",
          "rejected": "Blue.", "chosen_score": 9.0, "rejected_score": 2.0}


def test_a_record_becomes_two_conversations_on_one_prompt_and_image():
    chosen, rejected = preference_pair(RECORD)
    # train_dpo.py: "<image>\n" + prompt.replace("<image>", "").strip()
    assert chosen["conversations"][0] == rejected["conversations"][0] == {
        "from": "human", "value": "<image>\nWhat colour is the car?"}
    assert (chosen["conversations"][1]["value"], rejected["conversations"][1]["value"]) == ("Red.", "Blue.")
    assert chosen["image"] == rejected["image"] == "coco/1.jpg" and chosen["id"] == "p-1"


def test_video_and_text_only_records():
    video, _ = preference_pair({**{k: v for k, v in RECORD.items() if k != "image"}, "video": "v.mp4"})
    assert video["video"] == "v.mp4" and video["conversations"][0]["value"].startswith("<image>\n")
    text, _ = preference_pair({k: v for k, v in RECORD.items() if k != "image"})
    assert text["conversations"][0]["value"] == "What colour is the car?" and "image" not in text


@pytest.mark.parametrize(("change", "error", "reason"), [
    ({"chosen": None}, MissingFieldError, "missing_field"),
    ({"rejected": "  "}, MissingFieldError, "missing_field"),
    ({"prompt": 3}, MissingFieldError, "missing_field"),
    ({"rejected": " Red. "}, IdenticalAnswersError, "identical_answers"),
])
def test_bad_records_raise_with_their_quarantine_reason(change, error, reason):
    with pytest.raises(error) as raised:
        preference_pair({**RECORD, **change})
    assert raised.value.reason == reason and "p-1" in str(raised.value)
