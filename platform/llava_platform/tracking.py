"""MLflow tracking: where runs go and what a training run records (the Model Registry: ``registry.py``).

Every call names its tracking URI and run id explicitly (``MlflowClient``): the driver opens the
runs, Ray Train workers log into them, and a restarted worker group keeps logging into the same
runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

DEFAULT_TRACKING_DB = "mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
MAX_BATCH = 100
"""MLflow accepts at most this many params (and 1000 metrics) per ``log_batch`` call."""


def client_for(tracking_uri: str) -> MlflowClient:
    """A client whose tracking store and model registry are both ``tracking_uri`` (never the global registry)."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def resolve_tracking_uri(configured: str | None) -> str:
    """The recipe's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    The fallback is a path, not a server, so a laptop run needs nothing started; it is absolute so
    that Ray workers (whose working directory differs) write into the same database.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / DEFAULT_TRACKING_DB}"


def local_store_path(tracking_uri: str) -> Path | None:
    """The database file of a local ``sqlite:///`` tracking store (no server); ``None`` for a server URI."""
    return Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None


def local_artifact_location(tracking_uri: str) -> str | None:
    """For a ``sqlite:///`` store, artifacts go next to the database (``<dir>/mlartifacts``), not into the
    working directory of whichever process created the experiment; servers choose their own."""
    database = local_store_path(tracking_uri)
    return (database.parent / "mlartifacts").as_uri() if database else None


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``: nested recipe sections as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]  # MLflow's limit on a param value
    return flat


def start_run(tracking_uri: str, experiment: str, run_name: str, *, parent_run_id: str | None = None,
              params: Mapping[str, str] | None = None) -> str:
    """Create a run (a child of ``parent_run_id`` if given), log ``params``; return its id. It stays open."""
    client = client_for(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=local_artifact_location(tracking_uri))
    tags = {PARENT_TAG: parent_run_id} if parent_run_id else {}
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    log_params(tracking_uri, run_id, params or {})
    return run_id


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches of at most 100 (MLflow's limit per call)."""
    client = client_for(tracking_uri)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), MAX_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_BATCH])


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark a run running again (a resumed job continues its runs instead of opening new ones)."""
    client_for(tracking_uri).update_run(run_id, status="RUNNING")


def end_run(tracking_uri: str, run_id: str, *, failed: bool = False) -> None:
    client_for(tracking_uri).set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float | None], *, step: int) -> None:
    """Log a dict of metrics at one step in one call (``None`` values are skipped)."""
    log_steps(tracking_uri, run_id, {step: metrics})


def log_steps(tracking_uri: str, run_id: str, by_step: Mapping[int, Mapping[str, float | None]]) -> None:
    """Log several steps' metrics in one call (``None`` values are skipped)."""
    import time

    now = int(time.time() * 1000)
    entries = [Metric(name, float(value), now, step) for step, metrics in sorted(by_step.items())
               for name, value in metrics.items() if value is not None]
    for start in range(0, len(entries), 1000):  # MLflow's limit per call
        client_for(tracking_uri).log_batch(run_id, metrics=entries[start:start + 1000])


def last_logged_step(tracking_uri: str, run_id: str, metric: str) -> int:
    """The highest step at which ``metric`` was logged in the run (0 when it never was)."""
    history = client_for(tracking_uri).get_metric_history(run_id, metric)
    return max((m.step for m in history), default=0)


class StepMetricSender:
    """Sends step metrics to MLflow from a background thread, holding them while the server is down.

    A training step only hands its metrics over (``send`` never blocks on the network), so a
    tracking server that restarts or stalls neither crashes nor slows training. Entries that fail
    to send stay queued, in order, and go out with the next attempt once the server answers again;
    ``close`` waits for the queue to drain and returns how many entries could not be delivered (and
    says so on stderr), so nothing is lost silently. Entries still queued when the worker process
    dies are lost with it; the steps after the last checkpoint are replayed and logged again anyway.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, retry_interval_s: float = 2.0,
                 max_queued: int = 1_000_000, skip_through_step: int = 0):
        import collections
        import threading

        self._tracking_uri, self._run_id, self._retry_interval_s = tracking_uri, run_id, retry_interval_s
        self._queue: collections.deque[Metric] = collections.deque()
        self._max_queued = max_queued
        self._skip_through_step = skip_through_step
        self._dropped = 0
        self._failures = 0
        self._closing = threading.Event()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mlflow-step-metrics", daemon=True)
        self._thread.start()

    def send(self, by_step: Mapping[int, Mapping[str, float | None]]) -> None:
        """Queue several steps' metrics (``None`` values, and steps up to ``skip_through_step``, the
        ones a resumed run replays after MLflow already has them, are skipped); returns at once."""
        import time

        now = int(time.time() * 1000)
        with self._wake:
            for step, metrics in sorted(by_step.items()):
                if step <= self._skip_through_step:
                    continue
                for name, value in metrics.items():
                    if value is not None:
                        self._queue.append(Metric(name, float(value), now, step))
            while len(self._queue) > self._max_queued:  # bounded memory: the oldest go first, counted
                self._queue.popleft()
                self._dropped += 1
            self._wake.notify()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def failed_attempts(self) -> int:
        """How many sends failed (and were retried) so far: the number of outages seen, roughly."""
        return self._failures

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait up to ``timeout_s`` for the queue to drain (at a checkpoint: the steps it covers should
        be in MLflow before a failure can strike); returns whether it did. Never raises."""
        import time

        deadline = time.monotonic() + timeout_s
        while self._queue and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        return not self._queue

    def close(self, timeout_s: float = 120.0) -> int:
        """Deliver what is queued, waiting up to ``timeout_s``; returns the number of entries lost."""
        self._closing.set()
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout_s)
        lost = self._dropped + len(self._queue)
        if lost:
            import sys

            print(f"[tracking] {lost} metric entries could not be delivered to {self._tracking_uri} "
                  f"(run {self._run_id}) after {self._failures} failed attempts", file=sys.stderr, flush=True)
        return lost

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing.is_set():
                    self._wake.wait()
                if not self._queue:
                    return
                batch = [self._queue[i] for i in range(min(1000, len(self._queue)))]  # MLflow's limit
            try:
                client_for(self._tracking_uri).log_batch(self._run_id, metrics=batch)
            except Exception:  # noqa: BLE001 - any failure to reach the server: keep the entries, retry
                import time

                self._failures += 1
                time.sleep(self._retry_interval_s)
                continue
            with self._wake:
                for _ in batch:
                    self._queue.popleft()


def log_artifact(tracking_uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file or a folder (its contents under ``artifact_path``)."""
    client = client_for(tracking_uri)
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def start_system_metrics(tracking_uri: str, run_id: str, interval_s: float = 10.0) -> SystemMetrics:
    """Sample CPU, memory, disk, network (and GPUs, if any) into the run until ``.finish()`` is called."""
    return SystemMetrics(tracking_uri, run_id, interval_s)


class SystemMetrics:
    """MLflow's ``SystemMetricsMonitor``, plus one last sample at ``finish()``.

    The monitor publishes a sample only after a whole interval and a successful ``get_run``; a stage shorter
    than the interval, or one whose check failed on a busy server, would otherwise end with no system metrics.
    """

    def __init__(self, tracking_uri: str, run_id: str, interval_s: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri,
                                            resume_logging=True)
        self.monitor.start()

    def finish(self) -> None:
        self.monitor.finish()  # stops the sampling thread and flushes what it published
        self.monitor.collect_metrics()
        self.monitor.publish_metrics(self.monitor.aggregate_metrics())
        self.monitor.mlflow_logger.flush()
