"""The end-to-end job the integration tests share: its recipe, and what it left behind."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from jobs.pipeline import RESULT_FILE

SECRET = "s3cr3t-f0r-the-leak-check"
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN")
"""Set to ``SECRET`` in the job's environment: none may appear in MLflow or in the job's output."""


@dataclass(frozen=True)
class PipelineRecipe:
    """The end-to-end job's recipe, data and starting checkpoint."""

    root: Path
    overrides: tuple[str, ...]
    """The recipe overrides the job runs with (``tiny_cpu_demo`` + these)."""
    initial: Path
    """This process's ``jobs.compose`` of the same recipe: the job composes the same weights (seeded)."""

    @property
    def output(self) -> Path:
        return self.root / "out"

    @property
    def data(self) -> Path:
        return self.root / "data"


@dataclass(frozen=True)
class PipelineRun:
    """The end-to-end job, finished: its output (the ``ray job submit`` log) and ``result.json``."""

    job: PipelineRecipe
    port: int
    """Ray Serve's HTTP port, where the job served its endpoint."""
    log: str

    @cached_property
    def result(self) -> dict:
        return json.loads((self.job.output / RESULT_FILE).read_text())

    @property
    def runs(self) -> dict[str, str]:
        """MLflow run ids: ``parent``, ``stage1``, ``stage2``."""
        return self.result["runs"]

    @property
    def train(self) -> Path:
        return self.job.output / "train"

    def checkpoint(self, stage: str, step: int) -> Path:
        return self.train / "checkpoints" / f"tiny-cpu-demo-{stage}" / f"{stage}-step{step:08d}"
