"""Tiny LLaVA and LLaVA-NeXT models composed from tiny towers (hidden 32, 2 layers, 56 px tiles)."""

from __future__ import annotations

from llava_platform.model.compose import compose_llava

TILE = 56
PINPOINTS = [(56, 112), (112, 56), (112, 112), (168, 56), (56, 168)]
"""The default LLaVA-NeXT pinpoints scaled from 336 px tiles to 56 px tiles."""
MODEL_ARCHS = ("llava", "llava_next")


def compose(towers: dict[str, str], arch: str, family: str = "clip", projector: str = "mlp2x_gelu",
            mode: str | None = None):
    """``(model, processor)`` of ``arch`` from the session's saved towers (``towers`` fixture)."""
    return compose_llava(
        towers[family], towers["llama"], arch=arch, projector=projector, vision_feature_layer=-2,
        image_size=TILE, image_mode=mode or ("anyres" if arch == "llava_next" else "pad"),
        template="vicuna_v1", pinpoints=PINPOINTS if arch == "llava_next" else None,
    )
