"""A stage's data as a LLaVA-NeXT data YAML (``jobs.preprocess`` over ``pipelines.sources.plan_sources``): every
strategy takes the rows ``train.py`` would (``random:N`` the same ones for the same seed), local and on moto's
S3; the manifest counts each source; a changed strategy invalidates the shards, naming it."""

from __future__ import annotations

import json

import boto3
import pyarrow.parquet as pq
import pytest

from jobs import preprocess
from llava_platform.config import load_recipe
from llava_platform.data.mixture import MixtureError
from llava_platform.data.synthetic import write_synthetic_dataset
from pipelines.shards import ManifestError, StageShards
from pipelines.sources import RowCounts, plan_sources

BUCKET = "llava-mixture"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Four sources of the synthetic data under distinct ids: a JSON array, JSON lines, one more of each."""
    root = tmp_path_factory.mktemp("mixture")
    files = write_synthetic_dataset(root, train=24, eval=1, seed=0)
    questions = [json.loads(line) for line in files["stage2"].read_text().splitlines()]
    captions = json.loads(files["stage1"].read_text())
    written = {}
    for name, records in (("captions.json", captions), ("questions.jsonl", questions),
                          ("more_questions.jsonl", questions), ("more_captions.json", captions)):
        renamed = [{**record, "id": f"{name.split('.')[0]}-{i}"} for i, record in enumerate(records)]
        text = json.dumps(renamed) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in renamed)
        (root / name).write_text(text)
        written[name] = [record["id"] for record in renamed]
    return root, written


def mixture(folder: str, first: str = "first:25%") -> str:
    return (f"datasets:\n  - json_path: {folder}/captions.json\n"
            f"  - json_path: {folder}/questions.jsonl\n    sampling_strategy: {first}\n"
            f"  - json_path: {folder}/more_questions.jsonl\n    sampling_strategy: end:5\n"
            f"  - json_path: {folder}/more_captions.json\n    sampling_strategy: random:7\n")


def run(yaml_path, image_root, model, output, seed=42, **extra):
    recipe = load_recipe("tiny_cpu_demo", [f"stage2.data.train_files=[{yaml_path}]",
                                           f"stage2.data.image_root={image_root}", f"seed={seed}",
                                           *[f"{k}={v}" for k, v in extra.items()]])
    result = preprocess.run(recipe, stage="stage2", model=str(model), output=output, overwrite=True)
    ids = set(pq.read_table(output / "shards", columns=["id"])["id"].to_pylist())
    return recipe, result, json.loads((output / "manifest.json").read_text()), ids


def test_every_strategy_takes_train_pys_rows_and_the_manifest_counts_each_source(ray_cluster, sources,
                                                                                   saved_checkpoints, tmp_path):
    root, ids = sources
    (root / "mix.yaml").write_text(mixture(str(root)))
    recipe, result, manifest, kept = run(root / "mix.yaml", root, saved_checkpoints["llava"], tmp_path / "a")
    random_ids = kept & set(ids["more_captions.json"])
    assert kept == set(ids["captions.json"]) | set(ids["questions.jsonl"][:6]) | \
        set(ids["more_questions.jsonl"][-5:]) | random_ids  # all, first ceil(25% of 24), end 5, random 7
    assert len(random_ids) == 7
    by_source = {entry["source"].split("/")[-1]: entry for entry in manifest["sources"]}
    assert [(by_source[n]["read"], by_source[n]["taken"], by_source[n]["kept"]) for n in ids] == \
        [(24, 24, 24), (24, 6, 6), (24, 5, 5), (24, 7, 7)]
    assert by_source["questions.jsonl"]["strategy"] == "first:25%" and by_source["captions.json"]["tokens"] > 0
    assert by_source["questions.jsonl"]["origin"] == f"{root / 'mix.yaml'}:3"
    assert sum(e["tiles"] for e in manifest["sources"]) == manifest["lengths"]["rows"] == len(kept) == 42
    assert result.report.read == 42

    # another seed draws other random rows (the same seed the same ones: the S3 test's second run)
    other = plan_sources([str(root / "mix.yaml")], seed=7)[-1].selection.positions
    assert {ids["more_captions.json"][i] for i in other} != random_ids

    # one strategy changed: the shards no longer match, and the error says which
    (root / "mix.yaml").write_text(mixture(str(root), first="first:50%"))
    with pytest.raises(ManifestError, match=r"questions.jsonl: first:25% -> first:50%"):
        StageShards.of(recipe.stage2.data, str(saved_checkpoints["llava"]), tmp_path / "a", seed=42).files()


def test_a_mixture_on_s3_takes_the_same_rows_as_on_disk_run_after_run(ray_cluster, s3_server, sources,
                                                                    saved_checkpoints, tmp_path):
    root, _ = sources
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    for path in [*root.glob("*.json*"), *(root / "images").iterdir()]:
        s3.upload_file(str(path), BUCKET, str(path.relative_to(root)))
    s3.put_object(Bucket=BUCKET, Key="mix.yaml", Body=mixture(f"s3://{BUCKET}").encode())
    (root / "local.yaml").write_text(mixture(str(root)))
    endpoint = {"stage2.data.s3_endpoint_url": s3_server}
    _, _, manifest, remote = run(f"s3://{BUCKET}/mix.yaml", f"s3://{BUCKET}", saved_checkpoints["llava"],
                                 tmp_path / "s3", **endpoint)
    _, _, _, local = run(root / "local.yaml", root, saved_checkpoints["llava"], tmp_path / "local")
    assert remote == local and len(remote) == 42
    assert [e["source"] for e in manifest["sources"]][0] == f"s3://{BUCKET}/captions.json"


def test_a_missing_source_names_its_yaml_line(ray_cluster, sources, saved_checkpoints, tmp_path):
    root, _ = sources
    (root / "missing.yaml").write_text(f"datasets:\n  - json_path: {root}/captions.json\n"
                                       f"  - json_path: {root}/nowhere.jsonl\n")
    with pytest.raises(MixtureError, match=rf"missing.yaml:3 \({root}/nowhere.jsonl\): the source does not exist"):
        run(root / "missing.yaml", root, saved_checkpoints["llava"], tmp_path / "m")


def test_counts_are_kept_per_version_of_a_file(ray_cluster, tmp_path, monkeypatch):
    """A JSON array is parsed once to count it: the next plan takes the kept count (here planted: 5 for a file of
    3), and a rewritten file is counted again."""
    monkeypatch.setenv("LLAVA_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "array.json"
    source.write_text(json.dumps([{"id": str(i)} for i in range(3)]))
    assert plan_sources([str(source)], seed=0)[0].rows == 3
    cache = RowCounts.load()
    (key,) = cache.counts
    cache.counts[key] = 5
    cache.save()
    assert plan_sources([str(source)], seed=0)[0].rows == 5  # not counted again
    source.write_text(json.dumps([{"id": str(i)} for i in range(4)]))
    assert plan_sources([str(source)], seed=0)[0].rows == 4
    assert len(RowCounts.load().counts) == 1  # the old version's count is gone


def test_streamed_training_reads_the_same_rows(ray_cluster, sources, tmp_path):
    """A streamed stage (no preprocessing) splits the records the strategies take among its ranks."""
    from jobs import train

    root, ids = sources
    (root / "streamed.yaml").write_text(mixture(str(root)))
    recipe = load_recipe("tiny_cpu_demo", [f"stage2.data.train_files=[{root / 'streamed.yaml'}]", "seed=42",
                                           "stage2.data.preprocessed=null"])
    parts = train.rank_record_parts(recipe, recipe.stage2)
    records = [json.loads(row["record"])["id"] for part in parts for row in part.take_all()]
    taken = set(ids["captions.json"]) | set(ids["questions.jsonl"][:6]) | set(ids["more_questions.jsonl"][-5:])
    assert len(parts) == recipe.scaling.num_workers and len(records) == len(set(records)) == 42
    assert taken <= set(records) and len(set(records) & set(ids["more_captions.json"])) == 7
