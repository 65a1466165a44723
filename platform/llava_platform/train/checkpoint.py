"""Stage outputs: the projector on its own (safetensors) and the Hugging Face export of a DeepSpeed engine.

Stage 1 hands its projector to stage 2 as a small safetensors file (``projector.safetensors``), so
stage 2 starts from the composed towers plus that file, never from a stage-1 optimizer state. The
export gathers ZeRO-3 partitions one shard at a time (``export_model``): saving the engine's module as it
is writes ZeRO-3's zero-size placeholders (the reference code's ``size mismatch torch.Size([0])``), and
gathering the whole state dict first holds the whole model on one host (145 GB for 72B in bf16).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_platform.model.compose import load_pretrained_llava, save_llava, save_processor
from llava_platform.model.layout import write_llava_hf_layout
from llava_platform.model.sharded_save import SHARD_BYTES, LazyTensor, meta_copy, save_config, save_sharded
from llava_platform.model.trainability import part_of
from llava_platform.train.plan import LoraSpec

PROJECTOR_FILE = "projector.safetensors"
EXPORT_DIR = "export"
PEFT_PREFIX = "base_model.model."
"""What peft puts in front of the wrapped model's parameter names."""
ADAPTER_DIR = "adapter"
ADAPTER_BASE_DIR = "adapter_base"
"""With LoRA: the model the adapters apply to (the stage's fully trained parts included, LoRA not merged)."""


def projector_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector's tensors (and LLaVA-NeXT's ``image_newline``) out of a full state dict.

    Names are the plain model's, also when the state dict comes from a peft (LoRA) wrapper.
    """
    return {name.removeprefix(PEFT_PREFIX): tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()
            if part_of(name) == "projector"}


def save_projector(state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write the projector tensors of a full state dict to ``out_dir/projector.safetensors``."""
    path = Path(out_dir) / PROJECTOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(projector_state(state_dict), str(path))
    return path


def projector_file(path: str | Path) -> Path:
    """The projector file: ``path`` itself, or ``PROJECTOR_FILE`` inside a stage folder."""
    path = Path(path)
    return path / PROJECTOR_FILE if path.is_dir() else path


def load_projector(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Load a saved projector into ``model``; return the names loaded.

    Raises:
        ValueError: the file holds tensors the model lacks, or shapes that differ.
    """
    path = projector_file(path)
    tensors = load_file(str(path))
    own = model.state_dict()
    wrong = [f"{n}: {tuple(t.shape)} vs model {tuple(own[n].shape) if n in own else 'missing'}"
             for n, t in tensors.items() if n not in own or own[n].shape != t.shape]
    if wrong:
        raise ValueError(f"projector {path} does not fit this model: {'; '.join(wrong)}")
    model.load_state_dict(tensors, strict=False)
    return sorted(tensors)


def gather(zero_stage: int):
    """What makes parameters whole: ZeRO-3's all-gather (collective: every rank enters it), else nothing."""
    if zero_stage != 3:
        return lambda params: nullcontext()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return lambda params: GatheredParameters(params, modifier_rank=None)


def save_trained_projector(module: torch.nn.Module, out_dir: str | Path, *, zero_stage: int, write: bool) -> Path:
    """The projector of a (ZeRO-3: partitioned) trained model, gathered alone, as ``save_projector`` writes it.

    Every rank calls it; the one with ``write`` writes and gets the path.
    """
    named = {name: param for name, param in module.named_parameters() if part_of(name) == "projector"}
    with gather(zero_stage)(list(named.values())):
        return save_projector(named, out_dir) if write else Path(out_dir) / PROJECTOR_FILE


def export_model(module: torch.nn.Module, processor, out_dir: str | Path, *, lora: LoraSpec | None, zero_stage: int,
                 write: bool, max_shard_size: int = SHARD_BYTES, progress: Callable[[str], None] | None = None) -> Path:
    """Write ``out_dir/export``: a Hugging Face checkpoint that plain transformers and vLLM load.

    Every rank calls it (ZeRO-3 gathers are collective); the one with ``write`` writes. The weights stream
    (``model.sharded_save``): one shard of at most ``max_shard_size`` is gathered, copied to the writer's CPU,
    written and released at a time, so no host holds the whole model; the files are what ``save_pretrained``
    writes for the gathered weights.

    Args:
        module: the trained model (``engine.module``; a peft wrapper with LoRA).
        lora: the stage's LoRA settings, or ``None``.
        progress: called with a line after each shard written (of a checkpoint of several).

    With LoRA, the adapters are also saved on their own in ``out_dir/adapter`` (peft's format; the fully
    trained projector is ``out_dir/projector.safetensors`` next to it), the model they apply to in
    ``out_dir/adapter_base`` (the stage's fully trained parts in, the adapters not merged: what vLLM serves
    with the adapter unmerged), and the export holds the merged weights, each LoRA matrix merged as peft's
    ``merge_and_unload`` does (``merged_weight``) while its shard is written.
    """
    out_dir = Path(out_dir)
    plain = module.get_base_model() if lora is not None else module
    meta = meta_copy(plain)
    options = dict(max_shard_size=max_shard_size, gather=gather(zero_stage), write=write, progress=progress)
    if lora is not None:
        named = {name: param for name, param in module.named_parameters() if "lora_" in name}
        with gather(zero_stage)(list(named.values())):  # the adapters alone: small
            adapters = {name: param.detach().cpu().clone() for name, param in named.items()}
        if write:
            module.save_pretrained(out_dir / ADAPTER_DIR, state_dict=adapters)
        write_checkpoint(meta, lora_tensors(module, merged=False), processor, out_dir / ADAPTER_BASE_DIR, **options)
    return write_checkpoint(meta, lora_tensors(module, merged=True) if lora is not None else
                            plain_tensors(module), processor, out_dir / EXPORT_DIR, **options)


def write_checkpoint(meta, tensors: dict[str, LazyTensor], processor, folder: Path, *, write: bool,
                     progress: Callable[[str], None] | None, **options) -> Path:
    """Weights (streamed), config, processor; in the llava-hf layout."""
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    save_sharded(meta, tensors, folder, write=write, **options,
                 progress=progress and (lambda line: progress(f"{folder.name}: {line}")))
    if write:
        save_config(meta, next(t.dtype for t in tensors.values() if t.params), folder)  # the first parameter's
        write_llava_hf_layout(folder)  # the index's final form (the names are already llava-hf's)
        save_processor(processor, folder)
    return folder


def shape_of(tensor: torch.Tensor) -> tuple[int, ...]:
    """A tensor's whole shape, also of a ZeRO-3 partitioned parameter (whose own shape is empty)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def plain_tensors(module: torch.nn.Module) -> dict[str, LazyTensor]:
    """The model's own weights and buffers, each as it is (once gathered)."""
    return {name: LazyTensor(shape_of(t), t.dtype, (lambda t=t: t), (t,) if isinstance(t, torch.nn.Parameter) else ())
            for name, t in module.state_dict(keep_vars=True).items()}


def lora_tensors(module: torch.nn.Module, *, merged: bool) -> dict[str, LazyTensor]:
    """The plain model's tensors out of a peft LoRA wrapper: each base weight, with (``merged``) or without
    its adapter's update."""
    from peft.tuners.lora import LoraLayer

    layers = {f"{name}.base_layer.weight": layer for name, layer in module.named_modules()
              if isinstance(layer, LoraLayer)}
    tensors = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if "lora_" in name:
            continue
        plain = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        params = (t,) if isinstance(t, torch.nn.Parameter) else ()
        layer = layers.get(name) if merged else None
        if layer is None:
            tensors[plain] = LazyTensor(shape_of(t), t.dtype, (lambda t=t: t), params)
        else:
            tensors[plain] = LazyTensor(shape_of(t), t.dtype, (lambda t=t, layer=layer: merged_weight(layer, t)),
                                        tuple(layer.parameters()))
    return tensors


def merged_weight(layer, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the layer's active adapter merged: what peft's ``merge`` leaves in it (vanilla LoRA)."""
    (adapter,) = layer.active_adapters
    return weight + layer.get_delta_weight(adapter)


def export_with_projector(model_path: str, projector_path: str | Path, out_dir: str | Path) -> Path:
    """The starting checkpoint with a trained projector loaded, saved as a Hugging Face folder.

    This is the stage-1 model (towers as composed, projector aligned), for evaluating or serving stage 1
    on its own.
    """
    model, processor = load_pretrained_llava(model_path)
    load_projector(model, projector_path)
    return save_llava(model, processor, out_dir)
