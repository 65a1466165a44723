"""Recipe -> what the code below takes: the starting checkpoint, written to disk (``write_model``, what
``jobs.compose`` calls) or built in memory (``build_model``); a stage's training engine (``deepspeed_spec``)
and the compute of its packs (``pack_cost``).

Turns the ``model`` section into flat arguments for ``write_composed_llava`` / ``write_pretrained_llava``
(``model.streamed``: never the whole model in memory) or ``compose_llava`` / ``load_pretrained_llava``.
Tiny towers (tests, CPU demo) are saved to disk first and then composed through the same path as
pretrained hub towers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from llava_platform.config.memory_plan import recipe_shapes
from llava_platform.config.schema import ModelConfig, Recipe, StageConfig
from llava_platform.data.packing import PackCost
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
from llava_platform.storage import is_remote
from llava_platform.train.deepspeed_config import build_deepspeed_config
from llava_platform.train.memory import UnknownShapeError
from llava_platform.train.plan import DeepSpeedSpec


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


def deepspeed_spec(recipe: Recipe, stage: StageConfig, model: str, total_steps: int) -> DeepSpeedSpec:
    """The stage's engine: model, what trains, optimiser, schedule, and DeepSpeed for the recipe's worker count."""
    scaling, deepspeed = recipe.scaling, stage.deepspeed
    optim, lora = stage.optim, stage.lora
    return DeepSpeedSpec(
        model_path=model if is_remote(model) else str(Path(model).resolve()),
        tunable=tuple(stage.tunable),
        lora=lora.build() if lora else None,
        lr=optim.lr, projector_lr=optim.projector_lr, vision_tower_lr=optim.vision_tower_lr,
        weight_decay=optim.weight_decay, scheduler=optim.scheduler, warmup_ratio=optim.warmup_ratio,
        total_steps=total_steps, zero_stage=deepspeed.zero_stage, precision=deepspeed.precision,
        gradient_accumulation_steps=stage.gradient_accumulation_steps(scaling.num_workers),
        deepspeed_config=build_deepspeed_config(
            global_batch_size=stage.global_batch_size, micro_batch_size=stage.micro_batch_size,
            world_size=scaling.num_workers, zero_stage=deepspeed.zero_stage, precision=deepspeed.precision,
            offload_optimizer=deepspeed.offload_optimizer, max_grad_norm=optim.max_grad_norm,
            weight_decay=optim.weight_decay, lr=optim.lr, use_gpu=scaling.use_gpu,
            param_persistence_threshold=deepspeed.zero3_param_persistence_threshold,
        ),
        gradient_checkpointing=deepspeed.gradient_checkpointing,
        attn_implementation=recipe.model.attn_implementation, tf32=deepspeed.tf32,
    )


def pack_cost(recipe: Recipe, stage: StageConfig) -> PackCost:
    """A pack's compute from the model's shapes (``config.memory_plan.recipe_shapes``), or its token count where
    the shapes are unknown (a pretrained model the planner does not know)."""
    try:
        lm, tower = recipe_shapes(recipe)
    except UnknownShapeError:
        return PackCost(per_token=1.0, per_token_pair=0.0, per_tile=0.0)
    return PackCost.of(lm_params=lm.params, lm_layers=lm.layers, lm_hidden=lm.hidden, tower_params=tower.params,
                       tokens_per_tile=tower.tokens_per_tile, tower_trains="vision_tower" in stage.tunable)
