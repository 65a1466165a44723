"""Write a composed (or recipe-adjusted pretrained) LLaVA checkpoint without holding the model in memory.

    write_composed_llava(vision_tower, language_model, out_dir, arch=..., ...)   # jobs.compose
    write_pretrained_llava(checkpoint, out_dir, template=..., image_mode=...)

``compose_llava`` loads both towers into memory and ``save_pretrained`` writes them: for Qwen1.5-72B
that is 145 GB in bf16 on the machine that composes. Here the model exists only on the meta device
(shapes, no storage); each output tensor is read from the towers' safetensors files when its shard is
written (``model.checkpoint_index.locate_parameters`` matches checkpoint keys to parameter names with
transformers' own renaming rules), so memory holds one shard (``SHARD_BYTES``) at a time. The output
is what ``compose_llava`` + ``save_llava`` write: the same tensor names (``save_pretrained``'s, through
transformers' ``revert_weight_conversion``, in the llava-hf layout: ``model.layout``), config,
generation config and processor; the resized embeddings' new rows are the old rows' mean and the
projector is freshly initialised in the same order, so that from the same random state both paths
write the same bytes. A tower whose checkpoint needs more than renaming (tensors merged
or split while loading) is composed in memory instead, with a note.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

from llava_platform.archs import tiles_anyres
from llava_platform.model.checkpoint_index import locate_parameters, tensor_index
from llava_platform.model.compose import (
    MODEL_CLASSES,
    ModelCompositionError,
    apply_recipe_settings,
    compose_llava,
    load_processor,
    new_image_newline,
    new_projector,
    plan_composition,
    refuse_pickled_weights,
    resized_rows,
    save_llava,
    save_processor,
)
from llava_platform.model.layout import write_llava_hf_layout
from llava_platform.model.sharded_save import SHARD_BYTES, LazyTensor, save_config, save_sharded

TensorSource = Callable[[], torch.Tensor]


def write_composed_llava(
    vision_tower: str,
    language_model: str,
    out_dir: str | Path,
    *,
    arch: str,
    projector: str,
    vision_feature_layer: int,
    image_size: int,
    image_mode: str,
    template: str,
    pinpoints: Sequence[tuple[int, int]] | None = None,
    anyres_max_tiles: int | None = None,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = SHARD_BYTES,
) -> int:
    """``compose_llava``'s checkpoint, written to ``out_dir`` one shard at a time; returns the parameter count.

    Args: as ``compose_llava`` (hub ids are downloaded to the Hugging Face cache first), plus
        shard_bytes: the largest shard written, and so the most tensor memory held.
    """
    vision_dir, language_dir = local_folder(vision_tower), local_folder(language_model)
    options = dict(arch=arch, projector=projector, vision_feature_layer=vision_feature_layer,
                   image_size=image_size, template=template, pinpoints=pinpoints, anyres_max_tiles=anyres_max_tiles)
    plan = plan_composition(vision_dir, language_dir, **options)
    with torch.device("meta"):
        model = MODEL_CLASSES[arch](plan.config)
    sources = _tower_sources(model, vision_dir, language_dir)  # before the resize changes the vocabulary
    with torch.device("meta"):
        model.resize_token_embeddings(plan.vocab_size, mean_resizing=False)
    model.config.pad_token_id = plan.pad_token_id
    model.generation_config = plan.generation_config
    apply_recipe_settings(model, plan.processor, template=template, image_mode=image_mode)
    if sources is None:
        print(f"[compose] {vision_tower} or {language_model} needs transformers' weight conversion: "
              "composing in memory", file=sys.stderr)
        composed, processor = compose_llava(vision_dir, language_dir, image_mode=image_mode, dtype=dtype, **options)
        save_llava(composed, processor, out_dir)
        return sum(p.numel() for p in composed.parameters())
    fresh = {f"model.multi_modal_projector.{k}": v for k, v in new_projector(plan.config, dtype).state_dict().items()}
    if tiles_anyres(arch):
        fresh["model.image_newline"] = new_image_newline(plan.config.text_config.hidden_size, dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, made = {}, {}
    for name, meta in model.state_dict(keep_vars=True).items():
        if id(meta) in made:  # a tied weight: the same tensor (save_sharded keeps the name save_pretrained keeps)
            tensors[name] = made[id(meta)]
            continue
        if name in fresh:
            make = partial(_given, fresh[name])
        elif name in sources:
            make = _reader(name, sources[name], tuple(meta.shape), dtype)
        else:
            raise ModelCompositionError(f"composed model parameter {name} has no source tensor")
        tensors[name] = made[id(meta)] = LazyTensor(tuple(meta.shape), dtype, make)
    save_sharded(model, tensors, out_dir, max_shard_size=shard_bytes,
                 progress=lambda line: print(f"[compose] {line}", file=sys.stderr, flush=True))
    save_config(model, dtype, out_dir)
    save_processor(plan.processor, out_dir)
    return model.num_parameters()


def write_pretrained_llava(checkpoint: str, out_dir: str | Path, *, template: str, image_mode: str) -> tuple[str, int]:
    """A LLaVA checkpoint with the recipe's template, image mode and stop tokens, written to ``out_dir``.

    The weights are not touched: their files are hard-linked (copied across file systems); only the
    processor and generation config are rewritten (``apply_recipe_settings``).

    Returns:
        ``(model_type, parameter count)``.
    """
    from transformers import AutoConfig, GenerationConfig

    folder = Path(local_folder(checkpoint))
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in MODEL_CLASSES:
        raise ModelCompositionError(f"{checkpoint}: model_type {config.model_type!r} is not a LLaVA checkpoint; "
                                    f"supported: {', '.join(MODEL_CLASSES)}")
    refuse_pickled_weights(str(folder))
    with torch.device("meta"):
        model = MODEL_CLASSES[config.model_type](config)
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        pass
    processor = load_processor(str(folder))
    apply_recipe_settings(model, processor, template=template, image_mode=image_mode)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.safetensors.index.json")):
        _link_or_copy(file, out_dir / file.name)
    write_llava_hf_layout(out_dir)  # a shard that needs new names is rewritten (the link to the source dropped)
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    save_processor(processor, out_dir)
    return config.model_type, sum(p.numel() for p in model.parameters())


def local_folder(name_or_path: str) -> str:
    """A local folder for a checkpoint: the path itself, or a hub id's snapshot in the Hugging Face cache."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                           "*.tiktoken", "*.jinja"])


def _tower_sources(model, vision_dir: str, language_dir: str) -> dict[str, object] | None:
    """LLaVA parameter name -> the towers' ``TensorLocation`` for it; ``None`` when a tower needs a converter."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    vision_class = type(model.model.vision_tower)
    vision = locate_parameters(vision_class, model.config.vision_config, tensor_index(vision_dir))
    text_config = AutoConfig.from_pretrained(language_dir)
    causal_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    language = locate_parameters(causal_class, text_config, tensor_index(language_dir))
    if vision is None or language is None:
        return None
    prefix = f"{causal_class.base_model_prefix}."
    sources = {f"model.vision_tower.{name}": location for name, location in vision.items()}
    for name, location in language.items():  # model.layers.0... -> model.language_model.layers.0...; lm_head stays
        sources["model.language_model." + name[len(prefix):] if name.startswith(prefix) else name] = location
    return sources


def _given(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _reader(name: str, location, shape: tuple[int, ...], dtype: torch.dtype) -> TensorSource:
    """Read a tower tensor; embeddings resized to the new vocabulary get their new rows as ``compose_llava``
    gives them (``resized_rows``: the old rows' mean)."""
    if location.shape == shape:
        return lambda: location.read().view(shape).to(dtype)
    if location.shape[1:] != shape[1:]:
        raise ModelCompositionError(f"{name}: tower shape {location.shape}, composed model {shape}")
    return lambda: resized_rows(location.read().view(location.shape).to(dtype), shape[0])


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
