"""Tiny LLaVA, LLaVA-NeXT and LLaVA-OneVision models composed from tiny towers (hidden 32, 2 layers, 56 px tiles)."""

from __future__ import annotations

from llava_platform.model.compose import compose_llava

TILE = 56
PINPOINTS = [(56, 112), (112, 56), (112, 112), (168, 56), (56, 168)]
"""The default LLaVA-NeXT pinpoints scaled from 336 px tiles to 56 px tiles."""
MODEL_ARCHS = ("llava", "llava_next")
ONEVISION_PINPOINTS = [(56 * rows, 56 * cols) for rows in (1, 2, 3) for cols in (1, 2, 3)]
"""OneVision's 1x1..6x6 grids of 384 px, as 1x1..3x3 grids of 56 px tiles."""
ONEVISION_MAX_TILES = 2
"""anyres_max_2: small enough that the tiny grids get scaled down too."""
VLLM_ONEVISION_MAX_TILES = 9
"""anyres_max_9, the published setting and the only one vLLM 0.32 runs (``vllm_engine.VLLM_ONEVISION_ASPECT_RATIO``)."""


def compose(towers: dict[str, str], arch: str, family: str = "clip", projector: str = "mlp2x_gelu",
            mode: str | None = None):
    """``(model, processor)`` of ``arch`` from the session's saved towers (``towers`` fixture)."""
    return compose_llava(
        towers[family], towers["llama"], arch=arch, projector=projector, vision_feature_layer=-2,
        image_size=TILE, image_mode=mode or ("anyres" if arch == "llava_next" else "pad"),
        template="vicuna_v1", pinpoints=PINPOINTS if arch == "llava_next" else None,
    )


def compose_onevision(towers: dict[str, str], max_tiles: int = ONEVISION_MAX_TILES):
    """``(model, processor)`` of a tiny LLaVA-OneVision: SigLIP + Qwen2, as OneVision pairs them."""
    return compose_llava(
        towers["siglip"], towers["qwen2"], arch="llava_onevision", projector="mlp2x_gelu", vision_feature_layer=-2,
        image_size=TILE, image_mode="anyres", template="qwen_1_5", pinpoints=ONEVISION_PINPOINTS,
        anyres_max_tiles=max_tiles,
    )
