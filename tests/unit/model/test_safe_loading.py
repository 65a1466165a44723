"""Weights load from safetensors only: a checkpoint whose weights are a code-running pickle is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.losses import found_loss, record_loss


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


@pytest.mark.fault("security: a checkpoint whose weights are a code-running pickle")
def test_a_pickle_bearing_checkpoint_is_refused(saved_checkpoints, tmp_path, record_property):
    import torch
    from safetensors.torch import load_file

    from llava_platform.model.compose import ModelCompositionError, load_pretrained_llava

    checkpoint = tmp_path / "pickled"
    shutil.copytree(saved_checkpoints["llava"], checkpoint)
    weights = load_file(str(checkpoint / "model.safetensors"))
    (checkpoint / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save({**weights, "payload": _RunsCodeWhenUnpickled(marker)}, checkpoint / "pytorch_model.bin")
    with pytest.raises(ModelCompositionError, match=r"refusing pickled weights \(pytorch_model.bin\)"):
        load_pretrained_llava(str(checkpoint))
    ran = []
    if marker.exists():
        ran.append("pickle alone")
        marker.unlink()

    shutil.copy(Path(saved_checkpoints["llava"]) / "model.safetensors", checkpoint)  # both: safetensors only
    load_pretrained_llava(str(checkpoint))
    if marker.exists():
        ran.append("pickle beside safetensors")
    loss, = record_loss(record_property, found_loss("loads that ran untrusted code", ran, checked=2))
    assert not loss.count, f"the pickle's code ran: {loss}"
