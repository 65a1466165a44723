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


def pair_builder(saved_checkpoints, max_length: int = 4096, truncation: str = "drop"):
    from llava_platform.data.records import RowBuilder
    from llava_platform.model.compose import load_processor
    from tests.helpers.specs import row_spec

    return RowBuilder.from_processor(load_processor(str(saved_checkpoints["llava_next"])),
                                     row_spec(template="vicuna_v1", image_mode="anyres", max_length=max_length,
                                              truncation=truncation))


def test_a_pair_row_tiles_the_image_once_and_shares_the_prompt(saved_checkpoints):
    """The chosen row's columns, the rejected answer's tokens beside them; both sequences start alike and
    supervise only their own answers."""
    from tests.helpers.media import png, random_picture

    builder = pair_builder(saved_checkpoints)
    chosen, rejected = preference_pair({**RECORD, "rejected": "Blue, I think, but the light is poor."})
    image = png(random_picture(60, 90))
    row = builder.build_pair(chosen, rejected, image)
    alone = builder.build(chosen, image)
    assert (row["input_ids"] == alone["input_ids"]).all() and (row["tiles"] == alone["tiles"]).all()
    assert row["rejected_length"] == len(row["rejected_input_ids"]) > row["length"]
    answer = (row["labels"] != -100).argmax()  # the first supervised token: where the answers start
    assert (row["rejected_input_ids"][:answer] == row["input_ids"][:answer]).all()  # the same prompt and image
    assert (row["rejected_labels"][:answer] == -100).all() and (row["rejected_labels"][answer:] != -100).any()


@pytest.mark.parametrize("truncation", ["drop", "truncate"])
def test_a_pair_longer_than_the_limit_is_quarantined_not_cut(saved_checkpoints, truncation):
    """Also under ``truncation: truncate``: a cut answer would be compared unfairly."""
    from llava_platform.data.conversation import SequenceTooLongError
    from tests.helpers.media import png, random_picture

    builder = pair_builder(saved_checkpoints)
    image = png(random_picture(60, 90))
    length = builder.build(preference_pair(RECORD)[0], image)["length"]
    short = pair_builder(saved_checkpoints, length + 2, truncation)  # the chosen fits, a long rejected does not
    chosen, rejected = preference_pair({**RECORD, "rejected": "Blue. " * 20})
    with pytest.raises(SequenceTooLongError) as error:
        short.build_pair(chosen, rejected, image)
    assert error.value.reason == "too_long"


def test_a_micro_batch_of_pairs_is_chosen_then_rejected_on_the_same_images(saved_checkpoints):
    """``train.batches.collate_pairs``: 2B sequences, chosen first; each answer's log-probability in the batch is
    what the model gives that sequence alone (padding and the pairing change nothing)."""
    import torch

    from llava_platform.data.image_settings import ImageSettings
    from llava_platform.model.compose import load_pretrained_llava
    from llava_platform.train.batches import collate_pairs, collate_rows
    from llava_platform.train.preference import sequence_logps
    from tests.helpers.media import png, random_picture

    builder = pair_builder(saved_checkpoints)
    model, processor = load_pretrained_llava(str(saved_checkpoints["llava_next"]))
    settings = ImageSettings.from_processor(processor)
    records = [{**RECORD, "id": "a"}, {**RECORD, "id": "b", "prompt": "Which shape is it?", "rejected": "A cat."}]
    images = [png(random_picture(60, 90, 1)), png(random_picture(90, 40, 2))]
    pairs = [builder.build_pair(*preference_pair(record), image) for record, image in zip(records, images, strict=True)]
    rows = {name: [row[name] for row in pairs] for name in pairs[0]}
    batch = collate_pairs(rows, processor, settings, anyres=True, device="cpu")
    assert batch["input_ids"].shape[0] == 4 and torch.equal(batch["pixel_values"][0], batch["pixel_values"][2])
    sequences = [(row, "input_ids", "labels") for row in pairs] + [(row, "rejected_input_ids", "rejected_labels")
                                                                   for row in pairs]
    with torch.no_grad():
        together = sequence_logps(model(**batch).logits, batch["labels"])
        for i, (row, ids, labels) in enumerate(sequences):
            single = collate_rows({**{k: [v] for k, v in row.items()}, "input_ids": [row[ids]],
                                   "labels": [row[labels]]}, processor, settings, anyres=True, device="cpu")
            alone = sequence_logps(model(**single).logits, single["labels"])[0]
            torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-4)
    assert (together[:2] != together[2:]).all()  # the answers differ, so do their log-probabilities
