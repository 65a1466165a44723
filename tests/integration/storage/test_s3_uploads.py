"""Checkpoint uploads to S3 (moto behind a throttling proxy) retry until every file arrives whole."""

from __future__ import annotations

import json
import os

import pytest

from llava_platform.testing.flaky_s3 import FlakyS3Proxy
from tests.helpers.losses import files_loss, record_loss


@pytest.mark.fault("storage: S3 throttles checkpoint uploads (503 SlowDown on the first writes)")
def test_a_throttled_checkpoint_upload_is_retried_to_completion(s3_server, tmp_path, record_property):
    import boto3
    import pyarrow.fs as pafs

    from llava_platform.storage import filesystem_for

    checkpoint = tmp_path / "stage1-step00000004"  # the layout Ray Train uploads: one folder per checkpoint
    for rank in range(2):
        (checkpoint / "deepspeed").mkdir(parents=True, exist_ok=True)
        (checkpoint / "deepspeed" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(os.urandom(300_000))
    (checkpoint / "position.json").write_text(json.dumps({"step": 4}))
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="throttled")
    proxy = FlakyS3Proxy(s3_server, failures=4)
    try:
        filesystem, root = filesystem_for("s3://throttled/runs", proxy.url)
        pafs.copy_files(str(checkpoint), f"{root}/{checkpoint.name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=filesystem)  # what ray.train.report does with the checkpoint
    finally:
        proxy.close()
    assert proxy.injected == 4 and proxy.forwarded_writes >= 3, "the throttling was not injected"
    objects = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").list_objects_v2(
        Bucket="throttled", Prefix="runs/")["Contents"]
    uploaded = {o["Key"].removeprefix(f"runs/{checkpoint.name}/"): o["Size"] for o in objects
                if not o["Key"].endswith("/")}  # pyarrow's directory markers
    expected = {str(p.relative_to(checkpoint)): p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()}
    loss, = record_loss(record_property, files_loss(expected, uploaded))
    assert not loss.count, f"a checkpoint file is missing or incomplete after the retries: {loss}"
