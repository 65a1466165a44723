"""The Ray Data pipeline on the session's Ray head node: sources, modes, quarantine, shards, S3, and records
that go bad while it reads."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoProcessor

from llava_platform.data.grouping import padding_fraction, regroup
from llava_platform.data.synthetic import write_synthetic_dataset
from pipelines.preprocess import ManifestError, finish, preprocess, read_shards, write_shards
from pipelines.sources import read_records
from tests.helpers.corpus import MAX_LENGTH, PIXEL_LIMIT, good_ids, write_bad_corpus


def run(records, checkpoint, mode, **kwargs):
    """Preprocess and consume everything; return (rows by id, report, quarantine rows)."""
    rows, quarantine = preprocess(
        records, processor_path=str(checkpoint), template="vicuna_v1", image_mode=mode, max_length=MAX_LENGTH,
        max_image_pixels=PIXEL_LIMIT, num_actors=1, **kwargs,
    )
    got = {}
    for batch in rows.iter_batches(batch_size=16, batch_format="numpy"):
        for i, row_id in enumerate(batch["id"]):
            assert row_id not in got, f"{row_id} delivered twice"
            got[row_id] = {name: batch[name][i] for name in batch}
    report = finish(quarantine)
    return got, report, __import__("ray").get(quarantine.rows.remote())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, write_synthetic_dataset(root, train=24, eval=4, seed=0)


@pytest.mark.parametrize("arch, mode", [("llava", "pad"), ("llava_next", "anyres")])
def test_local_sources_both_modes(ray_cluster, dataset, saved_checkpoints, arch, mode):
    root, files = dataset
    records = read_records([str(files["stage1"]), str(files["stage2"])])  # a JSON array and JSON lines
    got, report, bad = run(records, saved_checkpoints[arch], mode, image_root=str(root))
    expected = good_ids(files["stage1"]) | good_ids(files["stage2"])
    assert set(got) == expected and not bad
    assert (report.read, report.kept, report.quarantined) == (48, 48, {})
    row = got["qa-0"]
    tiles = row["tiles"]
    assert tiles.dtype == np.uint8 and tiles.shape[1:] == (3, 56, 56)
    assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
    image_id = AutoProcessor.from_pretrained(saved_checkpoints[arch]).tokenizer.convert_tokens_to_ids("<image>")
    height, width = row["image_size"]
    assert height > 0 and width > 0
    if mode == "anyres":
        assert tiles.shape[0] > 1
    else:
        assert tiles.shape[0] == 1 and (row["input_ids"] == image_id).sum() == 16




def test_bad_records_are_quarantined_with_reasons_and_good_ones_kept(ray_cluster, dataset, saved_checkpoints, tmp_path):
    root, files = dataset
    corpus, expected = write_bad_corpus(root, files)
    got, report, bad = run(read_records([str(corpus)]), saved_checkpoints["llava"], "pad", image_root=str(root))
    assert set(got) == good_ids(files["stage2"]) | {"text-only"}
    assert got["text-only"]["modality"] == "text" and got["text-only"]["tiles"].shape[0] == 0
    by_id = {row["id"]: row["reason"] for row in bad if row["id"]}
    assert by_id == expected
    anonymous = sorted(row["reason"] for row in bad if not row["id"])
    assert anonymous == ["malformed_json", "malformed_json"]  # the broken line and the non-object
    assert all(row["source"] == str(corpus) and row["index"] >= 0 and row["message"] for row in bad)
    assert report.read == len(got) + len(bad) == 24 + 1 + 13
    assert report.quarantined == {"missing_image": 1, "empty_image": 1, "undecodable_image": 2,
                                  "image_too_large": 1, "missing_field": 1, "wrong_role_order": 1,
                                  "image_placeholder_mismatch": 2, "too_long": 1, "unknown_role": 1,
                                  "malformed_json": 2}
    assert "quarantined" in report.table() and report.as_metrics()["data/quarantined/too_long"] == 1


def test_truncate_policy_keeps_long_samples(ray_cluster, dataset, saved_checkpoints):
    root, files = dataset
    long_record = {"id": "long", "image": json.loads(files["stage2"].read_text().splitlines()[0])["image"],
                   "conversations": [{"from": "human", "value": "<image>\nWhy?"},
                                     {"from": "gpt", "value": "because " * 2000}]}
    corpus = root / "long.jsonl"
    corpus.write_text(json.dumps(long_record) + "\n")
    got, report, _ = run(read_records([str(corpus)]), saved_checkpoints["llava"], "pad", image_root=str(root),
                         truncation="truncate")
    assert report.kept == 1 and got["long"]["truncated"] and got["long"]["length"] == MAX_LENGTH


def test_broken_json_array_is_reported_not_fatal(ray_cluster, dataset, saved_checkpoints, tmp_path):
    root, files = dataset
    broken = tmp_path / "broken.json"
    broken.write_text(files["stage1"].read_text()[:-50])
    got, report, bad = run(read_records([str(broken), str(files["stage2"])]), saved_checkpoints["llava"], "pad",
                           image_root=str(root))
    assert set(got) == good_ids(files["stage2"])
    assert [row["reason"] for row in bad] == ["malformed_json"] and "not a valid JSON array" in bad[0]["message"]


def test_parquet_source_with_inline_images(ray_cluster, dataset, saved_checkpoints, tmp_path):
    root, files = dataset
    records = [json.loads(line) for line in files["stage2"].read_text().splitlines()[:6]]
    table = pa.table({
        "id": [r["id"] for r in records] + ["inline-empty", "inline-text", records[0]["id"]],
        "image_bytes": [(root / r["image"]).read_bytes() for r in records] + [b"", None, b""],
        "conversations": [r["conversations"] for r in records] + [
            records[0]["conversations"], [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
            records[0]["conversations"]],
        "thumbnail": [b"\x00\x01"] * (len(records) + 3),  # another binary column stays out of the record
    })
    path = tmp_path / "inline.parquet"
    pq.write_table(table, path)
    got, report, bad = run(read_records([str(path)]), saved_checkpoints["llava"], "pad")
    assert set(got) == {r["id"] for r in records} | {"inline-text"}
    # a bad row that shares its id with a good one is still its own record: located by position
    assert {(row["id"], row["index"], row["reason"]) for row in bad} == {
        (records[0]["id"], 8, "empty_image"), ("inline-empty", 6, "empty_image")}
    assert (report.read, report.kept) == (9, 7)


def test_s3_sources_and_images(ray_cluster, dataset, saved_checkpoints, s3_server):
    import boto3

    root, files = dataset
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="llava-data")
    for path in [files["stage1"], files["stage2"], *sorted((root / "images").glob("train_*"))]:
        s3.upload_file(str(path), "llava-data", f"synthetic/{path.relative_to(root)}")
    s3.put_object(Bucket="llava-data", Key="synthetic/extra.jsonl", Body=json.dumps({
        "id": "s3-missing", "image": "images/nope.jpg",
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}) + "\n")
    uris = ["s3://llava-data/synthetic/stage1.json", "s3://llava-data/synthetic/stage2.jsonl",
            "s3://llava-data/synthetic/extra.jsonl"]
    got, report, bad = run(read_records(uris, s3_server), saved_checkpoints["llava"], "pad",
                           image_root="s3://llava-data/synthetic", s3_endpoint_url=s3_server)
    assert set(got) == good_ids(files["stage1"]) | good_ids(files["stage2"])
    assert [(row["id"], row["reason"]) for row in bad] == [("s3-missing", "missing_image")]
    assert report.read == 49


def test_materialised_shards_round_trip(ray_cluster, dataset, saved_checkpoints, tmp_path):
    root, files = dataset
    corpus, _ = write_bad_corpus(root, files)
    rows, quarantine = preprocess(
        read_records([str(corpus)]), processor_path=str(saved_checkpoints["llava_next"]), template="vicuna_v1",
        image_mode="anyres", max_length=MAX_LENGTH, max_image_pixels=PIXEL_LIMIT, image_root=str(root),
        num_actors=1,
    )
    manifest = write_shards(rows, quarantine, tmp_path / "out", recipe_hash="recipe-a")
    assert manifest["counts"]["kept"] == 25 and sum(manifest["counts"]["quarantined"].values()) == 13
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["shards"]
    quarantined = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantined) == 13 and {"id", "source", "index", "reason", "message"} <= set(quarantined[0])
    shards = read_shards(tmp_path / "out", recipe_hash="recipe-a")
    batch = next(iter(shards.iter_batches(batch_size=64, batch_format="numpy")))
    assert len(batch["id"]) == 25
    tiles = {row_id: t for row_id, t in zip(batch["id"], batch["tiles"], strict=True)}
    assert tiles["qa-0"].dtype == np.uint8 and tiles["qa-0"].shape[0] > 1 and tiles["text-only"].shape[0] == 0
    with pytest.raises(ManifestError, match="was preprocessed for recipe hash recipe-a"):
        read_shards(tmp_path / "out", recipe_hash="recipe-b")
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_shards(tmp_path)


def test_length_grouping_cuts_padding(ray_cluster, dataset, saved_checkpoints):
    root, files = dataset
    rows, _ = preprocess(
        read_records([str(files["stage1"]), str(files["stage2"])]), processor_path=str(saved_checkpoints["llava"]),
        template="vicuna_v1", image_mode="pad", max_length=MAX_LENGTH, image_root=str(root), num_actors=1,
    )
    windows = list(rows.select_columns(["id", "length", "modality"]).iter_batches(batch_size=48, batch_format="numpy"))
    grouped = list(regroup(windows, batch_size=4, group=True))
    plain = list(regroup(windows, batch_size=4, group=False))
    ids = [i for batch in grouped for i in batch["id"]]
    assert sorted(ids) == sorted(i for w in windows for i in w["id"])  # every row exactly once
    assert all(len(set(batch["modality"])) == 1 for batch in grouped)
    assert padding_fraction(b["length"] for b in grouped) < padding_fraction(b["length"] for b in plain) / 2


@pytest.mark.fault("data: 10% bad records of every kind + images deleted while read")
def test_bad_records_and_vanishing_images_lose_nothing(ray_cluster, saved_checkpoints, tmp_path):
    """~10% of the records bad in every way the pipeline knows; images deleted while the run reads them.

    Every record ends up exactly once: delivered to training, or quarantined with its reason.
    """
    import ray

    files = write_synthetic_dataset(tmp_path, train=120, eval=1, seed=1)
    corpus, expected_bad = write_bad_corpus(tmp_path, files)
    good = good_ids(files["stage2"]) | {"text-only"}
    records = [json.loads(line) for line in files["stage2"].read_text().splitlines()]
    vanishing = {r["id"]: tmp_path / r["image"] for r in records[-40:]}

    rows, quarantine = preprocess(
        read_records([str(corpus)]), processor_path=str(saved_checkpoints["llava"]), template="vicuna_v1",
        image_mode="pad", max_length=MAX_LENGTH, max_image_pixels=PIXEL_LIMIT, num_actors=1,
        image_root=str(tmp_path))
    paths = list(vanishing.values())
    for path in paths[:20]:  # listed, not yet read: the dataset is lazy until it is iterated
        path.unlink()
    delivered: list[str] = []
    for batch in rows.iter_batches(batch_size=4, batch_format="numpy"):
        if not delivered:  # the first batch reached training while the rest are being read
            for path in paths[20:]:
                path.unlink()
        delivered.extend(batch["id"])
    report = finish(quarantine)
    bad = ray.get(quarantine.rows.remote())

    quarantined = {row["id"]: row["reason"] for row in bad if row["id"]}
    vanished = set(quarantined) & set(vanishing)
    assert len(vanished) >= 20, "the images did not vanish before they were read: the fault was not injected"
    assert all(quarantined[rid] == "missing_image" for rid in vanished)
    assert {rid: quarantined[rid] for rid in expected_bad} == expected_bad
    assert len(delivered) == len(set(delivered)), "a record reached training twice"
    messages = {row["id"]: row["message"] for row in bad if row["id"]}
    lost = {rid: messages.get(rid, "not quarantined") for rid in good - set(delivered) - vanished}
    assert not lost and not set(delivered) & vanished, f"good records lost: {lost}"
    assert report.read == len(delivered) + len(bad) and report.kept == len(delivered)
    assert len(bad) == len(expected_bad) + 2 + len(vanished)  # plus the two malformed JSON lines
