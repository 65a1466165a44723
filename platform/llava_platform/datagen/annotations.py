"""What the teacher model is told about an image: its captions and its labelled object boxes.

Two inputs give the same ``ImageContext`` rows:

- COCO-style annotations: a captions file (``{"images": [{"id", "file_name", "width", "height"}],
  "annotations": [{"image_id", "caption"}]}``) and an instances file (``{"images": [...],
  "annotations": [{"image_id", "bbox": [x, y, w, h], "category_id"}], "categories": [{"id", "name"}]}``),
  boxes in pixels;
- LLaVA-style JSON lines for other sources: ``{"id", "image", "captions": [...], "boxes": [{"label",
  "bbox": [x1, y1, x2, y2]}]}`` with boxes already normalised to 0-1.

Boxes are normalised ``[x1, y1, x2, y2]`` (fractions of the width and height), as in the LLaVA paper's
prompts. Files are local or ``s3://``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from llava_platform import storage


class AnnotationFormatError(ValueError):
    """An annotations file that is missing or not in the expected layout; names the file and what was expected."""

    def __init__(self, file: str, expected: str):
        super().__init__(f"{file}: expected {expected}")
        self.file, self.expected = file, expected


@dataclass(frozen=True)
class Box:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float

    def text(self) -> str:
        return f"{self.label}: [{self.x1:.3f}, {self.y1:.3f}, {self.x2:.3f}, {self.y2:.3f}]"


@dataclass(frozen=True)
class ImageContext:
    """One image as the teacher sees it (never the pixels)."""

    id: str
    image: str
    """The image's path as the output records name it (relative to the training data's image root)."""
    captions: tuple[str, ...]
    boxes: tuple[Box, ...]


def read_bytes(uri: str, s3_endpoint_url: str | None = None) -> bytes:
    try:
        return storage.read_bytes(uri, s3_endpoint_url)
    except FileNotFoundError as error:
        raise AnnotationFormatError(uri, "an annotations file (it does not exist)") from error


def _json(uri: str, expected: str, s3_endpoint_url: str | None) -> Any:
    try:
        return json.loads(read_bytes(uri, s3_endpoint_url))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationFormatError(uri, f"{expected} (not JSON: {error})") from error


def read_coco(captions: str, instances: str, s3_endpoint_url: str | None = None) -> list[ImageContext]:
    """Images with at least one caption, each with its captions (file order) and boxes (normalised)."""
    caps = _json(captions, 'COCO captions: {"images": [...], "annotations": [{"image_id", "caption"}]}',
                 s3_endpoint_url)
    inst = _json(instances, 'COCO instances: {"images", "annotations": [{"image_id", "bbox", "category_id"}], '
                 '"categories": [{"id", "name"}]}', s3_endpoint_url)
    try:
        images = {image["id"]: image for image in caps["images"] + inst["images"]}
        texts: dict[Any, list[str]] = defaultdict(list)
        for note in caps["annotations"]:
            texts[note["image_id"]].append(note["caption"].strip())
        names = {category["id"]: category["name"] for category in inst["categories"]}
        boxes: dict[Any, list[Box]] = defaultdict(list)
        for note in inst["annotations"]:
            image = images[note["image_id"]]
            x, y, w, h = note["bbox"]
            width, height = image["width"], image["height"]
            boxes[note["image_id"]].append(Box(names[note["category_id"]], x / width, y / height,
                                               (x + w) / width, (y + h) / height))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        expected = f"COCO captions and instances files with images (id, file_name, width, height) ({error!r})"
        raise AnnotationFormatError(f"{captions} / {instances}", expected) from error
    return [ImageContext(str(image_id), images[image_id]["file_name"], tuple(texts[image_id]),
                         tuple(boxes.get(image_id, ()))) for image_id in sorted(texts, key=str)]


def read_contexts(path: str, s3_endpoint_url: str | None = None) -> list[ImageContext]:
    """LLaVA-style JSON lines: ``{"id", "image", "captions": [...], "boxes": [{"label", "bbox"}]}``."""
    expected = '{"id", "image", "captions": [...], "boxes": [{"label", "bbox": [x1, y1, x2, y2] in 0-1}]} per line'
    contexts = []
    for number, line in enumerate(read_bytes(path, s3_endpoint_url).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            boxes = tuple(Box(str(b["label"]), *map(float, b["bbox"])) for b in row.get("boxes", []))
            if not row["captions"] or any(not 0 <= v <= 1 for b in boxes for v in (b.x1, b.y1, b.x2, b.y2)):
                raise ValueError("captions empty or a box outside 0-1")
            contexts.append(ImageContext(str(row["id"]), str(row["image"]), tuple(map(str, row["captions"])), boxes))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise AnnotationFormatError(f"{path} line {number}", f"{expected} ({error})") from error
    return contexts
