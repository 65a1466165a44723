"""Negative controls of the reliability table's ``lost`` column: for every kind of loss, a loss planted on
purpose in a helper-only path, which the same measure the fault tests use must read as non-zero (and,
beside it, the same artefact without the plant must read zero). The table prints them as its own section."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from jobs.faults import ROW_LEDGER_DIR, RowLedger
from tests.helpers.losses import (
    KINDS,
    chat_outcome,
    files_loss,
    found_loss,
    mlflow_steps,
    quarantine_loss,
    record_loss,
    records_loss,
    requests_loss,
    resumes_loss,
    rows_loss,
    steps_loss,
)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A real MLflow store (sqlite) and one run in it."""
    from llava_platform import tracking

    uri = f"sqlite:///{tmp_path_factory.mktemp('controls') / 'mlflow.db'}"
    return uri, tracking.start_run(uri, "controls", "planted")


@pytest.mark.loss_control("optimizer steps: step 3 logged twice, step 5 never (a real MLflow store)")
def test_a_repeated_and_a_missing_step_are_read(mlflow_store, record_property):
    from llava_platform import tracking

    uri, run_id = mlflow_store
    client = tracking.client_for(uri)
    for step in (1, 2, 3, 3, 4, 6, 7, 8):
        client.log_metric(run_id, "loss", 1.0 / step, step=step)
    loss, = record_loss(record_property, steps_loss(mlflow_steps(client, run_id), range(1, 9)))
    assert (loss.count, loss.total) == (2, 8) and "missing ['5']" in loss.detail and "twice 1" in loss.detail


@pytest.mark.loss_control("metric entries: one of two metrics' entries dropped on the way")
def test_a_dropped_metric_entry_is_read(mlflow_store, record_property):
    from llava_platform import tracking

    uri, run_id = mlflow_store
    client = tracking.client_for(uri)
    for step in range(1, 5):
        client.log_metric(run_id, "grad_norm", 1.0, step=step)
        if step != 2:
            client.log_metric(run_id, "lr/projector", 1e-3, step=step)
    delivered = [(key, s) for key in ("grad_norm", "lr/projector") for s in mlflow_steps(client, run_id, key)]
    sent = [(key, s) for key in ("grad_norm", "lr/projector") for s in range(1, 5)]
    loss, = record_loss(record_property, steps_loss(delivered, sent, kind="metric entries"))
    assert loss.count == 1 and steps_loss(sent, sent, kind="metric entries").count == 0


def write_ledger(folder, attempts: list[tuple[int, dict[int, list[list[str]]]]]) -> None:
    """Attempts written through the real ``RowLedger`` (one process: its own ranks' rows given as they are)."""
    for from_step, steps in attempts:
        ledger = RowLedger(str(folder), from_step, rank=0, world_size=2)
        for step, ranks in steps.items():
            ledger._write({"step": step, "epoch": 0, "rows": ranks})
        ledger.file.close()


@pytest.mark.loss_control("training rows: after a restart, a row trained twice and one never trained")
def test_rows_trained_twice_or_never_are_read(tmp_path, record_property):
    rows = [f"r{i}" for i in range(8)]
    first = {1: [["r0"], ["r1"]], 2: [["r2"], ["r3"]], 3: [["r4"], ["r5"]]}  # step 3 is rolled back below
    write_ledger(tmp_path / "clean", [(0, first), (2, {3: [["r4"], ["r5"]], 4: [["r6"], ["r7"]]})])
    assert rows_loss(tmp_path / "clean", rows, global_batch=2, steps=4).count == 0  # the restart replayed step 3
    write_ledger(tmp_path / "planted", [(0, first), (2, {3: [["r4"], ["r0"]], 4: [["r6"], ["r7"]]})])
    loss, = record_loss(record_property, rows_loss(tmp_path / "planted", rows, global_batch=2, steps=4))
    assert loss.count == 2 and "r5@0" in loss.detail and "r0@0" in loss.detail


def test_the_ledger_records_every_step_of_a_one_process_run(tmp_path):
    ledger = RowLedger(str(tmp_path / ROW_LEDGER_DIR), 0, rank=0, world_size=1)
    for step in (1, 2):
        ledger.record(step, 0, [f"r{2 * step}", f"r{2 * step + 1}"])
    assert rows_loss(tmp_path / ROW_LEDGER_DIR, [f"r{i}" for i in range(2, 6)], global_batch=2, steps=2).count == 0


@pytest.mark.loss_control("checkpoint resumes: a restart from the step-4 checkpoint that was half-written")
def test_a_resume_from_a_half_written_checkpoint_is_read(record_property):
    loss, = record_loss(record_property, resumes_loss([2, 4], half_written=[4], restarts=2))
    assert loss.count == 1 and resumes_loss([2, 2], half_written=[4], restarts=2).count == 0


class _ScriptedChat(http.server.BaseHTTPRequestHandler):
    """Chat completions by the path's last word: ``ok`` answers right, ``error`` 500s, ``hang`` never
    answers in time, ``wrong`` answers something else."""

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        behaviour = self.path.split("/")[1]
        if behaviour == "hang":
            time.sleep(3)
        if behaviour == "error":
            self.send_response(500)
            self.end_headers()
            return
        body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "Red." if behaviour == "ok" else "Blue."}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.loss_control("requests: a 500, a hang and a wrong answer among 4 (a scripted server)")
def test_a_failed_a_hung_and_a_wrong_request_are_read(record_property):
    import openai

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        outcomes = []
        for behaviour in ("ok", "error", "hang", "wrong"):
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/{behaviour}/v1", api_key="k",
                                   max_retries=0, timeout=1)

            def ask(client=client):
                return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "?"}]
                                                      ).choices[0].message.content
            outcomes.append(chat_outcome(ask, "Red."))
    finally:
        server.shutdown()
    loss, = record_loss(record_property, requests_loss(outcomes, "ok"))
    assert outcomes == ["ok", "5xx", "hang", "wrong"] and loss.count == 3


@pytest.mark.loss_control("records: one written twice, one never written")
def test_a_duplicated_and_a_missing_record_are_read(record_property):
    expected = [f"{i}-detail" for i in range(6)]
    loss, = record_loss(record_property, records_loss(expected, expected[:5] + [expected[0]]))
    assert loss.count == 2 and records_loss(expected, expected).count == 0


@pytest.mark.loss_control("quarantine entries: one bad record without its entry, one with the wrong reason")
def test_a_missing_and_a_misreasoned_quarantine_entry_are_read(record_property):
    expected = {"a": "missing_image", "b": "malformed_record", "c": "too_long"}
    loss, = record_loss(record_property, quarantine_loss(expected, {"a": "missing_image", "b": "too_long"}))
    assert loss.count == 2 and quarantine_loss(expected, expected).count == 0


@pytest.mark.loss_control("files: one checkpoint file truncated, one missing from storage")
def test_a_truncated_and_a_missing_file_are_read(tmp_path, record_property):
    source, stored = tmp_path / "local", tmp_path / "bucket"
    for folder in (source, stored):
        folder.mkdir()
    for name in ("a.pt", "b.pt", "c.pt"):
        (source / name).write_bytes(b"x" * 1000)
    (stored / "a.pt").write_bytes(b"x" * 1000)
    (stored / "b.pt").write_bytes(b"x" * 500)  # an upload cut short
    sizes = [{p.name: p.stat().st_size for p in folder.iterdir()} for folder in (source, stored)]
    loss, = record_loss(record_property, files_loss(*sizes))
    assert loss.count == 2 and files_loss(sizes[0], sizes[0]).count == 0


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).write_text, (self.marker, "ran"))


@pytest.mark.loss_control("loads that ran untrusted code: a pickle opened with weights_only=False")
def test_a_pickle_that_ran_is_read(tmp_path, record_property):
    import torch

    marker = tmp_path / "marker"
    torch.save({"payload": _Payload(marker)}, tmp_path / "weights.bin")
    torch.load(tmp_path / "weights.bin", weights_only=False)  # what the safe loader never does
    ran = ["weights.bin"] if marker.exists() else []
    loss, = record_loss(record_property, found_loss("loads that ran untrusted code", ran, checked=1))
    assert loss.count == 1


@pytest.mark.loss_control("places leaking a secret: a secret logged as an MLflow param")
def test_a_secret_in_a_param_is_read(mlflow_store, record_property):
    from llava_platform import tracking

    uri, run_id = mlflow_store
    tracking.log_params(uri, run_id, {"endpoint_key": "s3cr3t-planted"})
    params = tracking.client_for(uri).get_run(run_id).data.params
    leaked = [key for key, value in params.items() if "s3cr3t-planted" in value]
    loss, = record_loss(record_property, found_loss("places leaking a secret", leaked, checked=len(params)))
    assert loss.count == 1


@pytest.mark.loss_control("engine starts not refused: an engine that starts where it should have refused")
def test_an_engine_that_started_is_read(record_property):
    starts = {"refuses": lambda: (_ for _ in ()).throw(RuntimeError("model m: its head size is 16")),
              "starts anyway": lambda: "an engine"}
    started = []
    for name, start in starts.items():
        try:
            start()
            started.append(name)
        except RuntimeError:
            pass
    loss, = record_loss(record_property, found_loss("engine starts not refused", started, checked=len(starts)))
    assert loss.count == 1


def test_every_kind_of_loss_has_a_negative_control():
    import sys

    planted = {marker.args[0].split(":")[0] for name, test in vars(sys.modules[__name__]).items()
               if name.startswith("test_") for marker in getattr(test, "pytestmark", [])
               if marker.name == "loss_control"}
    assert planted == set(KINDS)
