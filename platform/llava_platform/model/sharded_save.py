"""Write a checkpoint one shard at a time, from tensors made only when their shard is written.

    save_sharded(meta_model, {name: LazyTensor(shape, dtype, make, params)}, out_dir, max_shard_size=...)

``save_pretrained`` needs the whole state dict in memory: 145 GB of host memory for a 72B model in bf16.
Here the checkpoint is planned on shapes alone, with the libraries' own rules applied to meta tensors:
transformers' tie removal and weight-name reversion (what ``save_pretrained`` does before writing), then
huggingface_hub's shard split at ``max_shard_size``. Each shard's tensors are then made (``LazyTensor.make``,
inside ``gather(params)``: a ZeRO-3 all-gather, a read from another checkpoint), written with the same
safetensors metadata, and released, so the writer holds one shard (or one tensor larger than a shard) at a
time: safetensors writes straight from the tensors' memory. The files and index are byte for byte what
``save_pretrained(max_shard_size=...)`` writes for the same weights, tensor names in the llava-hf layout
(``model.layout``: what ``write_llava_hf_layout`` gives after ``save_pretrained``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_platform.model.layout import llava_hf_name

SHARD_BYTES = 4 * 2**30
"""Largest safetensors shard written (and so held in memory) at a time."""
WEIGHTS_PATTERN = "model{suffix}.safetensors"
"""``save_pretrained``'s file names: ``model.safetensors``, ``model-00001-of-00003.safetensors``."""
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of the checkpoint, made when its shard is written."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    """Returns the tensor (any device; copied to CPU); runs inside ``gather(params)``, only where it is written."""
    params: tuple[torch.nn.Parameter, ...] = ()
    """What ``gather`` must make whole first (ZeRO-3 partitions); empty: nothing."""

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


Gather = Callable[[list[torch.nn.Parameter]], AbstractContextManager]


def plan_shards(meta_model, tensors: dict[str, LazyTensor], max_shard_size: int) -> tuple[dict[str, list[str]],
                                                                                       dict[str, str], int]:
    """``save_pretrained``'s layout on shapes alone.

    Args:
        meta_model: the model class built on the meta device from the checkpoint's config: its parameter names
            are ``tensors``' names, its tied weights are the checkpoint's.

    Returns:
        ``(file -> the tensors' names in it, name -> saved name, total bytes)``.
    """
    from huggingface_hub import split_state_dict_into_shards_factory
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in tensors.items()}
    name_of = {id(t): name for name, t in meta.items()}
    kept = remove_tied_weights_from_state_dict(dict(meta), meta_model)
    saved = revert_weight_conversion(meta_model, dict(kept))
    if len(saved) != len(kept) or any(id(t) not in name_of for t in saved.values()):
        saved = kept  # a converter that merges or splits tensors: keep the model's names
    saved_as = {name_of[id(t)]: llava_hf_name(name) for name, t in saved.items()}
    split = split_state_dict_into_shards_factory(
        {saved_as[name_of[id(t)]]: t for t in saved.values()}, filename_pattern=WEIGHTS_PATTERN,
        max_shard_size=max_shard_size, get_storage_size=lambda t: t.numel() * t.element_size())
    original = {new: old for old, new in saved_as.items()}
    files = {file: [original[name] for name in names] for file, names in split.filename_to_tensors.items()}
    return files, saved_as, split.metadata["total_size"]


def save_sharded(meta_model, tensors: dict[str, LazyTensor], out_dir: str | Path, *, max_shard_size: int = SHARD_BYTES,
                 gather: Gather = lambda params: nullcontext(), write: bool = True,
                 progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``tensors`` as ``save_pretrained`` shards them (see the module docstring); returns the files written.

    Args:
        write: whether this process writes (every rank of a ZeRO-3 group calls ``save_sharded`` for the
            gathers; one writes).
        progress: called with a line after each shard of a sharded checkpoint.
    """
    out_dir = Path(out_dir)
    files, saved_as, total = plan_shards(meta_model, tensors, max_shard_size)
    from safetensors.torch import save_file

    written = []
    for index, (file, names) in enumerate(files.items(), start=1):
        with gather(unique(p for name in names for p in tensors[name].params)):
            if write:
                shard = {saved_as[name]: tensors[name].make().detach().to("cpu").contiguous() for name in names}
                save_file(shard, str(out_dir / file), metadata={"format": "pt"})
                del shard
                written.append(out_dir / file)
        if progress and len(files) > 1:
            progress(f"shard {index}/{len(files)} written")
    if write and len(files) > 1:
        index = {"metadata": {"total_parameters": meta_model.num_parameters(), "total_size": total},
                 "weight_map": {saved_as[name]: file for file, names in files.items() for name in names}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written


def unique(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Each parameter once, in first-seen order (tied weights appear under several names)."""
    seen: dict[int, torch.nn.Parameter] = {}
    for param in params:
        seen.setdefault(id(param), param)
    return list(seen.values())


def meta_copy(model):
    """The same model class and config on the meta device: names, shapes and ties, no storage."""
    import copy

    with torch.device("meta"):
        meta = type(model)(copy.deepcopy(model.config))
    meta.generation_config = copy.deepcopy(model.generation_config)
    return meta


def save_config(meta_model, dtype: torch.dtype, out_dir: str | Path) -> None:
    """The config (dtype and architecture recorded as ``save_pretrained`` records them) and generation config."""
    meta_model.config.dtype = str(dtype).split(".")[1]
    meta_model.config.architectures = [type(meta_model).__name__]
    meta_model.config.save_pretrained(out_dir)
    if meta_model.can_generate():
        meta_model.generation_config.save_pretrained(out_dir)
