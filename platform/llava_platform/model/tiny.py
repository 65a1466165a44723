"""Tiny random-weight towers saved in the same layout as their hub counterparts: the ``model.tiny`` source.

A model source like ``model.pretrained`` or ``model.vision_tower`` + ``model.language_model``
(``config/build.py`` picks it from the recipe). Tests, benchmarks and the CPU demo compose LLaVA
models from these through the very code path that loads ``openai/clip-vit-large-patch14-336`` and
``lmsys/vicuna-7b-v1.5``: a full CLIP (or SigLIP) model directory with its image processor, and a
Llama causal LM directory with a fast tokenizer. Nothing is downloaded; weights are a pure function
of the sizes and the seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipConfig,
    SiglipModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

# Special tokens of the chat templates we ship, so every template tokenises cleanly in tests.
TEMPLATE_SPECIAL_TOKENS = [
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]",
]
_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is in the image? ASSISTANT: A red square on a blue background.",
    "What colour is the shape? Which shape is it? How many shapes are there? Answer with the letter.",
    "red green blue yellow black white circle square triangle left right top bottom one two three four",
    "A. B. C. D. The answer is yes no system user assistant",
    # the words of the synthetic dataset (data/synthetic.py), so they are whole tokens as in a real vocabulary
    "Red. Green. Blue. Yellow. Left. Right. Top. Bottom. Yes. No. Describe the image briefly.",
    "What colour is the left shape? What colour is the bottom shape? Where is the red shape? Is the blue shape "
    "left of the green shape? Is the yellow shape above the red shape? a green circle to the left of a yellow "
    "triangle, a blue square above a red circle",
    "Answer with the option's letter from the given choices directly.",
]


def build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (covers any text) with Llama-style special tokens and BOS handling."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", *TEMPLATE_SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    bos = tokenizer.token_to_id("<s>")  # prepend BOS on plain calls, as Llama tokenizers do
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=TEMPLATE_SPECIAL_TOKENS,
    )


LANGUAGE_FAMILIES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def save_tiny_language_model(
    out_dir: str | Path,
    *,
    family: str = "llama",
    tie_word_embeddings: bool = False,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    vocab_size: int = 320,
    seed: int = 0,
) -> Path:
    """Save a tiny causal LM (Llama, Mistral or Qwen2) and its tokenizer, like a hub checkpoint."""
    if family not in LANGUAGE_FAMILIES:
        raise ValueError(f"unknown language family {family!r}; allowed: {', '.join(LANGUAGE_FAMILIES)}")
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(vocab_size)
    config = LANGUAGE_FAMILIES[family](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_tiny_vision_tower(
    out_dir: str | Path,
    *,
    family: str = "clip",
    image_size: int = 56,
    patch_size: int,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    position_scale: float = 1.0,
    seed: int = 0,
) -> Path:
    """Save a tiny dual-encoder (CLIP or SigLIP, text + vision) with its image processor.

    Real vision towers ship as full dual-encoder checkpoints; composing from one exercises the same
    "take the vision half" path as ``openai/clip-vit-large-patch14-336``.

    Args:
        position_scale: multiplies the vision position embeddings after random initialisation.
            Both they and the patch projection start at std 0.02, but the projection sums
            3 x patch² pixels, so a random tower's patch features barely say where a patch is; a
            pretrained ViT's do. 10-15 gives the tiny tower that property (the CPU demo's
            "where is the red shape?" questions need it).
    """
    out_dir = Path(out_dir)
    vision = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    text = {"hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_hidden_layers": 1,
            "num_attention_heads": heads, "vocab_size": 64, "max_position_embeddings": 16,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    torch.manual_seed(seed)
    if family == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden_size))
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    elif family == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    else:
        raise ValueError(f"unknown vision family {family!r}; allowed: clip, siglip")
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.mul_(position_scale)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
