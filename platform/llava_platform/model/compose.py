"""Build transformers' own ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` /
``LlavaOnevisionForConditionalGeneration``.

Either compose a new model from a pretrained vision tower (CLIP or SigLIP) and a pretrained causal
LM, or load an existing LLaVA checkpoint in Hugging Face format. The result saves to one directory
(safetensors, config, tokenizer, processor, chat template) that plain ``transformers`` loads with
no code of ours: ``AutoProcessor.from_pretrained`` + ``Llava(Next)ForConditionalGeneration``.

Projector: ``mlp2x_gelu`` is transformers' Linear-GELU-Linear projector. ``linear`` (original LLaVA)
uses the same module with the identity activation: two stacked linear maps are one linear map, so
the checkpoint stays loadable by plain transformers, vLLM and SGLang.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.utils import logging as hf_logging

from llava_platform.archs import image_modes_for, takes_video, tiles_anyres
from llava_platform.data.templates import IMAGE_PLACEHOLDER, VIDEO_TOKEN, end_of_turn_token, resolve_chat_template
from llava_platform.inference import end_token_ids
from llava_platform.model.layout import write_llava_hf_layout
from llava_platform.model.onevision_processor import (
    build_onevision_processor,
    load_onevision_processor,
    save_onevision_processor,
)

LlavaModel = LlavaForConditionalGeneration | LlavaNextForConditionalGeneration | LlavaOnevisionForConditionalGeneration
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}
PROJECTOR_ACTIVATIONS = {"mlp2x_gelu": "gelu", "linear": "linear"}


class ModelCompositionError(ValueError):
    """Towers, tokenizer or settings that do not fit together."""


@dataclass(frozen=True)
class VisionTowerInfo:
    """What the rest of the platform needs to know about a vision tower."""

    config: PretrainedConfig
    """The vision half's config (``CLIPVisionConfig``, ``SiglipVisionConfig``)."""
    has_cls_token: bool
    """CLIP prepends a CLS token (dropped: ``vision_feature_select_strategy='default'``); SigLIP does not."""

    @property
    def feature_select_strategy(self) -> str:
        return "default" if self.has_cls_token else "full"


def inspect_vision_tower(name_or_path: str) -> VisionTowerInfo:
    """Read a tower's config (a full dual encoder or a vision-only checkpoint)."""
    config = AutoConfig.from_pretrained(name_or_path)
    vision_config = getattr(config, "vision_config", config)
    family = vision_config.model_type
    if family not in ("clip_vision_model", "siglip_vision_model"):
        raise ModelCompositionError(
            f"vision tower {name_or_path}: model type {family!r} is not supported; use a CLIP or SigLIP checkpoint"
        )
    return VisionTowerInfo(config=vision_config, has_cls_token=family == "clip_vision_model")


@dataclass(frozen=True)
class Composition:
    """A composed model before its weights: what both ``compose_llava`` and ``write_composed_llava`` build on."""

    config: PretrainedConfig
    """The LLaVA config (vision and text configs inside); ``vocab_size`` still the language model's own."""
    tower: VisionTowerInfo
    processor: ProcessorMixin
    generation_config: GenerationConfig
    vocab_size: int
    """The tokenizer's length with ``<image>`` (and a pad token) added: the embeddings are resized to it."""
    pad_token_id: int


def plan_composition(
    vision_tower: str,
    language_model: str,
    *,
    arch: str,
    projector: str,
    vision_feature_layer: int,
    image_size: int,
    template: str,
    pinpoints: Sequence[tuple[int, int]] | None = None,
    anyres_max_tiles: int | None = None,
) -> Composition:
    """Check that the towers fit together and resolve everything but the weights (configs and tokenizer only).

    Raises:
        ModelCompositionError: a tower or setting that does not fit.
    """
    tower = inspect_vision_tower(vision_tower)
    if tower.config.image_size != image_size:
        raise ModelCompositionError(
            f"model.image_size is {image_size} but vision tower {vision_tower} takes {tower.config.image_size} px "
            "images; set model.image_size to the tower's resolution"
        )
    depth = tower.config.num_hidden_layers
    if not -depth <= vision_feature_layer < depth:
        raise ModelCompositionError(
            f"model.vision_feature_layer {vision_feature_layer} is outside the tower's {depth} layers"
        )
    tokenizer = AutoTokenizer.from_pretrained(language_model)
    add_image_token(tokenizer, video=takes_video(arch))
    chat_template = resolve_chat_template(template, tokenizer.chat_template)
    text_config = AutoConfig.from_pretrained(language_model)
    if takes_video(arch) and anyres_max_tiles is None:
        raise ModelCompositionError(f"arch {arch}: give anyres_max_tiles, N of anyres_max_N (model.anyres_max_tiles)")
    max_tiles = anyres_max_tiles if takes_video(arch) else None
    config = _llava_config(
        arch, tower, text_config, tokenizer, projector, vision_feature_layer, pinpoints, max_tiles,
    )
    try:  # keep the LM's own sampling defaults and stop tokens
        generation_config = GenerationConfig.from_pretrained(language_model)
    except OSError:
        generation_config = GenerationConfig.from_model_config(text_config)
    processor = build_processor(
        arch, tokenizer, AutoImageProcessor.from_pretrained(vision_tower), tower,
        image_size=image_size, chat_template=chat_template, pinpoints=pinpoints, anyres_max_tiles=max_tiles,
    )
    return Composition(config=config, tower=tower, processor=processor,
                       generation_config=generation_config, vocab_size=len(tokenizer),
                       pad_token_id=tokenizer.pad_token_id)


def new_projector(config: PretrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
    """A freshly initialised projector for ``config`` (transformers' own module and initialisation)."""
    with torch.device("meta"):
        projector_class = type(MODEL_CLASSES[config.model_type](config).model.multi_modal_projector)
    return projector_class(config).to(dtype)


def new_image_newline(hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """LLaVA-NeXT's row-end embedding, initialised as the LLaVA-NeXT training code does (randn / sqrt(hidden))."""
    return torch.randn(hidden_size, dtype=dtype) / hidden_size**0.5


def resized_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """An embedding (or output-embedding) matrix with ``rows`` rows: the first ones kept, new ones the mean
    of the old ones. transformers' ``mean_resizing`` samples them around that mean with a 1e-9-scaled
    covariance; the mean itself is the same to ~1e-6, and it is deterministic, so ``compose_llava`` and
    the streamed ``write_composed_llava`` (which never holds the model) write the same bytes."""
    kept = min(rows, weight.shape[0])
    new = weight.mean(dim=0, keepdim=True).expand(rows, *weight.shape[1:]).clone()
    new[:kept] = weight[:kept]
    return new


def resize_vocabulary(model: LlavaModel, rows: int) -> None:
    """Resize the input and output embeddings to ``rows`` tokens, new rows by ``resized_rows``."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    old_embeddings, old_head = embeddings.weight.data, None if head is None or tied else head.weight.data
    model.resize_token_embeddings(rows, mean_resizing=False)
    model.get_input_embeddings().weight.data = resized_rows(old_embeddings, rows)  # a tied head shares it
    if old_head is not None:
        model.get_output_embeddings().weight.data = resized_rows(old_head, rows)


def compose_llava(
    vision_tower: str,
    language_model: str,
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
) -> tuple[LlavaModel, ProcessorMixin]:
    """Compose a new LLaVA model from two pretrained towers, in memory; the projector is freshly initialised.

    ``write_composed_llava`` writes the same checkpoint without ever holding the model in memory (what
    ``jobs.compose`` uses).

    Args:
        vision_tower: CLIP/SigLIP checkpoint (hub id or path), full dual encoder or vision-only.
        language_model: causal LM checkpoint with its tokenizer.
        arch: ``llava``, ``llava_next`` or ``llava_onevision``.
        projector: ``mlp2x_gelu`` or ``linear``.
        vision_feature_layer: hidden layer whose patch features are projected (-2 in LLaVA).
        image_size: tile size; must equal the tower's input resolution.
        image_mode: the mode the exported processor applies: ``square``/``pad`` (llava) or ``anyres``.
        template: conversation template saved with the processor (a recipe's ``data.template``).
        pinpoints: anyres resolutions (llava_next, llava_onevision).
        anyres_max_tiles: N of OneVision's ``anyres_max_N`` (default 9; llava_onevision only).
        dtype: parameter dtype of the loaded towers.

    Returns:
        (model, processor); the tokenizer inside the processor knows the image token.
    """
    plan = plan_composition(vision_tower, language_model, arch=arch, projector=projector,
                            vision_feature_layer=vision_feature_layer, image_size=image_size, template=template,
                            pinpoints=pinpoints, anyres_max_tiles=anyres_max_tiles)
    config = plan.config
    with torch.device("meta"):
        model = MODEL_CLASSES[arch](config)
    # Swap the meta-device towers for the pretrained ones (no second copy of the weights in memory).
    with _only_errors_from_transformers():  # a dual encoder's unused text half is expected, not news
        model.model.vision_tower = AutoModel.from_pretrained(vision_tower, config=plan.tower.config, dtype=dtype,
                                                             use_safetensors=True)
    causal_lm = AutoModelForCausalLM.from_pretrained(language_model, dtype=dtype, use_safetensors=True)
    model.model.language_model = causal_lm.base_model
    model.lm_head = causal_lm.get_output_embeddings()
    model.model.multi_modal_projector = new_projector(config, dtype)
    if tiles_anyres(arch):
        model.model.image_newline = torch.nn.Parameter(new_image_newline(config.text_config.hidden_size, dtype))
    resize_vocabulary(model, plan.vocab_size)
    model.config.pad_token_id = plan.pad_token_id
    model.generation_config = plan.generation_config
    apply_recipe_settings(model, plan.processor, template=template, image_mode=image_mode)
    return model, plan.processor


def apply_recipe_settings(model: LlavaModel, processor: ProcessorMixin, *, template: str, image_mode: str) -> None:
    """Make the checkpoint serve the way the recipe trains: its template, its image mode, its stop token.

    Applied to composed models and to ``model.pretrained`` checkpoints alike, so an exported
    checkpoint's processor and generation config never disagree with the training data.
    """
    arch = model.config.model_type
    allowed = image_modes_for(arch)
    if image_mode not in allowed:
        raise ModelCompositionError(f"arch {arch} serves {' or '.join(allowed)} images, not {image_mode!r}")
    if arch == "llava":
        processor.image_processor.do_pad = image_mode == "pad"
    tokenizer = processor.tokenizer
    processor.chat_template = resolve_chat_template(template, processor.chat_template or tokenizer.chat_template)
    stop = end_token_ids(model.generation_config)
    stop.add(tokenizer.eos_token_id)
    end_of_turn = end_of_turn_token(template, tokenizer)
    if end_of_turn is not None:
        stop.add(tokenizer.convert_tokens_to_ids(end_of_turn))
    model.generation_config.eos_token_id = sorted(stop) if len(stop) > 1 else stop.pop()
    model.generation_config.pad_token_id = tokenizer.pad_token_id


@contextmanager
def _only_errors_from_transformers() -> Iterator[None]:
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def add_image_token(tokenizer, *, video: bool = False) -> None:
    """Give the tokenizer ``<image>`` (and, for OneVision, ``<video>``) as one special token each, and a
    pad token if it lacks one."""
    for token in (IMAGE_PLACEHOLDER, VIDEO_TOKEN) if video else (IMAGE_PLACEHOLDER,):
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens([token], special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token  # what LLaVA does for Vicuna
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})


def _llava_config(
    arch: str,
    tower: VisionTowerInfo,
    text_config: PretrainedConfig,
    tokenizer,
    projector: str,
    vision_feature_layer: int,
    pinpoints: Sequence[tuple[int, int]] | None,
    anyres_max_tiles: int | None,
) -> PretrainedConfig:
    if projector not in PROJECTOR_ACTIVATIONS:
        raise ModelCompositionError(f"unknown projector {projector!r}; allowed: {', '.join(PROJECTOR_ACTIVATIONS)}")
    patches = (tower.config.image_size // tower.config.patch_size) ** 2
    common = dict(
        vision_config=tower.config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        projector_hidden_act=PROJECTOR_ACTIVATIONS[projector],
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=tower.feature_select_strategy,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    if arch == "llava":
        return LlavaConfig(image_seq_length=patches, **common)
    if tiles_anyres(arch) and not pinpoints:
        raise ModelCompositionError(f"{arch} needs model.image_grid_pinpoints")
    if arch == "llava_next":
        return LlavaNextConfig(image_grid_pinpoints=[list(p) for p in pinpoints], **common)
    if arch == "llava_onevision":
        return LlavaOnevisionConfig(image_grid_pinpoints=[list(p) for p in pinpoints],
                                    video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
                                    vision_aspect_ratio=f"anyres_max_{anyres_max_tiles}", **common)
    raise ModelCompositionError(f"unknown arch {arch!r}; allowed: {', '.join(MODEL_CLASSES)}")


def build_processor(
    arch: str,
    tokenizer,
    tower_image_processor,
    tower: VisionTowerInfo,
    *,
    image_size: int,
    chat_template: str,
    pinpoints: Sequence[tuple[int, int]] | None = None,
    anyres_max_tiles: int | None = None,
) -> ProcessorMixin:
    """The processor saved with the checkpoint: the tower's normalisation, our tiling, our template.

    The image mode (``do_pad``) and stop tokens are set by ``apply_recipe_settings``.
    """
    image_kwargs = dict(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(tower_image_processor.image_mean),
        image_std=list(tower_image_processor.image_std),
    )
    processor_kwargs = dict(
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=tower.feature_select_strategy,
        num_additional_image_tokens=1 if tower.has_cls_token else 0,
        image_token=IMAGE_PLACEHOLDER,
        chat_template=chat_template,
    )
    if arch == "llava":
        return LlavaProcessor(image_processor=LlavaImageProcessorPil(**image_kwargs), **processor_kwargs)
    if arch == "llava_onevision":
        return onevision_processor(tokenizer, tower_image_processor, tower, image_size=image_size,
                                   chat_template=chat_template, pinpoints=pinpoints, anyres_max_tiles=anyres_max_tiles)
    image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=[list(p) for p in pinpoints], **image_kwargs)
    return LlavaNextProcessor(image_processor=image_processor, **processor_kwargs)


def onevision_processor(tokenizer, tower_image_processor, tower: VisionTowerInfo, *, image_size: int,
                        chat_template: str, pinpoints: Sequence[tuple[int, int]],
                        anyres_max_tiles: int) -> ProcessorMixin:
    """OneVision's processor: tiles sized ``height`` x ``width`` (the base image squashed, as OneVision's
    processor does), ``anyres_max_N``, and ``<video>``.

    Its video processor, transformers' torchvision code, is built where torchvision is installed and saved
    as settings where not (``onevision_processor.py``).
    """
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=[list(p) for p in pinpoints],
        image_mean=list(tower_image_processor.image_mean), image_std=list(tower_image_processor.image_std),
    )
    patches = (image_size // tower.config.patch_size) ** 2
    return build_onevision_processor(
        tokenizer, image_processor, num_image_tokens=patches + (1 if tower.has_cls_token else 0),
        vision_feature_select_strategy=tower.feature_select_strategy,
        vision_aspect_ratio=f"anyres_max_{anyres_max_tiles}", chat_template=chat_template,
    )


def load_pretrained_llava(name_or_path: str, dtype: torch.dtype = torch.float32,
                          attn_implementation: str | None = None) -> tuple[LlavaModel, ProcessorMixin]:
    """Load an existing LLaVA / LLaVA-NeXT checkpoint in Hugging Face (llava-hf) format.

    The model class comes from the checkpoint's own ``config.json`` (``model_type``), never from
    its folder name. ``attn_implementation`` (``sdpa``, ``flash_attention_2``, ``eager``) picks
    transformers' attention kernel; ``None`` keeps transformers' default. Under ZeRO-3 (a live
    ``transformers.integrations.HfDeepSpeedConfig``), transformers builds the model partitioned
    (``deepspeed.zero.Init``) and loads the weights shard by shard: no rank holds the whole model.
    """
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type not in MODEL_CLASSES:
        raise ModelCompositionError(
            f"{name_or_path}: model_type {config.model_type!r} is not a LLaVA checkpoint; "
            f"supported: {', '.join(MODEL_CLASSES)}"
        )
    refuse_pickled_weights(name_or_path)
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = MODEL_CLASSES[config.model_type].from_pretrained(name_or_path, dtype=dtype, use_safetensors=True,
                                                             **options)
    return model, load_processor(name_or_path)


PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def refuse_pickled_weights(name_or_path: str) -> None:
    """Weights are only ever read from safetensors: a pickle can run code when it is loaded.

    transformers' ``use_safetensors=True`` already never opens a pickle; this names the problem for a
    local folder that only has pickled weights, instead of a "file not found".
    """
    folder = Path(name_or_path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_WEIGHT_SUFFIXES)
    if pickled:
        raise ModelCompositionError(
            f"{name_or_path}: refusing pickled weights ({', '.join(pickled)}); only safetensors are loaded. "
            "Convert them once in a trusted environment: model.save_pretrained(out, safe_serialization=True)"
        )


def load_processor(name_or_path: str) -> ProcessorMixin:
    """A checkpoint's processor with the PIL image backend: the one our tiles are parity-tested against.

    transformers picks its torchvision backend whenever torchvision is installed; that backend
    resizes with other kernels, which would make training tiles and served tiles differ.
    """
    if AutoConfig.from_pretrained(name_or_path).model_type == "llava_onevision":
        return load_onevision_processor(name_or_path)
    return AutoProcessor.from_pretrained(name_or_path, backend="pil")


def save_llava(model: LlavaModel, processor: ProcessorMixin, out_dir: str | Path) -> Path:
    """Write the model and processor as one Hugging Face directory (safetensors, llava-hf key layout)."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    write_llava_hf_layout(out_dir)
    save_processor(processor, out_dir)
    return out_dir


def save_processor(processor: ProcessorMixin, out_dir: str | Path) -> None:
    """``processor.save_pretrained``; OneVision's through ``save_onevision_processor`` (torchvision or not)."""
    if processor.__class__.__name__ == "LlavaOnevisionProcessor":
        save_onevision_processor(processor, out_dir)
    else:
        processor.save_pretrained(out_dir)
