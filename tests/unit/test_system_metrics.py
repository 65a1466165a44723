"""A stage shorter than the sampling interval still records its system metrics (``tracking.SystemMetrics``)."""

from __future__ import annotations

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from llava_platform import tracking


def short_run(tmp_path, start) -> dict[str, float]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    run = client.create_run(client.create_experiment("short", artifact_location=str(tmp_path / "artifacts")))
    start(uri, run.info.run_id).finish()  # the stage ends long before the first interval does
    return client.get_run(run.info.run_id).data.metrics


def test_a_stage_shorter_than_the_interval_still_records_system_metrics(tmp_path):
    metrics = short_run(tmp_path, lambda uri, run_id: tracking.start_system_metrics(uri, run_id, interval_s=3600))
    assert any(key.startswith("system/cpu_utilization") for key in metrics), sorted(metrics)
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_negative_control_mlflows_monitor_alone_records_nothing_for_it(tmp_path):
    def bare(uri, run_id):
        monitor = SystemMetricsMonitor(run_id, sampling_interval=3600, tracking_uri=uri)
        monitor.start()
        return monitor

    assert not any(key.startswith("system/") for key in short_run(tmp_path, bare))
