"""MLflow tracking: where runs go, what a training run records, and how an export enters the Model Registry.

Every call names its tracking URI and run id explicitly (``MlflowClient``): the driver opens the
runs, Ray Train workers log into them, and a restarted worker group keeps logging into the same
runs. Only ``register_export`` uses MLflow's process-global state (tracking and registry URI, active
run), because ``log_model`` needs it; it runs on the rank-0 worker at the very end of stage 2.

The ``mlflow.transformers`` flavour does not handle image-text-to-text models, so an export is
registered as a small ``mlflow.pyfunc`` model whose artifact is the Hugging Face folder itself:
``models:/<name>/<version>`` resolves to a directory that plain transformers loads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

DEFAULT_TRACKING_DB = "mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
EXPORT_ARTIFACT = "export"
CHECKPOINT_ARTIFACT = "checkpoint"
"""The registered pyfunc model's artifact that holds the Hugging Face folder."""
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


def local_artifact_location(tracking_uri: str) -> str | None:
    """For a ``sqlite:///`` store, artifacts go next to the database (``<dir>/mlartifacts``), not into the
    working directory of whichever process created the experiment; servers choose their own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


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


def log_artifact(tracking_uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file or a folder (its contents under ``artifact_path``)."""
    client = client_for(tracking_uri)
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def start_system_metrics(tracking_uri: str, run_id: str, interval_s: float = 10.0):
    """Sample CPU, memory, disk, network (and GPUs, if any) into the run until ``.finish()`` is called."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri,
                                   resume_logging=True)
    monitor.start()
    return monitor


class LlavaCheckpoint(mlflow.pyfunc.PythonModel):
    """A registered LLaVA export: the artifact ``checkpoint`` is the Hugging Face folder.

    ``predict`` takes rows ``{"prompt": str, "image": path or None}`` and returns the generated
    answers, so a registry version can be smoke-tested with ``mlflow.pyfunc.load_model``. Serving
    loads the folder itself (``checkpoint_path``) with transformers.
    """

    def load_context(self, context) -> None:
        from llava_platform.model.compose import load_pretrained_llava

        self.checkpoint_path = context.artifacts[CHECKPOINT_ARTIFACT]
        self.model, self.processor = load_pretrained_llava(self.checkpoint_path)
        self.model.eval()

    def predict(self, context, model_input, params=None) -> list[str]:
        from PIL import Image

        from llava_platform.inference import answer_questions

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        items = [(Image.open(row["image"]).convert("RGB") if row.get("image") else None, row["prompt"]) for row in rows]
        return answer_questions(self.model, self.processor, items,
                                max_new_tokens=int((params or {}).get("max_new_tokens", 32)))


def register_export(tracking_uri: str, run_id: str, export_dir: str | Path, model_name: str) -> str:
    """Log ``export_dir`` as the run's pyfunc model and register it; return the new registry version.

    The folder is uploaded once, inside the logged model (``<run>/export``); ``models:/<name>/<version>``
    then resolves to it.
    """
    requirements = [f"{package}=={version(package)}" for package in ("torch", "transformers", "pillow")]
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=EXPORT_ARTIFACT, python_model=LlavaCheckpoint(), artifacts={CHECKPOINT_ARTIFACT: str(export_dir)},
            registered_model_name=model_name, pip_requirements=requirements,
        )
    return str(info.registered_model_version)


def registered_version(tracking_uri: str, run_id: str) -> tuple[str, str] | None:
    """(registered model name, version) that ``register_export`` created from ``run_id``; the newest if several."""
    versions = client_for(tracking_uri).search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    return newest.name, str(newest.version)
