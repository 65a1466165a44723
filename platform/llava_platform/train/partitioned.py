"""ZeRO-3 loading that never puts the whole model on one rank: each rank reads only its own slices.

    model, keep_alive = load_partitioned(path, deepspeed_config, dtype=torch.bfloat16)

transformers builds the model under ``deepspeed.zero.Init`` when a ``HfDeepSpeedConfig`` is alive
(every weight is created, initialised and partitioned one module at a time), but its
``from_pretrained`` then reads the whole checkpoint into rank 0's CPU memory and broadcasts it
module by module (transformers 5.23, ``_load_pretrained_model``): 145 GB on rank 0 for a 72B model
in bf16. Here the model is built the same way from its config, and then each rank fills its own
partition of every parameter straight from the safetensors files: a safetensors file is an 8-byte
header length, a JSON header (dtype, shape and byte range per tensor) and the raw data, so the
slice ``[rank x n, (rank + 1) x n)`` of a flattened tensor is one ``seek`` + ``readinto``. No rank
reads more than its partition (plus the small parameters ZeRO-3 keeps whole on every rank), and
no collective is needed. Checkpoint keys are matched to the model's parameter names with
transformers' own renaming rules (``conversion_mapping``: llava-hf checkpoints store
``language_model.model.layers...``, the model names it ``model.language_model.layers...``); a
checkpoint that needs more than renaming (tensors merged or split while loading) goes through
``from_pretrained`` instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from llava_platform.model.checkpoint_index import TensorLocation, locate_parameters, tensor_index


class PartitionedLoadError(ValueError):
    """A checkpoint whose tensors do not match the model built from its config."""


def fill_partitions(model: torch.nn.Module, source: dict[str, Any], *, strict: bool = True) -> list[str]:
    """Copy this rank's slice of each named tensor of ``source`` into ``model``'s ZeRO-3 partitions.

    Args:
        source: name -> ``TensorLocation`` (read from disk) or an in-memory tensor (e.g. a projector file).
        strict: every parameter of the model must be in ``source`` (a whole checkpoint); otherwise only
            the parameters ``source`` names are filled (a projector).

    Returns:
        The names filled.

    Raises:
        PartitionedLoadError: a missing parameter (``strict``) or a shape that differs.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    aliases: dict[int, list[str]] = {}
    parameters: dict[int, torch.nn.Parameter] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):  # tied weights: any of their names
        aliases.setdefault(id(parameter), []).append(name)
        parameters[id(parameter)] = parameter
    known = {name for names in aliases.values() for name in names}
    unknown = sorted(set(source) - known)
    if unknown and not strict:
        raise PartitionedLoadError(f"tensors the model lacks: {', '.join(unknown[:5])}")
    filled = []
    for key, parameter in parameters.items():
        name = next((n for n in aliases[key] if n in source), None)
        if name is None:
            if strict:
                raise PartitionedLoadError(f"{aliases[key][0]} is not in the checkpoint")
            continue
        tensor = source[name]
        shape = tuple(getattr(parameter, "ds_shape", parameter.shape))
        if tuple(tensor.shape) != shape:
            raise PartitionedLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model {shape}")
        _fill(parameter, tensor, rank)
        filled.append(name)
    return filled


def _read(tensor: Any, start: int, count: int) -> torch.Tensor:
    if isinstance(tensor, TensorLocation):
        return tensor.read(start, count)
    return tensor.reshape(-1)[start:start + count]


def _fill(parameter: torch.nn.Parameter, tensor: Any, rank: int) -> None:
    numel = math.prod(getattr(parameter, "ds_shape", parameter.shape))
    with torch.no_grad():
        partition = getattr(parameter, "ds_tensor", None)
        if partition is not None:  # ZeRO-3: this rank's contiguous slice of the flattened weight, zero-padded
            size = partition.numel()
            start = rank * size
            count = max(0, min(size, numel - start))
            flat = partition.data.view(-1)
            flat.zero_()
            if count:
                flat[:count].copy_(_read(tensor, start, count))
        if parameter.data.numel() == numel:  # whole on this rank (not ZeRO-3, or kept whole by ZeRO-3)
            parameter.data.copy_(_read(tensor, 0, numel).view(parameter.data.shape))


def load_partitioned(model_path: str | Path, deepspeed_config: dict[str, Any], *, dtype: torch.dtype,
                     attn_implementation: str | None = None):
    """Build the checkpoint's model partitioned under ZeRO-3 and fill each rank's slices from its files.

    Returns:
        ``(model, keep_alive)``: hold ``keep_alive`` (transformers' ``HfDeepSpeedConfig``) until
        ``deepspeed.initialize`` has run; without it transformers forgets that ZeRO-3 is on.
    """
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    from llava_platform.model.compose import MODEL_CLASSES

    config = AutoConfig.from_pretrained(model_path)
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model_class = MODEL_CLASSES[config.model_type]
    located = locate_parameters(model_class, config, tensor_index(model_path))
    keep_alive = HfDeepSpeedConfig(deepspeed_config)  # from here on transformers builds under zero.Init
    if located is None:  # a layout transformers converts while loading: rank 0 reads it all
        return model_class.from_pretrained(model_path, dtype=dtype, use_safetensors=True, **options), keep_alive
    model = model_class._from_config(config, dtype=dtype, **options)
    fill_partitions(model, located)
    return model, keep_alive
