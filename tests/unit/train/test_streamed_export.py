"""The export streams one shard at a time (``train.checkpoint.export_model``, ``model.sharded_save``) and writes,
byte for byte, what today's in-memory route writes: ``save_pretrained`` over the whole state dict (peft's
``merge_and_unload`` first with LoRA), then the llava-hf renaming; across several shards. (Under ZeRO-3 the same
code gathers each shard from two ranks: ``tests/integration/train/test_train_job.py``.)"""

from __future__ import annotations

import copy
import filecmp

import pytest
import torch

from llava_platform.model.checkpoint_index import tensor_index
from llava_platform.model.compose import save_processor
from llava_platform.model.layout import write_llava_hf_layout
from llava_platform.model.sharded_save import plan_shards
from llava_platform.model.trainability import apply_lora
from llava_platform.train.checkpoint import ADAPTER_BASE_DIR, ADAPTER_DIR, EXPORT_DIR, export_model, plain_tensors
from llava_platform.train.plan import LoraSpec
from tests.helpers.models import compose, compose_onevision

LORA = LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))


def model_of(towers, arch: str):
    torch.manual_seed(0)
    return compose_onevision(towers) if arch == "llava_onevision" else compose(towers, arch)


def shard_size(model) -> int:
    """A quarter of the model: four shards or more."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) // 4


def in_memory(model, processor, folder, max_shard_size: int):
    """Today's route: the whole state dict, ``save_pretrained``, the llava-hf names."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    write_llava_hf_layout(folder)
    save_processor(processor, folder)
    return folder


def assert_same_files(expected, written):
    files = sorted(path.name for path in expected.iterdir())
    assert files == sorted(path.name for path in written.iterdir())
    assert sum(name.startswith("model-") for name in files) >= 3, f"not sharded: {files}"
    for name in files:
        assert filecmp.cmp(expected / name, written / name, shallow=False), f"{name} differs"


@pytest.mark.parametrize("arch", ["llava", "llava_next", "llava_onevision"])
def test_the_streamed_export_is_save_pretrained_byte_for_byte(towers, tmp_path, arch):
    model, processor = model_of(towers, arch)
    size = shard_size(model)
    expected = in_memory(model, processor, tmp_path / "expected", size)
    written = export_model(model, processor, tmp_path, lora=None, zero_stage=2, write=True, max_shard_size=size)
    assert written == tmp_path / EXPORT_DIR
    assert_same_files(expected, written)


def test_each_shard_is_made_only_when_it_is_written(towers, tmp_path):
    """What the writer holds: one shard's tensors at a time (the tensors are made inside their shard's turn)."""
    model, _ = model_of(towers, "llava")
    size = shard_size(model)
    files, _, total = plan_shards(model, plain_tensors(model), size)
    assert len(files) >= 4 and total == sum(t.numel() * t.element_size() for t in
                                            {id(p): p for p in model.parameters()}.values())
    largest = max(sum(plain_tensors(model)[n].nbytes for n in names) for names in files.values())
    assert largest <= size


def test_the_lora_export_is_peft_merge_and_unload_byte_for_byte(towers, tmp_path):
    model, processor = model_of(towers, "llava")
    adapted = apply_lora(model, r=LORA.r, alpha=LORA.alpha, dropout=LORA.dropout, target_modules=LORA.target_modules)
    with torch.no_grad():  # trained adapters: lora_B starts at zero, which would make the merge vacuous
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    size = shard_size(model)
    expected = tmp_path / "expected"
    adapted.save_pretrained(expected / ADAPTER_DIR)
    in_memory(copy.deepcopy(adapted).merge_and_unload(), processor, expected / EXPORT_DIR, size)
    in_memory(copy.deepcopy(adapted).unload(), processor, expected / ADAPTER_BASE_DIR, size)
    export_model(adapted, processor, tmp_path / "written", lora=LORA, zero_stage=2, write=True, max_shard_size=size)
    for folder in (EXPORT_DIR, ADAPTER_BASE_DIR):
        assert_same_files(expected / folder, tmp_path / "written" / folder)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert filecmp.cmp(expected / ADAPTER_DIR / name, tmp_path / "written" / ADAPTER_DIR / name, shallow=False)
    merged, base = (tensor_index(tmp_path / "written" / folder) for folder in (EXPORT_DIR, ADAPTER_BASE_DIR))
    q_proj = [name for name in merged if name.startswith("language_model.") and name.endswith("q_proj.weight")]
    assert q_proj and all(not torch.equal(merged[n].read(), base[n].read()) for n in q_proj), "nothing was merged"
