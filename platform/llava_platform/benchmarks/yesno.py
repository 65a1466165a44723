"""Yes/no benchmarks: POPE (object hallucination) and MME (perception and cognition).

Prompt: the question (MME's without its " Please answer yes or no."), then LLaVA-1.5's short-answer suffix.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from llava_platform.benchmarks.base import (
    SHORT_ANSWER,
    BenchmarkFormatError,
    LlavaIds,
    Loaded,
    Question,
    Source,
    mean,
)
from llava_platform.benchmarks.rules import mme_yes_no, pope_yes_no

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_LLAVA_OFFSETS = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
"""LLaVA's ``llava_pope_test.jsonl``: question_id = the split's offset + POPE's own question id."""


def _pope_llava_ids() -> LlavaIds:
    def ours(answer: Mapping) -> str | None:
        number = int(answer["question_id"])
        split = answer.get("category") or max((offset, name) for name, offset in POPE_LLAVA_OFFSETS.items()
                                              if offset <= number)[1]
        offset = POPE_LLAVA_OFFSETS.get(split)
        return None if offset is None else f"{split}/{number - offset}"

    def theirs(qid: str) -> dict:
        split, number = qid.split("/", 1)
        return {"question_id": POPE_LLAVA_OFFSETS[split] + int(number), "category": split}

    return LlavaIds("question_id = POPE's id + 0 (adversarial), 10000000 (random) or 20000000 (popular), as in "
                    "llava_pope_test.jsonl", ours, theirs)


def load_pope(source: Source) -> Loaded:
    """``coco_pope_<split>.json`` (one JSON object per line), any of the three splits; ids ``<split>/<id>``."""
    found = [split for split in POPE_SPLITS if source.first(f"coco_pope_{split}.json")]
    if not found:
        raise BenchmarkFormatError("pope", source.uri(""), "coco_pope_random.json, coco_pope_popular.json and/or "
                                   "coco_pope_adversarial.json")
    rows, labels = [], {}
    for split in found:
        for item in source.read_jsonl(f"coco_pope_{split}.json", '{"question_id", "image", "text", "label"} per line',
                                      lambda row: {"question_id", "image", "text", "label"} <= set(row)
                                      and row["label"] in ("yes", "no")):
            qid = f"{split}/{item['question_id']}"
            rows.append(Question(qid, f"{item['text']}\n{SHORT_ANSWER}", source.image("val2014", item["image"])))
            labels[qid] = item["label"]

    def score(replies: Mapping[str, str], judge) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for split in found:
            pairs = [(pope_yes_no(reply), labels[qid]) for qid, reply in replies.items() if qid.startswith(split + "/")]
            metrics |= {f"{split}/{name}": value for name, value in pope_metrics(pairs).items()}
        metrics["f1"] = mean(metrics[f"{split}/f1"] for split in found)
        metrics["accuracy"] = mean(metrics[f"{split}/accuracy"] for split in found)
        return metrics

    return Loaded(rows, score, notes=[f"splits: {', '.join(found)}; f1 and accuracy averaged over them"],
                  llava=_pope_llava_ids(), scored_on=f"COCO {'/'.join(found)}, F1 averaged; image")


def pope_metrics(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (``yes`` is the positive class) and the share of ``yes`` replies,
    from (predicted, gold) pairs — POPE's ``eval_pope.py``."""
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pairs) if pairs else 0.0, "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / len(pairs) if pairs else 0.0}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
MME_YES_NO = " Please answer yes or no."
"""Taken out of MME's questions before the short-answer suffix goes on (LLaVA's ``llava_mme.jsonl``, lmms-eval)."""


def load_mme(source: Source) -> Loaded:
    """``MME_Benchmark_release_version/<category>/``: each image with a ``.txt`` of two lines
    ``question<TAB>answer`` — beside the image, or in ``images/`` and ``questions_answers_YN/``."""
    rows, gold, image_of, by_question, path_of = [], {}, {}, {}, {}
    categories = [c for c in MME_PERCEPTION + MME_COGNITION if source.files(c)]
    if not categories:
        raise BenchmarkFormatError("mme", source.uri(""), "MME's category folders (existence/, count/, ..., "
                                   "code_reasoning/) with images and question .txt files")
    for category in categories:
        files = source.files(category)
        images = {name.rsplit("/", 1)[1].rsplit(".", 1)[0]: name for name in files
                  if name.lower().endswith(IMAGE_SUFFIXES)}
        for text_file in (name for name in files if name.endswith(".txt")):
            stem = text_file.rsplit("/", 1)[1].removesuffix(".txt")
            if stem not in images:
                raise BenchmarkFormatError("mme", source.uri(text_file), f"an image named {stem}.jpg/.png beside it "
                                           "or in the category's images/")
            image_name = images[stem].rsplit("/", 1)[1]
            lines = [line for line in source.read_bytes(text_file).decode("utf-8").splitlines() if line.strip()]
            for number, line in enumerate(lines):
                parts = line.split("\t")
                if len(parts) != 2 or parts[1].strip() not in ("Yes", "No"):
                    raise BenchmarkFormatError("mme", f"{source.uri(text_file)} line {number + 1}",
                                               "'question<TAB>Yes' or 'question<TAB>No'")
                qid = f"{category}/{image_name}/{number}"
                question = parts[0].strip().replace(MME_YES_NO, "")
                rows.append(Question(qid, f"{question}\n{SHORT_ANSWER}", source.uri(images[stem])))
                gold[qid] = parts[1].strip().lower()
                image_of[qid] = f"{category}/{image_name}"
                by_question[(category, image_name, question)] = qid
                path_of[qid] = images[stem]

    def score(replies: Mapping[str, str], judge) -> dict[str, float]:
        return mme_scores({qid: mme_yes_no(reply) == gold[qid] for qid, reply in replies.items()}, image_of)

    def ours(answer: Mapping) -> str | None:
        path = str(answer["question_id"])  # "code_reasoning/0020.png", "artwork/images/14777.jpg"
        question = str(answer.get("prompt", "")).split("\n")[0].strip().replace(MME_YES_NO, "")
        return by_question.get((path.split("/", 1)[0], path.rsplit("/", 1)[-1], question))

    llava = LlavaIds("question_id = the image's path in MME_Benchmark_release_version (two questions each), told "
                     "apart by the prompt's first line, as in llava_mme.jsonl", ours,
                     lambda qid: {"question_id": path_of[qid], "category": qid.split("/", 1)[0]})
    return Loaded(rows, score, notes=[f"{len(categories)} of 14 categories"], llava=llava,
                  scored_on=f"{sum(c in categories for c in MME_PERCEPTION)} of 10 perception subtasks; image")


def mme_scores(right: Mapping[str, bool], image_of: Mapping[str, str]) -> dict[str, float]:
    """MME's ``calculation.py``: per category, accuracy (questions right) and accuracy+ (images with both
    questions right), each ×100, summed to the category's score; perception sums its 10 categories
    (max 2000), cognition its 4 (max 800).

    Args:
        right: question id (``<category>/<image>/<n>``) -> answered right.
        image_of: question id -> ``<category>/<image>``.
    """
    by_category: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for qid, ok in right.items():
        by_category[qid.split("/", 1)[0]][image_of[qid]].append(ok)
    metrics: dict[str, float] = {}
    for category, images in by_category.items():
        answers = [ok for oks in images.values() for ok in oks]
        accuracy = 100 * mean(answers)
        accuracy_plus = 100 * mean(float(all(oks)) for oks in images.values())
        metrics |= {f"{category}/accuracy": accuracy, f"{category}/accuracy_plus": accuracy_plus,
                    f"{category}/score": accuracy + accuracy_plus}
    metrics["perception"] = sum(metrics.get(f"{c}/score", 0.0) for c in MME_PERCEPTION)
    metrics["cognition"] = sum(metrics.get(f"{c}/score", 0.0) for c in MME_COGNITION)
    return metrics
