"""The MLflow Model Registry side of a LLaVA export: register it, find its version.

The ``mlflow.transformers`` flavour does not handle image-text-to-text models, so an export is
registered as a small ``mlflow.pyfunc`` model whose artifact is the Hugging Face folder itself:
``models:/<name>/<version>`` resolves to a directory that plain transformers loads
(``model/sources.py``). Only ``register_export`` uses MLflow's process-global state (tracking and
registry URI, active run), because ``log_model`` needs it; it runs on the rank-0 worker at the very
end of stage 2.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow
import pydantic

from llava_platform.model.sources import CHECKPOINT_ARTIFACT
from llava_platform.tracking import client_for

EXPORT_ARTIFACT = "export"
"""The logged model's name inside its run (``<run>/export``)."""


class Question(pydantic.BaseModel):
    """One row of a registered model's input: the question and, optionally, an image file's path."""

    prompt: str
    image: str | None = None


class LlavaCheckpoint(mlflow.pyfunc.PythonModel):
    """A registered LLaVA export: the artifact ``checkpoint`` is the Hugging Face folder.

    ``predict`` takes rows ``{"prompt": str, "image": path or None}`` and returns the generated
    answers, so a registry version can be smoke-tested with ``mlflow.pyfunc.load_model``. Serving
    loads the folder itself (``checkpoint_path``) with transformers.
    """

    def load_context(self, context) -> None:
        from llava_platform.generation.transformers import TransformersEngine

        self.checkpoint_path = context.artifacts[CHECKPOINT_ARTIFACT]
        self.engine = TransformersEngine.open(self.checkpoint_path, model_name="registry", device="cpu",
                                              dtype="float32", vllm=None, adapters={})

    def predict(self, context, model_input: list[Question], params: dict[str, int] | None = None) -> list[str]:
        """Greedy answers, one per question (the type hints are MLflow's input and output signature)."""
        from PIL import Image

        from llava_platform.generation.engine import answer_questions

        items = [(Image.open(q.image).convert("RGB") if q.image else None, q.prompt) for q in model_input]
        return answer_questions(self.engine, items, max_new_tokens=int((params or {}).get("max_new_tokens", 32)))


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
