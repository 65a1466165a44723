"""Stage outputs: the projector on its own (safetensors) and the Hugging Face export of a DeepSpeed engine.

Stage 1 hands its projector to stage 2 as a small safetensors file (``projector.safetensors``), so
stage 2 starts from the composed towers plus that file, never from a stage-1 optimizer state. The
export gathers ZeRO-3 shards into a full state dict first: without that, ZeRO-3 saves
zero-size placeholders (the reference code's ``size mismatch torch.Size([0])``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_platform.model.compose import load_pretrained_llava, save_llava, save_processor
from llava_platform.model.layout import write_llava_hf_layout
from llava_platform.model.trainability import apply_lora, part_of
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


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The whole model's weights from a DeepSpeed engine; every rank must call it (collective under ZeRO-3).

    Returns:
        The state dict on rank 0 (ZeRO-3: gathered from all ranks), ``None`` on the other ranks.
    """
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if engine.global_rank != 0:
        return None
    return {name: tensor.detach().cpu() for name, tensor in engine.module.state_dict().items()}


def export_model(state_dict: dict[str, torch.Tensor], processor, out_dir: str | Path, *, model_path: str,
                 lora: LoraSpec | None, module: torch.nn.Module) -> Path:
    """Write ``out_dir/export``: a Hugging Face checkpoint that plain transformers loads.

    Args:
        state_dict: the full weights (``full_state_dict``; ZeRO-3 shards already gathered).
        model_path: the stage's starting checkpoint; with LoRA, the base the adapters are merged into.
        lora: the stage's LoRA settings, or ``None``.
        module: the trained model (``engine.module``); its config and class are what gets saved.

    With LoRA, the adapters are also saved on their own in ``out_dir/adapter`` (peft's format; the
    fully trained projector is ``out_dir/projector.safetensors`` next to it), the model they apply to
    in ``out_dir/adapter_base`` (the stage's fully trained parts in, the adapters not merged: what
    vLLM serves with the adapter unmerged), and the export holds the merged weights. The merge runs on a
    fresh CPU copy, in the trained weights' dtype, loaded
    strictly from ``state_dict``, so it works the same whether the engine's parameters are sharded
    (ZeRO-3) or not.
    """
    export = Path(out_dir) / EXPORT_DIR
    if lora is None:
        module.save_pretrained(export, state_dict=state_dict)
    else:
        base, _ = load_pretrained_llava(model_path, dtype=next(iter(state_dict.values())).dtype)
        adapted = apply_lora(base, **asdict(lora))
        adapted.load_state_dict(state_dict, strict=True)
        adapted.save_pretrained(Path(out_dir) / ADAPTER_DIR)
        merged = adapted.merge_and_unload()
        merged.save_pretrained(export)
        # the same module without the merge: the peft names of the non-LoRA weights, unwrapped
        base_weights = {name.removeprefix("base_model.model.").replace(".base_layer.", "."): tensor
                        for name, tensor in state_dict.items() if "lora_" not in name}
        merged.load_state_dict(base_weights, strict=True)
        merged.save_pretrained(Path(out_dir) / ADAPTER_BASE_DIR)
        write_llava_hf_layout(Path(out_dir) / ADAPTER_BASE_DIR)
        save_processor(processor, Path(out_dir) / ADAPTER_BASE_DIR)
    write_llava_hf_layout(export)  # the names vLLM, SGLang and the hub use
    save_processor(processor, export)
    return export


def export_with_projector(model_path: str, projector_path: str | Path, out_dir: str | Path) -> Path:
    """The starting checkpoint with a trained projector loaded, saved as a Hugging Face folder.

    This is the stage-1 model (towers as composed, projector aligned), for evaluating or serving stage 1
    on its own.
    """
    model, processor = load_pretrained_llava(model_path)
    load_projector(model, projector_path)
    return save_llava(model, processor, out_dir)
