"""A recipe's memory plan: each stage's shapes and settings turned into ``train.memory``'s inputs.

    print(plan_recipe(recipe))     # what ``--dry-run`` prints after the resolved recipe

``train/memory.py`` holds the estimate (flat numbers in, bytes out); this module reads the recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

from llava_platform.archs import takes_video
from llava_platform.config.schema import PreferenceStageConfig, Recipe, StageConfig
from llava_platform.data.geometry import (
    anyres_tile_count,
    image_token_count,
    onevision_image_token_count,
    stacked_image_token_count,
    video_token_count,
)
from llava_platform.train.memory import (
    SampleLengths,
    StageSetup,
    TransformerShape,
    UnknownShapeError,
    plan,
    shape_of,
)


def recipe_shapes(recipe: Recipe) -> tuple[TransformerShape, TransformerShape]:
    """(language model, vision tower) shapes of the recipe's model: tiny towers, a local or known checkpoint.

    Raises:
        UnknownShapeError: a model that is neither local nor in ``KNOWN_SHAPES``.
    """
    model = recipe.model
    if model.tiny is not None:
        tiny = model.tiny
        tokens = (model.image_size // tiny.patch_size) ** 2 + (1 if tiny.vision_family == "clip" else 0)
        return (TransformerShape(tiny.text_hidden_size, tiny.text_layers, 2 * tiny.text_hidden_size, tiny.text_heads,
                                 vocab=tiny.text_vocab_size),
                TransformerShape(tiny.vision_hidden_size, tiny.vision_layers, 2 * tiny.vision_hidden_size,
                                 tiny.vision_heads, tokens_per_tile=tokens, patch_size=tiny.patch_size,
                                 gated_mlp=False))
    if model.pretrained:
        return (shape_of(model.pretrained, vision=False),
                shape_of(model.pretrained, vision=True, image_size=model.image_size))
    return shape_of(model.language_model, vision=False), shape_of(model.vision_tower, vision=True,
                                                                    image_size=model.image_size)


def stage_setup(recipe: Recipe, stage: StageConfig, lengths: SampleLengths | None = None) -> StageSetup:
    """The numbers ``estimate`` needs, from the recipe (shapes as ``recipe_shapes``).

    Args:
        lengths: the data's own lengths (default: the preprocessing manifest's in ``data.preprocessed``, if
            any). Without them every sample is planned as long as ``model_max_length`` allows, with the
            largest image the geometry allows: a bound, far above LLaVA data for long-context recipes.
    """
    lm, tower = recipe_shapes(recipe)
    model, ds = recipe.model, stage.deepspeed
    projector = tower.hidden * lm.hidden + (lm.hidden * lm.hidden if model.projector == "mlp2x_gelu" else 0)
    anyres = stage.data.image_mode == "anyres" and bool(model.image_grid_pinpoints)
    pinpoints = [tuple(p) for p in model.image_grid_pinpoints or [(model.image_size, model.image_size)]]
    tiles = max(anyres_tile_count(p, pinpoints, model.image_size) for p in pinpoints) if anyres else 1
    image_tokens = max(image_token_count(p, anyres=anyres, tile_size=model.image_size, patch_size=tower.patch_size,
                                         pinpoints=pinpoints) for p in pinpoints) if tower.patch_size else 0
    if takes_video(model.arch) and tower.patch_size:  # the largest of: one image, several, a video
        size, data = dict(tile_size=model.image_size, patch_size=tower.patch_size), stage.data
        tiles = max(tiles, data.max_images, data.video.frames)
        image_tokens = max(
            *(onevision_image_token_count(p, pinpoints=pinpoints, max_tiles=model.max_tiles(), **size)
              for p in pinpoints),
            data.max_images * stacked_image_token_count(**size), video_token_count(data.video.frames, **size))
    max_length, typical, source = stage.data.model_max_length, None, StageSetup.lengths_from
    lengths = lengths or manifest_lengths(stage)
    if lengths is not None and lengths.rows:
        max_length, tiles, typical = min(max_length, lengths.max_tokens), lengths.max_tiles, lengths
        source = f"the data ({lengths.rows:,} rows; largest {lengths.max_tokens:,} tokens, {lengths.max_tiles} tiles)"
    if stage.data.packing is not None:  # every row a pack, filled up to its budget
        packing = stage.data.packing
        max_length, tiles = packing.max_tokens, packing.max_tiles or tiles
        typical = SampleLengths(max_length, max_length, tiles, tiles, lengths.rows if lengths else 0)
        source = f"data.packing (rows of up to {max_length:,} tokens{f', {tiles} tiles' if packing.max_tiles else ''})"
    return StageSetup(lm=lm, tower=tower, projector_params=projector, tunable=tuple(stage.tunable),
                      lora_rank=stage.lora.r if stage.lora else None,
                      lora_targets=tuple(stage.lora.target_modules) if stage.lora else (),
                      zero_stage=ds.zero_stage, offload_optimizer=ds.offload_optimizer, precision=ds.precision,
                      world_size=recipe.scaling.num_workers, micro_batch_size=stage.micro_batch_size,
                      max_length=max_length, tiles_per_sample=tiles,
                      gradient_checkpointing=ds.gradient_checkpointing, overlap_comm=recipe.scaling.use_gpu,
                      image_tokens=image_tokens, typical=typical, lengths_from=source,
                      export_shard_bytes=recipe.checkpoint.export_shard_mb * 2**20,
                      sequences_per_row=2 if isinstance(stage, PreferenceStageConfig) else 1)


MANIFEST = "manifest.json"
"""``jobs.preprocess``'s summary in a stage's ``data.preprocessed`` folder (``pipelines.shards``)."""


def manifest_lengths(stage: StageConfig) -> SampleLengths | None:
    """The ``lengths`` the preprocessing manifest recorded for the stage's rows, if it is on this machine."""
    if stage.data.preprocessed is None:
        return None
    manifest = Path(stage.data.preprocessed) / MANIFEST
    if not manifest.is_file():
        return None
    recorded = json.loads(manifest.read_text()).get("lengths")
    return SampleLengths(**recorded) if recorded else None


def plan_recipe(recipe: Recipe) -> str:
    """What ``--dry-run`` prints after the recipe: each stage's per-GPU estimate and verdict."""
    try:
        plans = [plan(name, stage_setup(recipe, stage), recipe.scaling.gpu_memory_gb)
                 for name, stage in recipe.stages().items()]
    except UnknownShapeError as error:
        return f"# memory estimate: unavailable ({error})"
    unit = "GPU" if recipe.scaling.use_gpu else "worker"
    header = f"# memory per {unit} (config.memory_plan + train.memory; model states after DeepSpeed's estimators)"
    return "\n".join([header, *(f"# {line}" for p in plans for line in p.table().splitlines())])
