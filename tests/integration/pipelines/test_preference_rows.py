"""Preference records (LLaVA-NeXT's DPO format) through the Ray Data pipeline (``preprocess(..., pairs=True)``):
good pairs become rows with both answers on one tiling; bad ones are quarantined with their reason."""

from __future__ import annotations

import json

import ray

from llava_platform.data.synthetic import write_synthetic_dataset
from pipelines.preprocess import PREFERENCE_ROW_SCHEMA, finish, preprocess
from pipelines.sources import read_records
from tests.helpers.specs import row_spec


def test_pairs_are_rows_and_bad_pairs_are_quarantined(ray_cluster, saved_checkpoints, tmp_path):
    files = write_synthetic_dataset(tmp_path, train=6, eval=1, seed=0)
    questions = [json.loads(line) for line in files["stage2"].read_text().splitlines()]
    good = [{"id": f"pair-{i}", "image": q["image"], "prompt": q["conversations"][0]["value"],
             "chosen": q["conversations"][1]["value"], "rejected": "I cannot tell."} for i, q in enumerate(questions)]
    bad = [{**good[0], "id": "same", "rejected": good[0]["chosen"]},  # identical answers
           {**good[0], "id": "no-rejected", "rejected": None},  # a missing field
           {**good[0], "id": "long", "rejected": "Blue. " * 400},  # over model_max_length
           {**good[0], "id": "gone", "image": "images/none.png"}]  # a missing image
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    spec = row_spec(template="vicuna_v1", image_mode="pad", max_length=512, image_root=str(tmp_path))
    rows, quarantine = preprocess(read_records([str(data)]), processor_path=str(saved_checkpoints["llava"]), spec=spec,
                                  num_actors=1, pairs=True)
    kept = [ray.get(ref) for ref in rows.to_arrow_refs()]
    report = finish(quarantine)
    got = {row["id"]: row for part in kept for row in part.to_pylist()}
    assert set(got) == {r["id"] for r in good} and kept[0].schema == PREFERENCE_ROW_SCHEMA
    for row in got.values():  # one tiling, the prompt shared, each answer supervised
        answer = row["labels"].index(next(t for t in row["labels"] if t != -100))
        assert row["rejected_input_ids"][:answer] == row["input_ids"][:answer] and row["num_tiles"] == 1
        assert row["rejected_length"] == len(row["rejected_input_ids"]) and row["modality"] == "image"
    reasons = {entry["id"]: entry["reason"] for entry in ray.get(quarantine.rows.remote())}
    assert reasons == {"same": "identical_answers", "no-rejected": "missing_field", "long": "too_long",
                       "gone": "missing_image"}
    assert report.read == len(good) + len(bad) and report.kept == len(good)


def test_the_reference_pass_adds_each_answers_log_probability(ray_cluster, saved_checkpoints, tmp_path):
    """``pipelines.reference``: computed once over the rows, the same numbers as the reference model gives each
    pair directly (``collate_pairs`` + ``sequence_logps`` in this process)."""
    import torch

    from llava_platform.data.image_settings import ImageSettings
    from llava_platform.model.compose import load_pretrained_llava
    from llava_platform.train.batches import collate_pairs
    from llava_platform.train.preference import sequence_logps
    from pipelines.reference import REFERENCE_COLUMNS, ReferencePass

    files = write_synthetic_dataset(tmp_path, train=3, eval=1, seed=1)
    questions = [json.loads(line) for line in files["stage2"].read_text().splitlines()]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "image": q["image"], "prompt": q["conversations"][0]["value"],
                                        "chosen": q["conversations"][1]["value"], "rejected": "No idea."}) + "\n"
                            for i, q in enumerate(questions)))
    checkpoint = str(saved_checkpoints["llava"])
    spec = row_spec(template="vicuna_v1", image_mode="pad", max_length=512, image_root=str(tmp_path))
    rows, _ = preprocess(read_records([str(data)]), processor_path=checkpoint, spec=spec, num_actors=1, pairs=True)
    scored = ReferencePass(model=checkpoint, anyres=False, average=False, dtype="float32", replicas=1,
                           cpus_per_replica=1, gpus_per_replica=0, pairs_per_call=2).run(rows).take_all()
    assert len(scored) == 3 and all(set(REFERENCE_COLUMNS) <= set(row) for row in scored)
    model, processor = load_pretrained_llava(checkpoint)
    settings = ImageSettings.from_processor(processor)
    for row in scored:
        batch = collate_pairs({name: [row[name]] for name in row}, processor, settings, anyres=False, device="cpu")
        with torch.no_grad():
            chosen, rejected = sequence_logps(model(**batch).logits, batch["labels"]).tolist()
        assert abs(row["reference_chosen_logp"] - chosen) < 1e-3
        assert abs(row["reference_rejected_logp"] - rejected) < 1e-3
        assert chosen != rejected
