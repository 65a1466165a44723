"""LLaVA-OneVision's processor, built, saved and loaded with or without torchvision.

transformers' ``LlavaOnevisionProcessor`` has three parts: the tokenizer, the (PIL) image processor and
``LlavaOnevisionVideoProcessor``, which is torchvision code. Our CPU machines install the CPU build of
torch, and no CPU build of torchvision matching it is on their package index (PyPI's wheel is the
CUDA build, which does not import next to a CPU torch), so here:

- the processor is built without a video processor (``video_processor=None``): everything the platform
  does with it (tokenizer, image tiling settings, ``vision_aspect_ratio``, templates) is there, and
  our frames come from ``data/video.py`` + ``tiling.tile_frames`` anyway;
- it is saved in exactly the files ``save_pretrained`` writes, with the video processor's settings
  (size, normalisation, bicubic) written into ``processor_config.json`` as transformers would, so that
  plain transformers with torchvision loads the whole processor (``AutoProcessor``), videos included
  (tested in the vLLM environment, which has torchvision);
- it is loaded through ``AutoProcessor`` where torchvision exists, and from its parts where not.

Where torchvision is installed (GPU machines), the real video processor is built and saved as usual.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.utils import is_torchvision_available

from llava_platform.data.templates import IMAGE_PLACEHOLDER, VIDEO_TOKEN

PROCESSOR_CONFIG = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def video_processor_settings(image_size: int, image_mean: Sequence[float], image_std: Sequence[float]) -> dict:
    """What ``LlavaOnevisionVideoProcessor`` saves for frames of ``image_size`` px with the tower's normalisation."""
    return {
        "video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": image_size, "width": image_size},
        "image_mean": list(image_mean), "image_std": list(image_std), "resample": 3, "do_resize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "do_sample_frames": False, "default_to_square": False,
    }


def build_onevision_processor(tokenizer, image_processor: LlavaOnevisionImageProcessorPil, *, num_image_tokens: int,
                              vision_feature_select_strategy: str, vision_aspect_ratio: str,
                              chat_template: str | None) -> LlavaOnevisionProcessor:
    """A ``LlavaOnevisionProcessor``; its video processor is transformers' own where torchvision is installed."""
    video_processor = None
    if is_torchvision_available():
        from transformers import LlavaOnevisionVideoProcessor

        video_processor = LlavaOnevisionVideoProcessor(
            size=dict(image_processor.size), image_mean=list(image_processor.image_mean),
            image_std=list(image_processor.image_std))
    options = dict(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                   num_image_tokens=num_image_tokens, vision_feature_select_strategy=vision_feature_select_strategy,
                   chat_template=chat_template, image_token=IMAGE_PLACEHOLDER, video_token=VIDEO_TOKEN,
                   vision_aspect_ratio=vision_aspect_ratio)
    if video_processor is not None:
        return LlavaOnevisionProcessor(**options)
    # transformers checks each part's class against a registry whose video entry, without torchvision, is
    # a placeholder that fails on lookup; the check is skipped for the absent video processor only.
    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    check = processor.check_argument_for_proper_class
    processor.check_argument_for_proper_class = lambda name, arg: None if arg is None else check(name, arg)
    processor.__init__(**options)
    del processor.check_argument_for_proper_class
    return processor


def save_onevision_processor(processor: LlavaOnevisionProcessor, out_dir: str | Path) -> None:
    """``processor.save_pretrained(out_dir)``, also for a processor built without torchvision (see above)."""
    if processor.video_processor is not None:
        processor.save_pretrained(out_dir)
        return
    out_dir = Path(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    image = processor.image_processor
    config = processor.to_dict()
    config.pop("chat_template", None)
    config["video_processor"] = video_processor_settings(image.size["height"], image.image_mean, image.image_std)
    (out_dir / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if processor.chat_template:
        (out_dir / CHAT_TEMPLATE_FILE).write_text(processor.chat_template)


def load_onevision_processor(name_or_path: str) -> LlavaOnevisionProcessor:
    """A saved OneVision processor: ``AutoProcessor`` where torchvision is installed, its parts where not."""
    if is_torchvision_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name_or_path, backend="pil")
    folder = Path(name_or_path)
    config = json.loads((folder / PROCESSOR_CONFIG).read_text())
    image = {k: v for k, v in config["image_processor"].items() if k != "image_processor_type"}
    template = folder / CHAT_TEMPLATE_FILE
    return build_onevision_processor(
        AutoTokenizer.from_pretrained(name_or_path), LlavaOnevisionImageProcessorPil(**image),
        num_image_tokens=config["num_image_tokens"],
        vision_feature_select_strategy=config["vision_feature_select_strategy"],
        vision_aspect_ratio=config["vision_aspect_ratio"],
        chat_template=template.read_text() if template.exists() else None,
    )
