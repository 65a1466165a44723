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
    """The exported folder, loaded by plain transformers, gives the trained engine's logits on its probe batch,
    and names its tensors as llava-hf checkpoints do (what vLLM loads)."""
    assert_llava_hf_layout(stage_dir / "export")
    check = torch.load(stage_dir / EXPORT_CHECK_FILE)
    model = AutoModelForImageTextToText.from_pretrained(stage_dir / "export").eval()
    with torch.no_grad():
        logits = model(**check["batch"]).logits[:, -16:]
    torch.testing.assert_close(logits, check["logits"], atol=1e-5, rtol=1e-4)


LLAVA_HF_PREFIXES = ("vision_tower.vision_model.", "language_model.model.", "language_model.lm_head.",
                     "multi_modal_projector.", "image_newline")
"""Every tensor of a llava-hf checkpoint (``llava-hf/llava-1.5-7b-hf``, ``llava-v1.6-mistral-7b-hf``) starts so."""


def assert_llava_hf_layout(folder: Path) -> None:
    """Every tensor of the checkpoint in ``folder`` is named as in llava-hf checkpoints on the hub."""
    from llava_platform.model.checkpoint_index import tensor_index

    names = list(tensor_index(folder))
    assert names and any(n.startswith("vision_tower.vision_model.") for n in names), names[:5]
    assert [n for n in names if not n.startswith(LLAVA_HF_PREFIXES)] == []
