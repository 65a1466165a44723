"""Raw LLaVA-format records for the pipeline tests: good synthetic ones, and one bad record per
quarantine reason the pipeline knows."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

MAX_LENGTH = 1024
PIXEL_LIMIT = 300_000  # synthetic images pad to at most 532 x 532 = 283,024 pixels; huge.png has 800 x 500 = 400,000


def good_ids(path: Path) -> set[str]:
    text = path.read_text()
    records = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    return {r["id"] for r in records}


def write_bad_corpus(root: Path, files: dict) -> tuple[Path, dict[str, str]]:
    """Good synthetic records plus one bad record per reason; returns (file, expected reason by id)."""
    images = root / "images"
    (images / "empty.png").write_bytes(b"")
    (images / "garbage.jpg").write_bytes(b"this is not an image at all")
    jpeg = io.BytesIO()
    Image.effect_noise((200, 200), 40).convert("RGB").save(jpeg, format="JPEG")
    (images / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 3])
    Image.new("RGB", (800, 500), "red").save(images / "huge.png")

    def record(rid, image="images/train_00000.jpg", turns=None):
        turns = turns or [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]
        return json.dumps({"id": rid, "image": image, "conversations": turns})

    expected = {
        "bad-missing": "missing_image",
        "bad-empty": "empty_image",
        "bad-garbage": "undecodable_image",
        "bad-truncated": "undecodable_image",
        "bad-huge": "image_too_large",
        "bad-no-conversations": "missing_field",
        "bad-order": "wrong_role_order",
        "bad-no-placeholder": "image_placeholder_mismatch",
        "bad-two-placeholders": "image_placeholder_mismatch",
        "bad-too-long": "too_long",
        "bad-unknown-role": "unknown_role",
    }
    first_image = json.loads(files["stage2"].read_text().splitlines()[0])["image"]
    lines = files["stage2"].read_text().splitlines()
    bad_lines = [
        record("bad-missing", "images/does_not_exist.jpg"),
        record("bad-empty", "images/empty.png"),
        record("bad-garbage", "images/garbage.jpg"),
        record("bad-truncated", "images/truncated.jpg"),
        record("bad-huge", "images/huge.png"),
        json.dumps({"id": "bad-no-conversations", "image": first_image}),
        record("bad-order", first_image, [{"from": "gpt", "value": "x"}, {"from": "human", "value": "<image>"}]),
        record("bad-no-placeholder", first_image, [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]),
        record("bad-two-placeholders", first_image,
               [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]),
        record("bad-too-long", first_image,
               [{"from": "human", "value": "<image>\nWhy?"}, {"from": "gpt", "value": "because " * 2000}]),
        record("bad-unknown-role", first_image,
               [{"from": "robot", "value": "<image>\nWhy?"}, {"from": "gpt", "value": "x"}]),
        "{this line is not json",
        "[1, 2, 3]",
    ]
    text_only = json.dumps({"id": "text-only", "conversations": [
        {"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."}]})
    mixed = lines[:10] + bad_lines[:7] + lines[10:] + bad_lines[7:] + [text_only]
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(mixed) + "\n")
    return corpus, expected


EVAL_BAD_RECORDS = {
    "malformed_json": "{not json",
    "bad_eval_record": json.dumps({"id": "no-gold", "conversations": [{"from": "human", "value": "<image>\nHi?"}]}),
    "missing_image": json.dumps({"id": "gone", "image": "images/nope.png", "answer": "Red.",
                                 "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}]}),
}
"""Evaluation records the evaluation must quarantine, by reason (plus one of an unknown ``type``)."""


def write_eval_with_bad_rows(eval_file: Path) -> Path:
    """``eval_file``'s records followed by ``EVAL_BAD_RECORDS`` and a record of ``type: essay``, next to it."""
    good = [json.loads(line) for line in eval_file.read_text().splitlines()]
    odd_type = {**good[0], "id": "odd-type", "type": "essay"}
    mixed = eval_file.with_name("eval_with_bad_rows.jsonl")
    mixed.write_text(eval_file.read_text() + "\n".join([*EVAL_BAD_RECORDS.values(), json.dumps(odd_type)]) + "\n")
    return mixed
