"""A small, learnable LLaVA-format dataset with real image files: two coloured shapes per image.

Deterministic from a seed. Images vary in size and aspect ratio (JPEG and PNG); each shows two
shapes of different kinds and colours, side by side or one above the other. Splits:

- ``stage1.json`` (a JSON array): captions, "a red circle to the left of a blue square";
- ``stage2.jsonl`` (JSON lines): one question per image about which colour is where, of the two
  kinds the held-out split asks: "What colour is the left shape?" -> "Red.", or the same question
  as multiple choice answered with the option's letter;
- ``eval.jsonl``: held-out questions on new images with a gold ``answer`` and a ``type``:
  ``short`` (the colour word) or ``mc`` (ScienceQA style, the letter);
- ``preference.jsonl`` and ``preference_eval.jsonl``: the same questions as preference records (LLaVA-NeXT's
  DPO format, ``data.preference``) on the training and the held-out images: ``chosen`` the gold answer,
  ``rejected`` wrong in one controlled way, the *other* shape's colour (right colours, wrong place: the
  mistake of a model that has not learnt where to look).

With ``onevision_frames`` (a LLaVA-OneVision recipe), the questions of ``stage2.jsonl`` and
``eval.jsonl`` rotate through three kinds of record: the colour question on one image (as above), a
two-image question ("Which image shows the red shape?" -> "First." / "Second.", chance 1/2) and a
video question ("In which frame does the shape turn blue?" -> "Frame 3.", chance 1 / (frames - 1)):
a shape that is one colour and turns blue at one of the frames the loader samples (``data/video.py``).

Both kinds have a chance level of 1/4 (four colours; four options), and answering takes the pixels
at the right place: a model that knows which colours are in the picture but not where scores 1/2.
The options of a multiple-choice question always come in the same order (A. red, B. green,
C. blue, D. yellow). With shuffled options the answer also needs in-context copying (find the
colour among the options, emit the letter before it), which real LLMs bring from pretraining and
the demo's tiny random LM does not learn within minutes (measured: no progress in 2000 steps of
text-only training); the evaluation code scores shuffled options all the same.
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

    @property
    def positions(self) -> tuple[str, str]:
        """Where ``first`` and ``second`` are, as words: ("left", "right") or ("top", "bottom")."""
        return ("top", "bottom") if self.vertical else ("left", "right")

    def caption(self) -> str:
        (c1, s1), (c2, s2) = self.first, self.second
        return f"a {c1} {s1} {self.relation} a {c2} {s2}"


def _random_scene(rng: np.random.Generator) -> Scene:
    shapes = rng.choice(SHAPES, size=2, replace=False)
    colours = rng.choice(list(COLOURS), size=2, replace=False)
    return Scene((str(colours[0]), str(shapes[0])), (str(colours[1]), str(shapes[1])), bool(rng.integers(2)))


def _draw(scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int, int]]]]:
    """The picture, and each shape's name and box (x0, y0, x1, y1) in pixels."""
    # Sizes vary, aspect ratios stay within 3:4 and 4:3 so that each shape still covers several
    # vision-tower patches once the picture is padded and scaled to the tile size.
    width = int(rng.integers(96, 400))
    height = int(width * rng.uniform(0.75, 1.33))
    if scene.vertical != (height > width):  # the longer side holds both shapes
        width, height = height, width
    image = Image.new("RGB", (width, height), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    draw = ImageDraw.Draw(image)
    boxes = []
    halves = [(0, 0, width, height // 2), (0, height // 2, width, height)] if scene.vertical else [
        (0, 0, width // 2, height), (width // 2, 0, width, height)]
    for (colour, shape), (x0, y0, x1, y1) in zip((scene.first, scene.second), halves, strict=True):
        side = int(min(x1 - x0, y1 - y0) * rng.uniform(0.6, 0.9))
        left = x0 + int(rng.integers(0, x1 - x0 - side + 1))
        top = y0 + int(rng.integers(0, y1 - y0 - side + 1))
        box = (left, top, left + side, top + side)
        boxes.append((shape, box))
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(left + side / 2, top), (left, top + side), (left + side, top + side)], fill=COLOURS[colour])
    return image, boxes


def _colour_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """"What colour is the left shape?" about a random one of the two shapes: (question, its colour, the other
    shape's colour)."""
    k = int(rng.integers(2))
    colours = (scene.first[0], scene.second[0])
    return f"What colour is the {scene.positions[k]} shape?", colours[k], colours[1 - k]


def _multiple_choice(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """The colour question with the four colours as lettered options: (question, the letter, the other shape's)."""
    question, colour, other = _colour_question(scene, rng)
    lines = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(COLOURS))
    letter = {name: LETTERS[i] for i, name in enumerate(COLOURS)}
    return f"{question}\n{lines}\n{MC_SUFFIX}", letter[colour], letter[other]


def _question(scene: Scene, rng: np.random.Generator, kind: str) -> tuple[str, str, str]:
    """(question, gold answer, the other shape's answer) of the given kind (``short`` or ``mc``) about the scene."""
    if kind == "mc":
        return _multiple_choice(scene, rng)
    question, colour, other = _colour_question(scene, rng)
    return question, f"{colour.capitalize()}.", f"{other.capitalize()}."


def _preference(record_id: str, image: str, question: str, answer: str, wrong: str, **extra) -> dict:
    """A preference record of one question: the gold answer chosen, the other shape's rejected."""
    return {"id": record_id, "image": image, "prompt": question, "chosen": answer, "rejected": wrong, **extra}


def _save(image: Image.Image, folder: Path, name: str, rng: np.random.Generator) -> str:
    fmt = "jpg" if rng.integers(2) else "png"
    relative = f"images/{name}.{fmt}"
    image.save(folder / relative, quality=95) if fmt == "jpg" else image.save(folder / relative)
    return relative


ORDINALS = ("First.", "Second.")
VIDEO_FPS = 4


def _two_images(rng: np.random.Generator, out_dir: Path, name: str) -> tuple[list[str], str, str]:
    """Two pictures of one shape each, in different colours; (paths, question, answer)."""
    colours = [str(c) for c in rng.choice(list(COLOURS), size=2, replace=False)]
    paths = []
    for k, colour in enumerate(colours):
        side = int(rng.integers(64, 160))
        image = Image.new("RGB", (side, side), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
        margin = side // 8
        ImageDraw.Draw(image).rectangle((margin, margin, side - margin, side - margin), fill=COLOURS[colour])
        paths.append(_save(image, out_dir, f"{name}_{k}", rng))
    k = int(rng.integers(2))
    return paths, f"Which image shows the {colours[k]} shape?", ORDINALS[k]


def _turning_video(rng: np.random.Generator, out_dir: Path, name: str, frames: int) -> tuple[str, str, str]:
    """A video whose shape turns blue at one of the frames the loader samples; (path, question, answer)."""
    import av  # FFmpeg through PyAV, as data/video.py decodes it

    from llava_platform.data.video import sample_frame_indices

    total = 2 * frames  # more frames than are sampled, so the sampling is exercised
    sampled = sample_frame_indices(total, frames)
    turn = int(rng.integers(1, frames))  # the sampled frame (0-based) where it is blue first
    start = str(rng.choice([c for c in COLOURS if c != "blue"]))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    relative = f"images/{name}.mp4"
    with av.open(str(out_dir / relative), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
        stream.width = stream.height = 96
        stream.pix_fmt, stream.bit_rate = "yuv420p", 4_000_000
        for index in range(total):
            picture = Image.new("RGB", (96, 96), background)
            colour = "blue" if index >= sampled[turn] else start
            ImageDraw.Draw(picture).ellipse((16, 16, 80, 80), fill=COLOURS[colour])
            container.mux(stream.encode(av.VideoFrame.from_image(picture)))
        container.mux(stream.encode())
    return relative, "In which frame does the shape turn blue?", f"Frame {turn + 1}."


def _onevision_record(i: int, split: str, rng: np.random.Generator, out_dir: Path, frames: int) -> dict:
    """The i-th record of a OneVision split: one image, two images or a video, in turn."""
    name = f"{split}_{i:05d}"
    if i % 3 == 0:
        scene = _random_scene(rng)
        image = _save(_draw(scene, rng)[0], out_dir, name, rng)
        question, answer, _ = _question(scene, rng, "short")
        return {"id": f"{split}-{i}", "image": image, "type": "short", "answer": answer, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}
    if i % 3 == 1:
        images, question, answer = _two_images(rng, out_dir, name)
        return {"id": f"{split}-{i}", "image": images, "type": "short", "answer": answer, "conversations": [
            {"from": "human", "value": f"<image>\n<image>\n{question}"}, {"from": "gpt", "value": answer}]}
    video, question, answer = _turning_video(rng, out_dir, name, frames)
    return {"id": f"{split}-{i}", "video": video, "type": "short", "answer": answer, "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def write_synthetic_dataset(
    out_dir: str | Path, *, train: int = 200, eval: int = 100, seed: int = 0, captions: int | None = None,
    onevision_frames: int | None = None,
) -> dict[str, Path]:
    """Write images and the three splits under ``out_dir``; return the split files by name.

    Args:
        train: stage-2 records, one question on an image of its own (half short, half multiple choice).
        eval: held-out records on new images, alternately short-answer and multiple-choice.
        seed: everything is a pure function of it.
        captions: stage-1 caption records, on the first ``captions`` training images (default: all).
        onevision_frames: write OneVision questions (one image, two images, video in turn) with videos
            sampled to this many frames; ``None``: single-image questions only.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / SETTINGS_FILE).unlink(missing_ok=True)  # an interrupted rewrite is never taken for complete
    rng = np.random.default_rng(seed)
    captions = train if captions is None else min(captions, train)
    stage1, stage2, held_out, pairs, held_out_pairs = [], [], [], [], []
    for i in range(train):
        scene = _random_scene(rng)
        image = _save(_draw(scene, rng)[0], out_dir, f"train_{i:05d}", rng)
        if i < captions:
            stage1.append({"id": f"cap-{i}", "image": image, "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": scene.caption()},
            ]})
        if onevision_frames:
            record = _onevision_record(i, "qa", rng, out_dir, onevision_frames)
            stage2.append({k: v for k, v in record.items() if k not in ("type", "answer")})
            continue
        question, answer, wrong = _question(scene, rng, "mc" if rng.integers(2) else "short")
        stage2.append({"id": f"qa-{i}", "image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer},
        ]})
        pairs.append(_preference(f"pref-{i}", image, question, answer, wrong))
    for i in range(eval):
        if onevision_frames:
            held_out.append(_onevision_record(i, "eval", rng, out_dir, onevision_frames))
            continue
        scene = _random_scene(rng)
        image = _save(_draw(scene, rng)[0], out_dir, f"eval_{i:05d}", rng)
        kind = "mc" if i % 2 else "short"
        question, answer, wrong = _question(scene, rng, kind)
        held_out.append({"id": f"eval-{i}", "image": image, "type": kind, "answer": answer, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer},
        ]})
        held_out_pairs.append(_preference(f"pref-eval-{i}", image, question, answer, wrong, type=kind))
    files = split_files(out_dir, onevision=bool(onevision_frames))
    files["stage1"].write_text(json.dumps(stage1, indent=1))
    files["stage2"].write_text("".join(json.dumps(r) + "\n" for r in stage2))
    files["eval"].write_text("".join(json.dumps(r) + "\n" for r in held_out))
    if not onevision_frames:
        files["preference"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
        files["preference_eval"].write_text("".join(json.dumps(r) + "\n" for r in held_out_pairs))
    if onevision_frames:  # the same records as three sources of a LLaVA-NeXT data YAML, one per kind of input
        for kind, path in ONEVISION_SOURCES.items():
            records = [r for r in stage2 if _kind(r) == kind]
            (out_dir / path).write_text("".join(json.dumps(r) + "\n" for r in records))
        files["stage2_mixture"].write_text("datasets:\n" + "".join(
            f"  - json_path: {out_dir / path}\n    sampling_strategy: all\n" for path in ONEVISION_SOURCES.values()))
    (out_dir / SETTINGS_FILE).write_text(json.dumps(_settings(train, eval, seed, captions, onevision_frames)))
    return files


SETTINGS_FILE = "synthetic.json"
"""Written last into ``out_dir``: what the folder was generated with (see ``existing_dataset``)."""
GENERATOR_VERSION = 6
"""Bumped whenever the generator's output changes, so that older folders are not reused."""


ONEVISION_SOURCES = {"image": "stage2_one_image.jsonl", "multi_image": "stage2_two_images.jsonl",
                     "video": "stage2_video.jsonl"}
"""OneVision's stage-2 records by kind of input: the sources of ``stage2_mixture.yaml``."""


def split_files(out_dir: str | Path, *, onevision: bool = False) -> dict[str, Path]:
    """The split files by name; single-image data also has the preference pairs (``preference``,
    ``preference_eval``), OneVision data ``stage2_mixture``, a LLaVA-NeXT data YAML over the stage-2 records in
    three sources (``ONEVISION_SOURCES``)."""
    out_dir = Path(out_dir)
    files = {"stage1": out_dir / "stage1.json", "stage2": out_dir / "stage2.jsonl", "eval": out_dir / "eval.jsonl"}
    if onevision:
        return {**files, "stage2_mixture": out_dir / "stage2_mixture.yaml"}
    return {**files, "preference": out_dir / "preference.jsonl", "preference_eval": out_dir / "preference_eval.jsonl"}


def _kind(record: dict) -> str:
    return "video" if "video" in record else "multi_image" if isinstance(record["image"], list) else "image"


def existing_dataset(out_dir: str | Path, *, train: int, eval: int, seed: int,
                     captions: int | None = None, onevision_frames: int | None = None) -> dict[str, Path] | None:
    """The split files of a complete earlier ``write_synthetic_dataset`` with the same arguments, else ``None``."""
    settings = Path(out_dir) / SETTINGS_FILE
    expected = _settings(train, eval, seed, captions, onevision_frames)
    if not settings.is_file() or json.loads(settings.read_text()) != expected:
        return None
    return split_files(out_dir, onevision=bool(onevision_frames))


def _settings(train: int, eval: int, seed: int, captions: int | None,
              onevision_frames: int | None = None) -> dict[str, int]:
    captions = train if captions is None else min(captions, train)
    settings = {"version": GENERATOR_VERSION, "train": train, "eval": eval, "seed": seed, "captions": captions}
    return {**settings, "onevision_frames": onevision_frames} if onevision_frames else settings


def write_coco_style(out_dir: str | Path, *, images: int, seed: int = 0) -> tuple[Path, Path]:
    """Synthetic COCO-style annotations for the data generation job: ``captions.json`` (five captions per
    image) and ``instances.json`` (each shape's box in pixels, ``[x, y, w, h]``, category = its kind), with
    the images in ``images/``. Returns (captions file, instances file)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": shape} for i, shape in enumerate(SHAPES)]
    category_id = {c["name"]: c["id"] for c in categories}
    entries, captions, instances = [], [], []
    for i in range(images):
        scene = _random_scene(rng)
        image, boxes = _draw(scene, rng)
        name = _save(image, out_dir, f"coco_{i:05d}", rng)
        entries.append({"id": i, "file_name": name, "width": image.width, "height": image.height})
        (c1, s1), (c2, s2) = scene.first, scene.second
        for text in (scene.caption(), f"A {c1} {s1} and a {c2} {s2}.", f"Two shapes: a {s1} and a {s2}.",
                     f"A picture with a {c1} shape and a {c2} shape.", f"The {c2} {s2} is next to a {c1} {s1}."):
            captions.append({"id": len(captions), "image_id": i, "caption": text})
        for shape, (x0, y0, x1, y1) in boxes:
            instances.append({"id": len(instances), "image_id": i, "category_id": category_id[shape],
                              "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    (out_dir / "captions.json").write_text(json.dumps({"images": entries, "annotations": captions}))
    (out_dir / "instances.json").write_text(json.dumps({"images": entries, "annotations": instances,
                                                        "categories": categories}))
    return out_dir / "captions.json", out_dir / "instances.json"
