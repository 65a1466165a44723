"""The Ray Data pipeline on the session's Ray head node: sources, modes, quarantine, shards, S3, and records
that go bad while it reads."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from transformers import AutoProcessor

from llava_platform.data.grouping import padding_fraction, regroup
from llava_platform.data.synthetic import write_synthetic_dataset
from pipelines.preprocess import finish, preprocess
from pipelines.quarantine import PreprocessReport
from pipelines.shards import ManifestError, read_shards, write_shards
from pipelines.sources import count_records, read_records
from tests.helpers.corpus import MAX_LENGTH, PIXEL_LIMIT, good_ids, write_bad_corpus
from tests.helpers.losses import quarantine_loss, record_loss, records_loss
from tests.helpers.specs import row_spec


@dataclass(frozen=True)
class Run:
    """One preprocessing run, consumed to the end: rows by id (in arrival order), the report, the quarantine."""

    rows: dict[str, dict]
    report: PreprocessReport
    bad: list[dict]

    def bad_from(self, source: Path | str) -> list[dict]:
        return [row for row in self.bad if row["source"] == str(source)]


def run(records, checkpoint, mode, **kwargs) -> Run:
    """Preprocess and consume everything, checking that no row arrives twice."""
    spec = row_spec(template="vicuna_v1", image_mode=mode, max_length=MAX_LENGTH, max_image_pixels=PIXEL_LIMIT,
                   **kwargs)
    rows, quarantine = preprocess(records, processor_path=str(checkpoint), spec=spec, num_actors=1)
    got = {}
    for batch in rows.iter_batches(batch_size=16, batch_format="numpy"):
        for i, row_id in enumerate(batch["id"]):
            assert row_id not in got, f"{row_id} delivered twice"
            got[row_id] = {name: batch[name][i] for name in batch}
    report = finish(quarantine)
    return Run(got, report, ray.get(quarantine.rows.remote()))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, write_synthetic_dataset(root, train=24, eval=4, seed=0)


def assert_image_row(row, checkpoint, mode):
    """A training row of one image question: uint8 tiles, aligned labels, the right image tokens."""
    tiles = row["tiles"]
    assert tiles.dtype == np.uint8 and tiles.shape[1:] == (3, 56, 56)
    assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
    height, width = row["image_size"]
    assert height > 0 and width > 0
    if mode == "anyres":
        assert tiles.shape[0] > 1
    else:
        image_id = AutoProcessor.from_pretrained(checkpoint).tokenizer.convert_tokens_to_ids("<image>")
        assert tiles.shape[0] == 1 and (row["input_ids"] == image_id).sum() == 16


# One pad-mode run over a JSON array and a JSON-lines file: rows, then length grouping on them

@pytest.fixture(scope="module")
def local_pad(ray_cluster, dataset, saved_checkpoints) -> Run:
    root, files = dataset
    records = read_records([str(files["stage1"]), str(files["stage2"])])  # a JSON array and JSON lines
    return run(records, saved_checkpoints["llava"], "pad", image_root=str(root))


def test_local_sources_in_pad_mode(local_pad, dataset, saved_checkpoints):
    _, files = dataset
    assert set(local_pad.rows) == good_ids(files["stage1"]) | good_ids(files["stage2"]) and not local_pad.bad
    report = local_pad.report
    assert (report.read, report.kept, report.quarantined) == (48, 48, {})
    assert_image_row(local_pad.rows["qa-0"], saved_checkpoints["llava"], "pad")


def test_length_grouping_cuts_padding(local_pad):
    ordered = list(local_pad.rows.values())  # arrival order, as training reads its windows
    windows = [{name: np.array([row[name] for row in ordered[i:i + 48]]) for name in ("id", "length", "modality")}
               for i in range(0, len(ordered), 48)]
    grouped = list(regroup(windows, batch_size=4, group=True))
    plain = list(regroup(windows, batch_size=4, group=False))
    ids = [i for batch in grouped for i in batch["id"]]
    assert sorted(ids) == sorted(i for w in windows for i in w["id"])  # every row exactly once
    assert all(len(set(batch["modality"])) == 1 for batch in grouped)
    assert padding_fraction(b["length"] for b in grouped) < padding_fraction(b["length"] for b in plain) / 2


# One run over three sources that go wrong in different ways: bad records in JSON lines, a broken
# JSON array, Parquet rows with inline images (bad ones among them)

@dataclass(frozen=True)
class MixedSources:
    run: Run
    corpus: Path
    expected_bad: dict[str, str]
    broken: Path
    parquet: Path
    parquet_records: list[dict]


@pytest.fixture(scope="module")
def mixed_sources(ray_cluster, dataset, saved_checkpoints, tmp_path_factory) -> MixedSources:
    root, files = dataset
    scratch = tmp_path_factory.mktemp("mixed")
    corpus, expected_bad = write_bad_corpus(root, files)
    broken = scratch / "broken.json"
    broken.write_text(files["stage1"].read_text()[:-50])
    records = [{**r, "id": f"pq-{r['id']}"} for r in map(json.loads, files["stage2"].read_text().splitlines()[:6])]
    table = pa.table({
        "id": [r["id"] for r in records] + ["inline-empty", "inline-text", records[0]["id"]],
        "image_bytes": [(root / r["image"]).read_bytes() for r in records] + [b"", None, b""],
        "conversations": [r["conversations"] for r in records] + [
            records[0]["conversations"], [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
            records[0]["conversations"]],
        "thumbnail": [b"\x00\x01"] * (len(records) + 3),  # another binary column stays out of the record
    })
    parquet = scratch / "inline.parquet"
    pq.write_table(table, parquet)
    result = run(read_records([str(corpus), str(broken), str(parquet)]), saved_checkpoints["llava"], "pad",
                 image_root=str(root))
    return MixedSources(result, corpus, expected_bad, broken, parquet, records)


def test_bad_records_are_quarantined_with_reasons_and_good_ones_kept(mixed_sources, dataset):
    files = dataset[1]
    rows, bad = mixed_sources.run.rows, mixed_sources.run.bad_from(mixed_sources.corpus)
    assert set(rows) - {r["id"] for r in mixed_sources.parquet_records} - {"inline-text"} == \
        good_ids(files["stage2"]) | {"text-only"}
    assert rows["text-only"]["modality"] == "text" and rows["text-only"]["tiles"].shape[0] == 0
    by_id = {row["id"]: row["reason"] for row in bad if row["id"]}
    assert by_id == mixed_sources.expected_bad
    anonymous = sorted(row["reason"] for row in bad if not row["id"])
    assert anonymous == ["malformed_json", "malformed_json"]  # the broken line and the non-object
    assert all(row["index"] >= 0 and row["message"] for row in bad)
    report = mixed_sources.run.report  # all three sources: 25 + 13 from the corpus, 1 array, 9 Parquet rows
    assert report.read == len(rows) + len(mixed_sources.run.bad) == (24 + 1 + 13) + 1 + 9
    assert report.quarantined == {"missing_image": 1, "empty_image": 1 + 2, "undecodable_image": 2,
                                  "image_too_large": 1, "missing_field": 1, "wrong_role_order": 1,
                                  "image_placeholder_mismatch": 2, "too_long": 1, "unknown_role": 1,
                                  "malformed_json": 2 + 1}
    assert "quarantined" in report.table() and report.as_metrics()["data/quarantined/too_long"] == 1


def test_the_progress_total_counts_what_preprocessing_reads(mixed_sources):
    """``count_records`` (the total of ``jobs.preprocess``'s progress line): Parquet rows from the footer,
    JSON records split as the reader splits them (a broken array is one record)."""
    files = [str(mixed_sources.corpus), str(mixed_sources.broken), str(mixed_sources.parquet)]
    assert count_records(files) == mixed_sources.run.report.read
    assert count_records([str(mixed_sources.parquet)]) == len(mixed_sources.parquet_records) + 3


def test_broken_json_array_is_reported_not_fatal(mixed_sources):
    bad = mixed_sources.run.bad_from(mixed_sources.broken)
    assert [row["reason"] for row in bad] == ["malformed_json"] and "not a valid JSON array" in bad[0]["message"]
    assert not any(row_id.startswith("cap-") for row_id in mixed_sources.run.rows), "rows of a broken array"


def test_parquet_source_with_inline_images(mixed_sources):
    records = mixed_sources.parquet_records
    assert {r["id"] for r in records} | {"inline-text"} <= set(mixed_sources.run.rows)
    # a bad row that shares its id with a good one is still its own record: located by position
    assert {(row["id"], row["index"], row["reason"]) for row in mixed_sources.run.bad_from(mixed_sources.parquet)} \
        == {(records[0]["id"], 8, "empty_image"), ("inline-empty", 6, "empty_image")}


# S3: sources and images from moto, with the truncate policy (a too-long record is cut, not dropped)

def test_s3_sources_and_images_with_the_truncate_policy(ray_cluster, dataset, saved_checkpoints, s3_server):
    import boto3

    root, files = dataset
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="llava-data")
    for path in [files["stage1"], files["stage2"], *sorted((root / "images").glob("train_*"))]:
        s3.upload_file(str(path), "llava-data", f"synthetic/{path.relative_to(root)}")
    long_record = {"id": "long", "image": json.loads(files["stage2"].read_text().splitlines()[0])["image"],
                   "conversations": [{"from": "human", "value": "<image>\nWhy?"},
                                     {"from": "gpt", "value": "because " * 2000}]}
    missing = {"id": "s3-missing", "image": "images/nope.jpg",
               "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    s3.put_object(Bucket="llava-data", Key="synthetic/extra.jsonl",
                  Body="".join(json.dumps(r) + "\n" for r in (missing, long_record)))
    uris = ["s3://llava-data/synthetic/stage1.json", "s3://llava-data/synthetic/stage2.jsonl",
            "s3://llava-data/synthetic/extra.jsonl"]
    result = run(read_records(uris, s3_server), saved_checkpoints["llava"], "pad",
                 image_root="s3://llava-data/synthetic", s3_endpoint_url=s3_server, truncation="truncate")
    assert set(result.rows) == good_ids(files["stage1"]) | good_ids(files["stage2"]) | {"long"}
    assert [(row["id"], row["reason"]) for row in result.bad] == [("s3-missing", "missing_image")]
    assert result.report.read == 50
    long_row = result.rows["long"]
    assert long_row["truncated"] and long_row["length"] == MAX_LENGTH
    assert not any(row["truncated"] for row_id, row in result.rows.items() if row_id != "long")


# Anyres rows of good and bad records, materialised as Parquet shards and read back

@pytest.mark.chaos  # 18 s; make test reads anyres, several-image and video shards back in test_onevision_pipeline.py
def test_anyres_rows_materialise_as_shards_and_round_trip(ray_cluster, dataset, saved_checkpoints, tmp_path):
    root, files = dataset
    corpus, _ = write_bad_corpus(root, files)
    checkpoint = saved_checkpoints["llava_next"]
    spec = row_spec(template="vicuna_v1", image_mode="anyres", max_length=MAX_LENGTH, max_image_pixels=PIXEL_LIMIT,
                   image_root=str(root))
    rows, quarantine = preprocess(read_records([str(files["stage1"]), str(corpus)]), processor_path=str(checkpoint),
                                  spec=spec, num_actors=1)
    manifest = write_shards(rows, quarantine, tmp_path / "out", recipe_hash="recipe-a")
    assert manifest["counts"]["kept"] == 24 + 25 and sum(manifest["counts"]["quarantined"].values()) == 13
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["shards"]
    quarantined = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantined) == 13 and {"id", "source", "index", "reason", "message"} <= set(quarantined[0])
    shards = read_shards(tmp_path / "out", recipe_hash="recipe-a")
    batch = next(iter(shards.iter_batches(batch_size=128, batch_format="numpy")))
    assert set(batch["id"]) == good_ids(files["stage1"]) | good_ids(files["stage2"]) | {"text-only"}
    by_id = {row_id: {name: batch[name][i] for name in batch} for i, row_id in enumerate(batch["id"])}
    assert_image_row(by_id["qa-0"], checkpoint, "anyres")
    assert_image_row(by_id["cap-0"], checkpoint, "anyres")
    assert by_id["text-only"]["tiles"].shape[0] == 0
    with pytest.raises(ManifestError, match="was preprocessed for recipe hash recipe-a"):
        read_shards(tmp_path / "out", recipe_hash="recipe-b")
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_shards(tmp_path)


@pytest.mark.fault("data: 10% bad records of every kind + images deleted while read")
def test_bad_records_and_vanishing_images_lose_nothing(ray_cluster, saved_checkpoints, tmp_path, record_property):
    """~10% of the records bad in every way the pipeline knows; images deleted while the run reads them.

    Every record ends up exactly once: delivered to training, or quarantined with its reason.
    """
    files = write_synthetic_dataset(tmp_path, train=120, eval=1, seed=1)
    corpus, expected_bad = write_bad_corpus(tmp_path, files)
    good = good_ids(files["stage2"]) | {"text-only"}
    records = [json.loads(line) for line in files["stage2"].read_text().splitlines()]
    vanishing = {r["id"]: tmp_path / r["image"] for r in records[-40:]}

    spec = row_spec(template="vicuna_v1", image_mode="pad", max_length=MAX_LENGTH, max_image_pixels=PIXEL_LIMIT,
                   image_root=str(tmp_path))
    rows, quarantine = preprocess(read_records([str(corpus)]), processor_path=str(saved_checkpoints["llava"]),
                                  spec=spec, num_actors=1)
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
    # every record once, delivered or quarantined; every bad one and every unread vanished one with its reason
    should_quarantine = {**expected_bad, **{rid: "missing_image" for rid in set(vanishing) - set(delivered)}}
    written = delivered + [row["id"] for row in bad if row["id"]]
    records, entries = record_loss(record_property, records_loss(good | set(expected_bad), written),
                                   quarantine_loss(should_quarantine, quarantined))
    assert not records.count and not entries.count, f"{records}; {entries}"
    assert report.read == len(delivered) + len(bad) and report.kept == len(delivered)
    assert len(bad) == len(expected_bad) + 2 + len(vanished)  # plus the two malformed JSON lines
