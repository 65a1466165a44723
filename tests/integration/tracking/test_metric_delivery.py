"""Step metrics reach MLflow through tracking-server outages: queued in order, delivered once, or
counted as lost (never silently dropped). A real ``mlflow server`` is stopped and started again."""

from __future__ import annotations

import time

import pytest

from llava_platform import tracking
from tests.helpers.losses import mlflow_steps, record_loss, steps_loss
from tests.helpers.servers import MlflowServer


@pytest.mark.fault("training: the MLflow server stopped mid-run, then started again")
def test_metrics_sent_while_the_tracking_server_is_down_arrive_once_it_is_back(tmp_path, monkeypatch, record_property):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our queue, not the client's retries, rides it out
    server = MlflowServer(tmp_path)
    server.start()
    run_id = tracking.start_run(server.uri, "outage", "stage2")
    sender = tracking.StepMetricSender(server.uri, run_id, retry_interval_s=0.2)
    try:
        sender.send({1: {"loss": 1.0}, 2: {"loss": 0.9}})  # 2 entries, then 18 steps x 2 while it is down
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
    client = tracking.client_for(server.uri)
    delivered = [(key, step) for key in ("loss", "lr/projector") for step in mlflow_steps(client, run_id, key)]
    sent = [*(("loss", step) for step in range(1, 21)), *(("lr/projector", step) for step in range(3, 21))]
    loss, = record_loss(record_property, steps_loss(delivered, sent, kind="metric entries"))
    server.stop()
    assert lost == 0 and not loss.count, f"{loss} (the sender counted {lost} lost)"


@pytest.mark.fault("training: the MLflow server never comes back (loss reported, not silent)")
def test_undeliverable_metrics_are_counted_as_lost(tmp_path, monkeypatch, capsys, record_property):
    """The server goes away for good: what never arrived is what the sender reports lost (the store, read
    directly once it is over, is the measure), never a silent loss."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = MlflowServer(tmp_path)
    server.start()
    run_id = tracking.start_run(server.uri, "gone", "stage2")
    server.stop()
    sender = tracking.StepMetricSender(server.uri, run_id, retry_interval_s=0.1)
    sender.send({step: {"loss": 1.0, "grad_norm": None} for step in range(1, 6)})  # None: not an entry
    reported = sender.close(timeout_s=1)
    store = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    loss, = record_loss(record_property, steps_loss(mlflow_steps(store, run_id), range(1, 6), kind="metric entries"))
    assert reported == loss.count == 5, f"reported {reported}, measured {loss}"
    assert "5 metric entries could not be delivered" in capsys.readouterr().err
