"""What the training tests read back from a run: weights, MLflow losses, and the export-vs-engine check."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from jobs.train_worker import EXPORT_CHECK_FILE


def weights(path: Path) -> dict[str, torch.Tensor]:
    """A saved checkpoint's state dict, loaded by plain transformers."""
    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


def losses(client, run_id: str) -> dict[int, float]:
    """The ``loss`` metric of an MLflow run, by step."""
    return {m.step: m.value for m in client.get_metric_history(run_id, "loss")}


def assert_export_reproduces_engine(stage_dir: Path) -> None:
    """The exported folder, loaded by plain transformers, gives the trained engine's logits on its probe batch."""
    check = torch.load(stage_dir / EXPORT_CHECK_FILE)
    model = AutoModelForImageTextToText.from_pretrained(stage_dir / "export").eval()
    with torch.no_grad():
        logits = model(**check["batch"]).logits[:, -16:]
    torch.testing.assert_close(logits, check["logits"], atol=1e-5, rtol=1e-4)
