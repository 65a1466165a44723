"""Step metrics reach MLflow through tracking-server outages: queued in order, delivered once, or
counted as lost (never silently dropped). A real ``mlflow server`` is stopped and started again."""

from __future__ import annotations

import time

import pytest

from llava_platform import tracking
from tests.helpers.servers import MlflowServer, free_port


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
