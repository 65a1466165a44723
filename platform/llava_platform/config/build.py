"""Recipe model section -> a starting checkpoint: written to disk (``write_model``, what ``jobs.compose``
calls) or built in memory (``build_model``).

Turns the ``model`` section into flat arguments for ``write_composed_llava`` / ``write_pretrained_llava``
(``model.streamed``: never the whole model in memory) or ``compose_llava`` / ``load_pretrained_llava``.
Tiny towers (tests, CPU demo) are saved to disk first and then composed through the same path as
pretrained hub towers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from llava_platform.config.schema import ModelConfig
from llava_platform.model.compose import (
    MODEL_CLASSES,
    LlavaModel,
    ModelCompositionError,
    apply_recipe_settings,
    compose_llava,
    load_pretrained_llava,
)
from llava_platform.model.streamed import write_composed_llava, write_pretrained_llava
from llava_platform.model.tiny import save_tiny_language_model, save_tiny_vision_tower


def materialize_tiny_towers(model: ModelConfig, out_dir: str | Path) -> tuple[str, str]:
    """Save the recipe's tiny towers under ``out_dir``; return (vision_tower, language_model) paths."""
    tiny = model.tiny
    out_dir = Path(out_dir)
    vision = save_tiny_vision_tower(
        out_dir / "tiny_vision_tower", family=tiny.vision_family, image_size=model.image_size,
        patch_size=tiny.patch_size, hidden_size=tiny.vision_hidden_size, layers=tiny.vision_layers,
        heads=tiny.vision_heads, position_scale=tiny.vision_position_scale, seed=tiny.seed,
    )
    language = save_tiny_language_model(
        out_dir / "tiny_language_model", hidden_size=tiny.text_hidden_size, layers=tiny.text_layers,
        heads=tiny.text_heads, vocab_size=tiny.text_vocab_size, family=tiny.text_family, seed=tiny.seed,
    )
    return str(vision), str(language)


def build_model(
    model: ModelConfig,
    *,
    image_mode: str,
    template: str,
    work_dir: str | Path,
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaModel, object]:
    """Build the recipe's model and processor.

    Args:
        model: the recipe's ``model`` section.
        image_mode: the image mode the exported processor applies (the last stage's).
        template: the conversation template saved with the processor (the last stage's).
        work_dir: where tiny towers are written when ``model.tiny`` is set.
        dtype: parameter dtype.
    """
    if model.pretrained:
        llava, processor = load_pretrained_llava(model.pretrained, dtype=dtype)
        if llava.config.model_type != model.arch:
            raise ModelCompositionError(
                f"model.pretrained {model.pretrained} is a {llava.config.model_type} checkpoint but model.arch is "
                f"{model.arch!r}; set model.arch: {llava.config.model_type}"
            )
        apply_recipe_settings(llava, processor, template=template, image_mode=image_mode)
        return llava, processor
    if model.tiny:
        vision_tower, language_model = materialize_tiny_towers(model, work_dir)
    else:
        vision_tower, language_model = model.vision_tower, model.language_model
    pinpoints: Sequence[tuple[int, int]] | None = model.image_grid_pinpoints
    return compose_llava(
        vision_tower, language_model, arch=model.arch, projector=model.projector,
        vision_feature_layer=model.vision_feature_layer, image_size=model.image_size, image_mode=image_mode,
        template=template, pinpoints=pinpoints, anyres_max_tiles=model.max_tiles(), dtype=dtype,
    )


def write_model(
    model: ModelConfig,
    out_dir: str | Path,
    *,
    image_mode: str,
    template: str,
    work_dir: str | Path,
    dtype: torch.dtype = torch.float32,
) -> tuple[str, int]:
    """Write the recipe's starting checkpoint to ``out_dir``, one shard at a time (``model.streamed``).

    Args: as ``build_model``.

    Returns:
        ``(model class name, parameter count)``.
    """
    if model.pretrained:
        model_type, params = write_pretrained_llava(model.pretrained, out_dir, template=template,
                                                    image_mode=image_mode)
        if model_type != model.arch:
            raise ModelCompositionError(
                f"model.pretrained {model.pretrained} is a {model_type} checkpoint but model.arch is "
                f"{model.arch!r}; set model.arch: {model_type}"
            )
        return MODEL_CLASSES[model_type].__name__, params
    if model.tiny:
        vision_tower, language_model = materialize_tiny_towers(model, work_dir)
    else:
        vision_tower, language_model = model.vision_tower, model.language_model
    params = write_composed_llava(
        vision_tower, language_model, out_dir, arch=model.arch, projector=model.projector,
        vision_feature_layer=model.vision_feature_layer, image_size=model.image_size, image_mode=image_mode,
        template=template, pinpoints=model.image_grid_pinpoints, anyres_max_tiles=model.max_tiles(), dtype=dtype,
    )
    return MODEL_CLASSES[model.arch].__name__, params
