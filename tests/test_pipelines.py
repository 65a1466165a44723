"""The Ray Data pipeline on a local Ray instance: sources, modes, quarantine, streaming, shards, S3."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers import AutoProcessor

from llava_platform.data.grouping import padding_fraction, regroup
from llava_platform.data.synthetic import write_synthetic_dataset
from pipelines.preprocess import ManifestError, finish, preprocess, read_shards, write_shards
from pipelines.sources import read_records

MAX_LENGTH = 1024
PIXEL_LIMIT = 300_000  # synthetic images pad to at most 532 x 532 = 283,024 pixels; huge.png has 800 x 500 = 400,000


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


def good_ids(path: Path) -> set[str]:
    text = path.read_text()
    records = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    return {r["id"] for r in records}


@pytest.mark.parametrize("arch, mode", [("llava", "pad"), ("llava_next", "anyres")])
def test_local_sources_both_modes(ray_local, dataset, saved_checkpoints, arch, mode):
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


def test_bad_records_are_quarantined_with_reasons_and_good_ones_kept(ray_local, dataset, saved_checkpoints, tmp_path):
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


def test_truncate_policy_keeps_long_samples(ray_local, dataset, saved_checkpoints):
    root, files = dataset
    long_record = {"id": "long", "image": json.loads(files["stage2"].read_text().splitlines()[0])["image"],
                   "conversations": [{"from": "human", "value": "<image>\nWhy?"},
                                     {"from": "gpt", "value": "because " * 2000}]}
    corpus = root / "long.jsonl"
    corpus.write_text(json.dumps(long_record) + "\n")
    got, report, _ = run(read_records([str(corpus)]), saved_checkpoints["llava"], "pad", image_root=str(root),
                         truncation="truncate")
    assert report.kept == 1 and got["long"]["truncated"] and got["long"]["length"] == MAX_LENGTH


def test_broken_json_array_is_reported_not_fatal(ray_local, dataset, saved_checkpoints, tmp_path):
    root, files = dataset
    broken = tmp_path / "broken.json"
    broken.write_text(files["stage1"].read_text()[:-50])
    got, report, bad = run(read_records([str(broken), str(files["stage2"])]), saved_checkpoints["llava"], "pad",
                           image_root=str(root))
    assert set(got) == good_ids(files["stage2"])
    assert [row["reason"] for row in bad] == ["malformed_json"] and "not a valid JSON array" in bad[0]["message"]


def test_parquet_source_with_inline_images(ray_local, dataset, saved_checkpoints, tmp_path):
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


def test_s3_sources_and_images(ray_local, dataset, saved_checkpoints, s3_server):
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


def test_materialised_shards_round_trip(ray_local, dataset, saved_checkpoints, tmp_path):
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


def test_rows_stream_into_ray_train_workers(ray_local, dataset, saved_checkpoints, tmp_path):
    """Two TorchTrainer workers each read their shard of the stream and collate it to model inputs."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    root, files = dataset
    rows, quarantine = preprocess(  # fractional CPUs: the two training workers hold the rest of the 2 cores
        read_records([str(files["stage2"])], cpus_per_task=0.25), processor_path=str(saved_checkpoints["llava"]),
        template="vicuna_v1", image_mode="pad", max_length=MAX_LENGTH, image_root=str(root), num_actors=1,
        cpus_per_actor=0.25,
    )
    out = tmp_path / "seen"
    out.mkdir()

    def loop(config):
        import ray.train

        from llava_platform.data.collate import collate

        seen = []
        for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=4, batch_format="numpy"):
            inputs = collate(batch["input_ids"], batch["labels"], list(batch["tiles"]),
                             [tuple(s) for s in batch["image_size"]], pad_token_id=0, anyres=False,
                             image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
            assert inputs["pixel_values"].shape[1:] == (3, 56, 56) and inputs["pixel_values"].dtype.is_floating_point
            seen += [str(i) for i in batch["id"]]
        rank = ray.train.get_context().get_world_rank()
        (Path(config["out"]) / f"rank{rank}.json").write_text(json.dumps(seen))

    TorchTrainer(
        loop, train_loop_config={"out": str(out)}, datasets={"train": rows},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path / "train"), name="stream"),
    ).fit()
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(per_rank), "both workers must receive rows"
    delivered = per_rank[0] + per_rank[1]
    assert len(delivered) == len(set(delivered)) and set(delivered) == good_ids(files["stage2"])
    assert finish(quarantine).kept == 24


def test_length_grouping_cuts_padding(ray_local, dataset, saved_checkpoints):
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
