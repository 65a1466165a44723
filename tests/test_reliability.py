"""Faults injected for real: the tracking server goes away mid-run, S3 throttles uploads, records go
bad and images vanish, a node is lost, a checkpoint carries a pickle. Each test is one row of the
reliability table that pytest prints (``make chaos`` runs every fault test, the slow ones too)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import MlflowServer, free_port
from llava_platform import tracking


@pytest.mark.fault("training: the MLflow server stopped mid-run, then started again")
def test_metrics_sent_while_the_tracking_server_is_down_arrive_once_it_is_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our queue, not the client's retries, rides it out
    server = MlflowServer(tmp_path)
    server.start()
    run_id = tracking.start_run(server.uri, "outage", "stage2")
    sender = tracking.StepMetricSender(server.uri, run_id, retry_interval_s=0.2)
    try:
        sender.send({1: {"loss": 1.0}, 2: {"loss": 0.9}})
        assert sender.flush(timeout_s=30)
        server.stop()  # the outage: training keeps handing over its steps, none of them can arrive
        for step in range(3, 21):
            sender.send({step: {"loss": 1.0 / step, "lr/projector": 1e-3}})
        assert sender.queued == 36, "steps were dropped or sent to a stopped server"
        deadline = time.monotonic() + 60
        while sender.failed_attempts < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sender.failed_attempts >= 1 and sender.queued == 36, "the outage was not seen"
        assert not sender.flush(timeout_s=0.5)
        server.start()
    finally:
        lost = sender.close(timeout_s=60)
    assert lost == 0
    history = tracking.client_for(server.uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 21)), "a step is missing or was logged twice"
    server.stop()


@pytest.mark.fault("training: the MLflow server never comes back (loss reported, not silent)")
def test_undeliverable_metrics_are_counted_as_lost(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    sender = tracking.StepMetricSender(dead, "0" * 32, retry_interval_s=0.1)
    sender.send({step: {"loss": 1.0, "grad_norm": None} for step in range(1, 6)})
    assert sender.close(timeout_s=1) == 5
    assert "5 metric entries could not be delivered" in capsys.readouterr().err


@pytest.mark.fault("data: 10% bad records of every kind + images deleted while read")
def test_bad_records_and_vanishing_images_lose_nothing(ray_local, saved_checkpoints, tmp_path):
    """~10% of the records bad in every way the pipeline knows; images deleted while the run reads them.

    Every record ends up exactly once: delivered to training, or quarantined with its reason.
    """
    import ray
    from test_pipelines import MAX_LENGTH, PIXEL_LIMIT, good_ids, write_bad_corpus

    from llava_platform.data.synthetic import write_synthetic_dataset
    from pipelines.preprocess import finish, preprocess
    from pipelines.sources import read_records

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


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


@pytest.mark.fault("security: a checkpoint whose weights are a code-running pickle")
def test_a_pickle_bearing_checkpoint_is_refused(saved_checkpoints, tmp_path):
    import torch
    from safetensors.torch import load_file

    from llava_platform.model.compose import ModelCompositionError, load_pretrained_llava

    checkpoint = tmp_path / "pickled"
    shutil.copytree(saved_checkpoints["llava"], checkpoint)
    weights = load_file(str(checkpoint / "model.safetensors"))
    (checkpoint / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save({**weights, "payload": _RunsCodeWhenUnpickled(marker)}, checkpoint / "pytorch_model.bin")
    with pytest.raises(ModelCompositionError, match=r"refusing pickled weights \(pytorch_model.bin\)"):
        load_pretrained_llava(str(checkpoint))
    assert not marker.exists(), "the pickle was opened"

    shutil.copy(Path(saved_checkpoints["llava"]) / "model.safetensors", checkpoint)  # both: safetensors only
    load_pretrained_llava(str(checkpoint))
    assert not marker.exists(), "the pickle was opened next to a safetensors file"


def lose_a_node(work_dir: Path, *options: str) -> dict:
    """Run ``tests/node_loss.py`` and check what every node-loss scenario promises; return its result."""
    completed = subprocess.run([sys.executable, str(Path(__file__).parent / "node_loss.py"), str(work_dir), *options],
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["removed"], "no node was removed: the fault was not injected"
    # one restart, from a checkpoint taken before the fault (step 2 or 4: Ray Train registers a checkpoint
    # once every rank's upload is done, and the step-4 one may not be when the node goes)
    assert len(result["resumed_at_step"]) == 1 and result["resumed_at_step"][0] in (2.0, 4.0), result
    assert result["loss_steps"] == list(range(1, 9)), f"not one continuous history: {result['loss_steps']}"
    assert result["optimizer_steps"] == 8
    return result


@pytest.mark.chaos
@pytest.mark.fault("training: the node hosting the training workers removed mid-run (3-node Cluster)")
def test_losing_a_node_restarts_training_on_the_rest_with_one_continuous_history(tmp_path, record_property):
    result = lose_a_node(tmp_path)
    assert result["alive_nodes"] == 2
    record_property("lost", 0)


@pytest.mark.chaos
@pytest.mark.fault("training: a node lost under STRICT_SPREAD; the run waits for its replacement")
def test_with_one_worker_per_node_training_waits_for_a_replacement_node(tmp_path, record_property):
    result = lose_a_node(tmp_path, "--wait-for-replacement")
    assert result["alive_nodes"] == 3 and "replacement_added_at" in result["removed"], result
    assert result["resumed_at"][0] > result["removed"]["replacement_added_at"], \
        "training resumed before the replacement node joined: it did not wait"
    record_property("lost", 0)


class FlakyS3Proxy:
    """A loopback HTTP proxy in front of the S3 server that answers the first ``failures`` writes with
    503 SlowDown (what S3 sends when it throttles), then forwards everything."""

    def __init__(self, upstream: str, failures: int):
        import http.server
        import threading

        self.upstream, self.failures, self.injected, self.forwarded_writes = upstream, failures, 0, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue", as the AWS SDK asks before a body

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return body

            def _forward(self):
                body = self._read_body()
                if self.command in ("PUT", "POST") and proxy.injected < proxy.failures:
                    proxy.injected += 1
                    error = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                proxy.forwarded_writes += self.command in ("PUT", "POST")
                dropped = ("host", "content-length", "transfer-encoding", "expect", "connection")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                request = urllib.request.Request(proxy.upstream + self.path, data=body or None, method=self.command,
                                                 headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, reply, reply_headers = response.status, response.read(), response.headers
                except urllib.error.HTTPError as error:
                    status, reply, reply_headers = error.code, error.read(), error.headers
                self.send_response(status)
                for key, value in reply_headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


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
    assert uploaded == expected, "a checkpoint file is missing or incomplete after the retries"
    record_property("lost", len(set(expected) - set(uploaded)))
