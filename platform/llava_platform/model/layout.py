"""The llava-hf key layout: how every checkpoint we write names its tensors, so vLLM, SGLang and the hub load it.

transformers 5.x holds a CLIP or SigLIP tower without its ``vision_model`` wrapper and, on
``save_pretrained``, writes ``vision_tower.embeddings.*`` / ``vision_tower.encoder.*``. Every
llava-hf checkpoint on the hub, and vLLM's loader, name them ``vision_tower.vision_model.*``
(the ``CLIPVisionModel`` / ``SiglipVisionModel`` layout). transformers loads both (its conversion
rules strip the wrapper), with identical weights; so we write the layout everyone reads:

    llava_hf_name("vision_tower.encoder.layers.0.mlp.fc1.weight")
    -> "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"

The language model (``language_model.model.*``, ``language_model.lm_head.weight``), the projector
(``multi_modal_projector.*``) and NeXT's ``image_newline`` are already in that layout when
transformers saves them.
"""

from __future__ import annotations

import json
from pathlib import Path

VISION_TOWER = "vision_tower."
VISION_MODEL = "vision_tower.vision_model."


def llava_hf_name(name: str) -> str:
    """A saved tensor name in the llava-hf layout (a vision-tower tensor gains ``vision_model.``)."""
    if name.startswith(VISION_TOWER) and not name.startswith(VISION_MODEL):
        return VISION_MODEL + name[len(VISION_TOWER):]
    return name


def write_llava_hf_layout(folder: str | Path) -> int:
    """Rename the tensors of a saved checkpoint ``folder`` to the llava-hf layout, one shard at a time.

    Each shard that needs it is rewritten beside itself and moved into place (a crash leaves the old
    shard, never half a new one); the index, if any, follows. Returns the number of tensors renamed.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    renamed = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            names = list(f.keys())
            if all(llava_hf_name(n) == n for n in names):
                continue
            metadata = f.metadata() or {"format": "pt"}
            tensors = {llava_hf_name(n): f.get_tensor(n) for n in names}
        renamed += sum(llava_hf_name(n) != n for n in names)
        partial = shard.with_name(shard.name + ".partial")
        save_file(tensors, str(partial), metadata=metadata)
        partial.replace(shard)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        content = json.loads(index.read_text())
        content["weight_map"] = {llava_hf_name(n): file for n, file in content["weight_map"].items()}
        index.write_text(json.dumps(content, indent=2))
    return renamed
