"""Where each tensor of a safetensors checkpoint is, read from the files' headers alone.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte range per tensor) and
the raw data: ``tensor_index`` maps every tensor name to its bytes without reading them, a
``TensorLocation`` reads any slice of one (a ``seek`` and a ``readinto``), and ``locate_parameters`` matches
checkpoint keys to a model's parameter names with transformers' own renaming rules. The partitioned ZeRO-3
load (``train/partitioned.py``) and the streamed composition (``model/streamed.py``) both read through here.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte offset of its first element in the file."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements ``[start, start + count)`` of the flattened tensor (all by default), read from disk."""
        count = self.numel - start if count is None else count
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        buffer = bytearray(count * itemsize)
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * itemsize)
            f.readinto(buffer)
        return torch.frombuffer(buffer, dtype=self.dtype) if count else torch.empty(0, dtype=self.dtype)


def tensor_index(folder: str | Path) -> dict[str, TensorLocation]:
    """Every tensor of the ``*.safetensors`` files in ``folder``, by name (headers only are read)."""
    index = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                index[name] = TensorLocation(file, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                                             8 + length + info["data_offsets"][0])
    return index



def locate_parameters(model_class, config, index: dict[str, TensorLocation]) -> dict[str, TensorLocation] | None:
    """Each parameter of a ``model_class(config)`` model (by its own name) -> where the checkpoint has it.

    Checkpoint keys are renamed with transformers' rules for the model (``get_model_conversion_mapping``,
    what ``from_pretrained`` applies). ``None`` when a key needs a converter (more than a rename) or a
    parameter is not in the checkpoint: then only transformers' own loading can build it.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    with torch.device("meta"):  # no memory, and before ZeRO-3 is switched on
        model = model_class(config)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta_state = model.state_dict()
    located = {}
    for key, location in index.items():
        name, converter = rename_source_key(key, renamings, converters, base_model_prefix=model.base_model_prefix,
                                            meta_state_dict=meta_state)
        if converter is not None:
            return None
        located[name] = location
    parameters: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        parameters.setdefault(id(parameter), []).append(name)
    if not all(any(name in located for name in names) for names in parameters.values()):
        return None
    return located
