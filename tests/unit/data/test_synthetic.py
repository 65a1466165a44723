"""The synthetic dataset: deterministic, well-formed, and answerable from the image."""

import json

import numpy as np
from PIL import Image

from llava_platform.data.synthetic import COLOURS, LETTERS, MC_SUFFIX, write_synthetic_dataset


def load(path):
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]


def test_deterministic_from_the_seed(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", train=12, eval=6, seed=3)
    b = write_synthetic_dataset(tmp_path / "b", train=12, eval=6, seed=3)
    c = write_synthetic_dataset(tmp_path / "c", train=12, eval=6, seed=4)
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
    assert a["stage2"].read_bytes() != c["stage2"].read_bytes()
    first = load(a["stage1"])[0]["image"]
    assert (tmp_path / "a" / first).read_bytes() == (tmp_path / "b" / first).read_bytes()


def test_splits_are_well_formed(tmp_path):
    files = write_synthetic_dataset(tmp_path, train=30, eval=20, seed=0)
    stage1, stage2, held_out = (load(files[s]) for s in ("stage1", "stage2", "eval"))
    assert (len(stage1), len(stage2), len(held_out)) == (30, 30, 20)
    sizes = set()
    for record in stage1 + stage2 + held_out:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        sizes.add(Image.open(tmp_path / record["image"]).size)
    assert len(sizes) > 20  # varied sizes and aspect ratios
    assert {r["type"] for r in held_out} == {"short", "mc"}
    mc = [r for r in stage2 if MC_SUFFIX in r["conversations"][0]["value"]]
    assert 0 < len(mc) < len(stage2) and all(r["conversations"][1]["value"] in LETTERS for r in mc)
    assert not {r["image"] for r in held_out} & {r["image"] for r in stage1}  # held out


def test_captions_cover_the_first_training_images(tmp_path):
    files = write_synthetic_dataset(tmp_path, train=12, eval=2, seed=0, captions=5)
    stage1, stage2 = load(files["stage1"]), load(files["stage2"])
    assert [r["image"] for r in stage1] == [r["image"] for r in stage2[:5]]


def pixels_near(image: np.ndarray, half: str, colour: str) -> int:
    """How many pixels in the named half of an (H, W, 3) image are close to ``colour``."""
    height, width = image.shape[:2]
    part = {"left": image[:, : width // 2], "right": image[:, width // 2:],
            "top": image[: height // 2], "bottom": image[height // 2:]}[half]
    return int((np.abs(part.reshape(-1, 3).astype(int) - COLOURS[colour]).sum(axis=1) < 40).sum())


def test_answers_are_grounded_in_the_pixels(tmp_path):
    """The gold colour of every held-out answer is drawn in the half the question names, and not in the other."""
    files = write_synthetic_dataset(tmp_path, train=1, eval=30, seed=1)
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    for record in load(files["eval"]):
        question = record["conversations"][0]["value"]
        if record["type"] == "mc":
            options = dict(line.split(". ", 1) for line in question.splitlines()
                           if line[:2] in {f"{x}." for x in LETTERS})
            colour = options[record["answer"]]
        else:
            colour = record["answer"].rstrip(".").lower()
        where = next(word for word in opposite if f"the {word} shape" in question)
        image = np.asarray(Image.open(tmp_path / record["image"]).convert("RGB"))
        assert pixels_near(image, where, colour) > 50, (record["id"], where, colour)
        assert pixels_near(image, opposite[where], colour) < 5, (record["id"], where, colour)
