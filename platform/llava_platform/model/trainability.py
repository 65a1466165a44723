"""Which weights train: freeze by part, per-part learning rates, LoRA on the language model.

A LLaVA model has three parts, named as in the recipe's ``tunable`` list:
``vision_tower``, ``projector`` (with LLaVA-NeXT's ``image_newline``) and ``language_model``
(with ``lm_head``). Stage 1 trains ``projector`` only; stage 2 what its recipe names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "vision_tower": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.", "model.image_newline"),
    "language_model": ("model.language_model.", "lm_head."),
}


class TrainabilityError(ValueError):
    """A tunable list or parameter name that does not fit the model."""


def part_of(parameter_name: str) -> str:
    """The part (``vision_tower``, ``projector``, ``language_model``) a parameter belongs to."""
    name = parameter_name.removeprefix("base_model.model.")  # the same names inside a peft wrapper
    for part, prefixes in PART_PREFIXES.items():
        if name.startswith(prefixes):
            return part
    raise TrainabilityError(f"parameter {parameter_name} belongs to no known part ({', '.join(PART_PREFIXES)})")


def set_trainable(model: torch.nn.Module, tunable: Sequence[str]) -> dict[str, int]:
    """Freeze every part not in ``tunable``; return the trainable parameter count per part."""
    unknown = set(tunable) - set(PART_PREFIXES)
    if unknown:
        raise TrainabilityError(f"unknown tunable part(s) {sorted(unknown)}; allowed: {', '.join(PART_PREFIXES)}")
    counts = dict.fromkeys(PART_PREFIXES, 0)
    for name, parameter in model.named_parameters():
        part = part_of(name)
        parameter.requires_grad_(part in tunable)
        if parameter.requires_grad:
            counts[part] += parameter.numel()
    return counts


def parameter_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    lr: float,
    projector_lr: float | None = None,
    vision_tower_lr: float | None = None,
    weight_decay: float,
) -> list[dict]:
    """AdamW groups of the trainable parameters: one learning rate per part, no decay on biases and norms.

    Args:
        lr: language-model rate (and the default of the others).
        projector_lr, vision_tower_lr: the parts' own rates (LLaVA-NeXT tunes the tower at 2e-6).
    """
    rates = {"language_model": lr, "projector": projector_lr or lr, "vision_tower": vision_tower_lr or lr}
    groups: dict[tuple[str, bool], dict] = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        part = part_of(name)
        shape = getattr(parameter, "ds_shape", parameter.shape)  # ZeRO-3 partitions hold a flat piece of it
        decay = len(shape) >= 2 and "norm" not in name.lower()
        group = groups.setdefault((part, decay), {
            "name": f"{part}{'' if decay else '/no_decay'}", "params": [], "lr": rates[part],
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(parameter)
    return list(groups.values())


def apply_lora(
    model: torch.nn.Module,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str],
    fully_trained: Sequence[str] = ("projector",),
) -> torch.nn.Module:
    """Wrap the model with peft LoRA adapters on the language model's ``target_modules`` only.

    The parts in ``fully_trained`` (the projector, optionally the vision tower) keep training in
    full; everything else, the base language-model weights included, is frozen.

    Returns:
        The ``PeftModel``; ``merge_and_unload()`` gives back a plain transformers model for export.
    """
    from peft import LoraConfig, get_peft_model

    pattern = rf"model\.language_model\..*\.({'|'.join(target_modules)})"
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                  target_modules=pattern))
    for name, parameter in peft_model.named_parameters():
        if "lora_" not in name and part_of(name) in fully_trained:
            parameter.requires_grad_(True)
    return peft_model
