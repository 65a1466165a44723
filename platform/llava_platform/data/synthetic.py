"""A small, learnable LLaVA-format dataset with real image files: two coloured shapes per image.

Deterministic from a seed. Images vary in size and aspect ratio (JPEG and PNG); each shows two
shapes of different kinds and colours, side by side or one above the other. Splits:

- ``stage1.json`` (a JSON array): captions, "a red circle to the left of a blue square";
- ``stage2.jsonl`` (JSON lines): multi-turn Q&A, "What colour is the circle?" -> "Red.";
- ``eval.jsonl``: held-out single questions with a gold ``answer``: short answers (``type: short``)
  and ScienceQA-style multiple choice answered with a letter (``type: mc``).

Chance is 1/4 for colour questions (four colours), 1/3 for shapes, 1/4 for multiple choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((245, 245, 245), (200, 200, 200), (60, 60, 60))
LETTERS = "ABCD"
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Scene:
    """Two shapes; ``first`` is left of (or above) ``second``."""

    first: tuple[str, str]  # (colour, shape)
    second: tuple[str, str]
    vertical: bool

    @property
    def relation(self) -> str:
        return "above" if self.vertical else "to the left of"

    def caption(self) -> str:
        (c1, s1), (c2, s2) = self.first, self.second
        return f"a {c1} {s1} {self.relation} a {c2} {s2}"


def _random_scene(rng: np.random.Generator) -> Scene:
    shapes = rng.choice(SHAPES, size=2, replace=False)
    colours = rng.choice(list(COLOURS), size=2, replace=False)
    return Scene((str(colours[0]), str(shapes[0])), (str(colours[1]), str(shapes[1])), bool(rng.integers(2)))


def _draw(scene: Scene, rng: np.random.Generator) -> Image.Image:
    width, height = int(rng.integers(96, 400)), int(rng.integers(96, 400))
    if scene.vertical and height < width:  # leave room for one shape above the other
        width, height = height, width
    image = Image.new("RGB", (width, height), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    draw = ImageDraw.Draw(image)
    halves = [(0, 0, width, height // 2), (0, height // 2, width, height)] if scene.vertical else [
        (0, 0, width // 2, height), (width // 2, 0, width, height)]
    for (colour, shape), (x0, y0, x1, y1) in zip((scene.first, scene.second), halves, strict=True):
        side = int(min(x1 - x0, y1 - y0) * rng.uniform(0.5, 0.8))
        left = x0 + int(rng.integers(0, x1 - x0 - side + 1))
        top = y0 + int(rng.integers(0, y1 - y0 - side + 1))
        box = (left, top, left + side, top + side)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(left + side / 2, top), (left, top + side), (left + side, top + side)], fill=COLOURS[colour])
    return image


def _questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question, short answer, kind) about the scene."""
    out = []
    for colour, shape in (scene.first, scene.second):
        out.append((f"What colour is the {shape}?", f"{colour.capitalize()}.", "colour"))
        out.append((f"Which shape is {colour}?", f"The {shape}.", "shape"))
    (_, s1), (_, s2) = scene.first, scene.second
    where = "above" if scene.vertical else "left of"
    out.append((f"Is the {s1} {where} the {s2}?", "Yes.", "relation"))
    out.append((f"Is the {s2} {where} the {s1}?", "No.", "relation"))
    rng.shuffle(out)
    return out


def _multiple_choice(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    colour, shape = scene.first if rng.integers(2) else scene.second
    options = list(rng.permutation(list(COLOURS)))
    lines = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    return f"What colour is the {shape}?\n{lines}\n{MC_SUFFIX}", LETTERS[options.index(colour)]


def _save(image: Image.Image, folder: Path, name: str, rng: np.random.Generator) -> str:
    fmt = "jpg" if rng.integers(2) else "png"
    relative = f"images/{name}.{fmt}"
    image.save(folder / relative, quality=95) if fmt == "jpg" else image.save(folder / relative)
    return relative


def write_synthetic_dataset(
    out_dir: str | Path, *, train: int = 200, eval: int = 100, seed: int = 0
) -> dict[str, Path]:
    """Write images and the three splits under ``out_dir``; return the split files by name.

    Args:
        train: records in each of the stage-1 and stage-2 splits (they share the images).
        eval: held-out records (new images), half short-answer, half multiple-choice.
        seed: everything is a pure function of it.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stage1, stage2, held_out = [], [], []
    for i in range(train):
        scene = _random_scene(rng)
        image = _save(_draw(scene, rng), out_dir, f"train_{i:05d}", rng)
        stage1.append({"id": f"cap-{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": scene.caption()},
        ]})
        turns = _questions(scene, rng)[: int(rng.integers(2, 4))]
        mc_question, mc_letter = _multiple_choice(scene, rng)
        if rng.integers(2):
            turns.append((mc_question, mc_letter, "mc"))
        conversation = []
        for k, (question, answer, _) in enumerate(turns):
            conversation.append({"from": "human", "value": f"<image>\n{question}" if k == 0 else question})
            conversation.append({"from": "gpt", "value": answer})
        stage2.append({"id": f"qa-{i}", "image": image, "conversations": conversation})
    for i in range(eval):
        scene = _random_scene(rng)
        image = _save(_draw(scene, rng), out_dir, f"eval_{i:05d}", rng)
        if i % 2:
            question, answer = _multiple_choice(scene, rng)
            kind = "mc"
        else:
            question, answer, _ = next(q for q in _questions(scene, rng) if q[2] != "relation")
            kind = "short"
        held_out.append({"id": f"eval-{i}", "image": image, "type": kind, "answer": answer, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer},
        ]})
    files = {"stage1": out_dir / "stage1.json", "stage2": out_dir / "stage2.jsonl", "eval": out_dir / "eval.jsonl"}
    files["stage1"].write_text(json.dumps(stage1, indent=1))
    files["stage2"].write_text("".join(json.dumps(r) + "\n" for r in stage2))
    files["eval"].write_text("".join(json.dumps(r) + "\n" for r in held_out))
    return files
