"""The three LLaVA architectures and what each does with images: the one rule every layer reads.

``llava`` is transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5: one square tile per image),
``llava_next`` its ``LlavaNextForConditionalGeneration`` (anyres grids of tiles), ``llava_onevision`` its
``LlavaOnevisionForConditionalGeneration`` (a lone image anyres, ``anyres_max_<N>``; the images of a
several-image record and a video's frames one base-size tile each). Nothing here imports anything.
"""

from __future__ import annotations

ARCHS = ("llava", "llava_next", "llava_onevision")

IMAGE_MODES: dict[str, tuple[str, ...]] = {"llava": ("square", "pad"), "llava_next": ("anyres",),
                                           "llava_onevision": ("anyres",)}
"""The image modes each arch trains and serves."""


def image_modes_for(arch: str) -> tuple[str, ...]:
    """The image modes ``arch`` can train and serve (``()`` for unknown archs)."""
    return IMAGE_MODES.get(arch, ())


def tiles_anyres(arch: str) -> bool:
    """Whether ``arch`` tiles images into anyres grids (and so needs pinpoints and ``image_sizes``)."""
    return "anyres" in image_modes_for(arch)


def takes_video(arch: str) -> bool:
    """Whether ``arch`` takes several images per record and videos (OneVision)."""
    return arch == "llava_onevision"
