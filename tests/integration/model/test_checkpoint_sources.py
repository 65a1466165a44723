"""Checkpoint sources the server and the evaluation load from: a folder, ``s3://`` (moto) and MLflow's
``models:/`` (a sqlite store), with one download per node under a file lock."""

import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from filelock import FileLock

from llava_platform.model.sources import CheckpointSourceError, resolve_checkpoint


def test_checkpoint_sources(saved_checkpoints, tmp_path, s3_server):
    local = saved_checkpoints["llava"]
    assert resolve_checkpoint(str(local), tmp_path) == local
    with pytest.raises(CheckpointSourceError, match="no config.json"):
        resolve_checkpoint(str(tmp_path), tmp_path / "cache")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="models")
    for file in local.iterdir():
        s3.upload_file(str(file), "models", f"tiny/{file.name}")
    folder = resolve_checkpoint("s3://models/tiny", tmp_path / "cache", s3_endpoint_url=s3_server)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in local.iterdir())
    assert (folder / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()

    # a second replica on the node waits while the first holds the download, then reuses the folder
    with ThreadPoolExecutor(1) as pool:
        with FileLock(f"{folder}.lock"):
            waiting = pool.submit(resolve_checkpoint, "s3://models/tiny", tmp_path / "cache",
                                  s3_endpoint_url=s3_server)
            time.sleep(0.5)
            assert not waiting.done(), "resolve_checkpoint did not wait for the download lock"
        assert waiting.result(timeout=30) == folder


def test_registered_model_resolves_to_the_checkpoint_folder(saved_checkpoints, tmp_path):
    from llava_platform import registry, tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "serve-test", "export")
    version = registry.register_export(uri, run_id, saved_checkpoints["llava"], "tiny-llava")
    tracking.client_for(uri).set_registered_model_alias("tiny-llava", "champion", version)
    for source in (f"models:/tiny-llava/{version}", "models:/tiny-llava@champion"):
        folder = resolve_checkpoint(source, tmp_path / "cache", tracking_uri=uri)
        assert (folder / "config.json").read_bytes() == (saved_checkpoints["llava"] / "config.json").read_bytes()
    with pytest.raises(CheckpointSourceError, match="cannot download"):
        resolve_checkpoint("models:/no-such-model/1", tmp_path / "cache", tracking_uri=uri)
