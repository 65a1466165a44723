"""The memory planner's activation term against the activations a training step really keeps.

    python -m jobs.perf.activations            # LLaVA, NeXT and OneVision, with and without checkpointing
    python -m jobs.perf.activations --quick    # smaller models and sequences (what the unit test runs)

A LLaVA model (CLIP + Llama), a LLaVA-NeXT (CLIP + Llama, anyres tiles) and a LLaVA-OneVision (SigLIP + Qwen2,
anyres tiles) are built from configs at a few hundred hidden units and run one forward and backward on CPU.
Every tensor autograd saves for the backward pass goes through ``torch.autograd.graph.saved_tensors_hooks``,
which counts the bytes of its storage while the graph holds it (parameters left out: they are the model
states, not activations); the peak over forward and backward is the measured activation memory. Gradient
checkpointing is measured with the reentrant implementation, whose recomputation these hooks see: it keeps the
same tensors as transformers' default non-reentrant one (each block's input; one block recomputed at a time).
``train.memory.saved_activation_bytes`` predicts that peak from the shapes and the token and tile counts;
the last line gives the worst ratio planned / measured over every case (target: within 25 %).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from llava_platform.train.memory import StageSetup, saved_activation_bytes, shape_from_config

ARCHS = ("llava", "llava_next", "llava_onevision")


@dataclass(frozen=True)
class Case:
    arch: str
    checkpointing: bool
    tunable: tuple[str, ...]
    precision: str = "fp32"


STAGE2, STAGE1 = ("projector", "language_model"), ("projector",)
CASES = [Case(arch, checkpointing, STAGE2) for arch in ARCHS for checkpointing in (False, True)] + \
    [Case("llava", checkpointing, STAGE1) for checkpointing in (False, True)] + \
    [Case("llava_onevision", checkpointing, (*STAGE2, "vision_tower")) for checkpointing in (False, True)] + \
    [Case("llava_next", checkpointing, STAGE2, "bf16") for checkpointing in (False, True)]
"""Stage 2 (language model tuned) of each architecture, stage 1 (projector only: the language model frozen,
gradients flowing through it), OneVision's tuned tower, and bf16."""


class SavedTensors:
    """Bytes of the tensors autograd holds for the backward pass, now and at their peak (each storage once)."""

    def __init__(self, model: torch.nn.Module):
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live: dict[int, list[int]] = {}  # storage -> [references held by the graph, bytes]
        self.bytes = self.peak = 0

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda held: held.tensor)

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.parameters or tensor.device.type == "meta":
            return _Held(tensor, None, self)
        entry = self.live.setdefault(ptr, [0, storage.nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        return _Held(tensor, ptr, self)

    def release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[ptr]


class _Held:
    """What the graph keeps for one saved tensor: dropping it (after its backward) releases the bytes."""

    def __init__(self, tensor, ptr, counter):
        self.tensor, self.ptr, self.counter = tensor, ptr, counter

    def __del__(self):
        if self.ptr is not None:
            self.counter.release(self.ptr)


def build(arch: str, *, hidden: int, layers: int, vocab: int, dtype: torch.dtype):
    """A LLaVA model of ``arch`` from configs: a ``hidden``-wide language model, a half-wide vision tower."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tower = dict(hidden_size=hidden // 2, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                 image_size=56, patch_size=14)
    text = dict(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                num_attention_heads=4, vocab_size=vocab, max_position_embeddings=8192)
    common = dict(image_token_id=vocab - 1, vision_feature_layer=-2)
    torch.manual_seed(0)
    if arch == "llava":
        config = LlavaConfig(vision_config=CLIPVisionConfig(**tower), text_config=LlamaConfig(**text), **common)
        model = LlavaForConditionalGeneration(config)
    elif arch == "llava_next":
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(**tower), text_config=LlamaConfig(**text),
                                 image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]], **common)
        model = LlavaNextForConditionalGeneration(config)
    else:
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**tower),
                                      text_config=Qwen2Config(**text, num_key_value_heads=2),
                                      image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                                      vision_aspect_ratio="anyres_max_9", **common)
        model = LlavaOnevisionForConditionalGeneration(config)
    return model.to(dtype)


def inputs_for(model, arch: str, tokens: int, dtype: torch.dtype) -> tuple[dict, int, int]:
    """One sample of ``tokens`` tokens with one image (its image tokens included): ``(inputs, tiles, image tokens)``."""
    config = model.config
    if arch == "llava":
        pixel_values, image_tokens, tiles = torch.randn(1, 3, 56, 56, dtype=dtype), 16, 1
        extra = {}
    else:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        tiles = image_size_to_num_patches((112, 112), config.image_grid_pinpoints, 56)
        pixel_values = torch.randn(1, tiles, 3, 56, 56, dtype=dtype)
        extra = {"image_sizes": torch.tensor([[112, 112]])}
        features = model.get_image_features(pixel_values=pixel_values, image_sizes=extra["image_sizes"],
                                            **({"vision_aspect_ratio": config.vision_aspect_ratio}
                                               if arch == "llava_onevision" else {}))
        image_tokens = sum(f.shape[0] for f in (features.pooler_output if hasattr(features, "pooler_output")
                                                else features))
    ids = torch.randint(0, config.text_config.vocab_size - 1, (1, tokens))
    ids[0, 1:1 + image_tokens] = config.image_token_id
    return dict(input_ids=ids, pixel_values=pixel_values, labels=ids.clone(), **extra), tiles, image_tokens


def measured(model, inputs: dict) -> int:
    """Peak bytes of saved tensors over one forward and backward."""
    counter = SavedTensors(model)
    with counter.hooks():
        model(**inputs).loss.backward()
    return counter.peak


def planned(model, case: Case, tokens: int, tiles: int) -> int:
    config = model.config
    vision = shape_from_config(config.vision_config.to_dict(), image_size=56)
    lm = shape_from_config(config.text_config.to_dict())
    setup = StageSetup(lm=lm, tower=vision, projector_params=0, tunable=case.tunable, lora_rank=None, lora_targets=(),
                       zero_stage=0, offload_optimizer=False, precision=case.precision, world_size=1,
                       micro_batch_size=1, max_length=tokens, tiles_per_sample=tiles,
                       gradient_checkpointing=case.checkpointing)
    return saved_activation_bytes(setup)


def run_case(case: Case, *, hidden: int, layers: int, vocab: int, tokens: int) -> tuple[int, int]:
    """``(planned, measured)`` bytes of one case."""
    dtype = torch.float32 if case.precision == "fp32" else torch.bfloat16
    model = build(case.arch, hidden=hidden, layers=layers, vocab=vocab, dtype=dtype).train()
    for name, param in model.named_parameters():
        part = ("vision_tower" if ".vision_tower." in f".{name}" else "projector" if "multi_modal_projector" in name
                or "image_newline" in name else "language_model")
        param.requires_grad_(part in case.tunable)
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    inputs, tiles, _ = inputs_for(model, case.arch, tokens, dtype)
    return planned(model, case, tokens, tiles), measured(model, inputs)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, 384 tokens")
    args = parser.parse_args(argv)
    size = dict(hidden=128, layers=2, vocab=1024, tokens=384) if args.quick else \
        dict(hidden=512, layers=4, vocab=4096, tokens=1024)
    print(f"language model hidden {size['hidden']}, {size['layers']} layers, vocabulary {size['vocab']}; "
          f"one sample of {size['tokens']} tokens with one image; saved-tensor bytes, peak over forward + backward")
    worst = 1.0
    for case in CASES:
        plan, real = run_case(case, **size)
        ratio = plan / real
        worst = ratio if abs(ratio - 1) > abs(worst - 1) else worst
        print(f"{case.arch:<16}{case.precision:<5}{'checkpointing' if case.checkpointing else 'all kept':<14}"
              f"{'+'.join(case.tunable):<40} planned {plan / 2**20:8.1f} MiB  measured {real / 2**20:8.1f} MiB  "
              f"{ratio:5.2f}", flush=True)
    print(f"activations planned/measured, worst case: {worst:.2f}")
    return worst


if __name__ == "__main__":
    main()
