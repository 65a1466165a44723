"""Open-ended short-answer benchmarks: VQAv2, VizWiz, TextVQA (VQA accuracy) and GQA (exact match).

Prompt: the question, then LLaVA-1.5's short-answer suffix (VizWiz: the 'Unanswerable' line first;
TextVQA's OCR variant: the image's OCR tokens first, as LLaVA's own evaluation adds them).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping

from llava_platform.benchmarks.base import (
    SHORT_ANSWER,
    UNANSWERABLE,
    BenchmarkFormatError,
    LlavaIds,
    Loaded,
    Question,
    Source,
    mean,
    same_ids,
)
from llava_platform.benchmarks.rules import (
    evalai_answer,
    gqa_normalize,
    textvqa_accuracy,
    vizwiz_accuracy,
    vqav2_accuracy,
)

VQAV2_SPLITS = {  # split -> (questions file, annotations file or None, image folder, image file prefix)
    "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014",
            "COCO_val2014_"),
    "test-dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015", "COCO_test2015_"),
}
VQAV2_TEST_ALL = "v2_OpenEnded_mscoco_test2015_questions.json"
"""The full test2015 question list: the evaluation server wants an answer for each (LLaVA fills the
questions outside test-dev with "")."""


def _is_questions(data) -> bool:
    first = data["questions"][0] if data["questions"] else {}
    return isinstance(data["questions"], list) and (not first or {"question_id", "image_id", "question"} <= set(first))


def _by_type(scores: Mapping[str, float], types: Mapping[str, str]) -> dict[str, float]:
    grouped: dict[str, list[float]] = defaultdict(list)
    for question_id, score in scores.items():
        grouped[types[question_id]].append(score)
    return {f"accuracy/{kind}": mean(values) for kind, values in sorted(grouped.items()) if kind}


def load_vqav2(source: Source) -> Loaded:
    split = next((name for name, files in VQAV2_SPLITS.items() if source.first(files[0])), None)
    if split is None:
        raise BenchmarkFormatError("vqav2", source.uri(""), "the VQAv2 questions file: one of "
                                   + ", ".join(files[0] for files in VQAV2_SPLITS.values()))
    questions_file, annotations_file, folder, prefix = VQAV2_SPLITS[split]
    questions = source.read_json(questions_file, '{"questions": [{"question_id", "image_id", "question"}, ...]}',
                                 _is_questions)["questions"]
    rows = [Question(str(q["question_id"]), f"{q['question']}\n{SHORT_ANSWER}",
                     source.image(folder, f"{prefix}{int(q['image_id']):012d}.jpg")) for q in questions]
    if annotations_file is None:
        return Loaded(rows, lambda replies, judge: {}, submission=lambda replies: _vqav2_submission(source, replies),
                      notes=["test-dev: no answers published; writes the submission file for the evaluation server"],
                      llava=VQAV2_LLAVA_IDS, scored_on="test-dev: the server scores the submission file; image")
    annotations = source.read_json(
        annotations_file, '{"annotations": [{"question_id", "answers": [{"answer"}, ...], "answer_type"}, ...]}',
        lambda data: all("answers" in a and "question_id" in a for a in data["annotations"][:1]))["annotations"]
    gold = {str(a["question_id"]): a for a in annotations}

    def score(replies: Mapping[str, str], judge) -> dict[str, float]:
        scores = {qid: vqav2_accuracy(reply, [a["answer"] for a in gold[qid]["answers"]])
                  for qid, reply in replies.items() if qid in gold}
        return {"accuracy": mean(scores.values()),
                **_by_type(scores, {qid: gold[qid].get("answer_type", "") for qid in scores})}

    return Loaded(rows, score, notes=[f"split {split}"], llava=VQAV2_LLAVA_IDS,
                  scored_on=f"{split}, scored here by the server's rule; image")


VQAV2_LLAVA_IDS = same_ids("question_id = VQA's question id (llava_vqav2_mscoco_test-dev2015.jsonl)", numbers=True)


def _vqav2_submission(source: Source, replies: Mapping[str, str]) -> tuple[str, bytes]:
    answers = {int(qid): evalai_answer(reply) for qid, reply in replies.items()}
    if source.exists(VQAV2_TEST_ALL):
        every = source.read_json(VQAV2_TEST_ALL, '{"questions": [...]}', _is_questions)["questions"]
        answers = {int(q["question_id"]): answers.get(int(q["question_id"]), "") for q in every}
    rows = [{"question_id": qid, "answer": answer} for qid, answer in answers.items()]
    return "vqav2_test-dev_submission.json", json.dumps(rows).encode()


VIZWIZ_FILES = {"val.json": "val", "test.json": "test"}


def load_vizwiz(source: Source) -> Loaded:
    name = source.first(*VIZWIZ_FILES)
    if name is None:
        raise BenchmarkFormatError("vizwiz", source.uri(""), "VizWiz's val.json (or test.json)")
    items = source.read_json(name, '[{"image", "question", "answers": [{"answer"}, ...] (val)}, ...]',
                             lambda data: isinstance(data, list) and all({"image", "question"} <= set(d)
                                                                         for d in data[:1]))
    folder = VIZWIZ_FILES[name]
    rows = [Question(item["image"], f"{item['question']}\n{UNANSWERABLE}\n{SHORT_ANSWER}",
                     source.image(folder, item["image"])) for item in items]
    if folder == "test":
        def submission(replies: Mapping[str, str]) -> tuple[str, bytes]:
            rows = [{"image": image, "answer": evalai_answer(reply)} for image, reply in replies.items()]
            return "vizwiz_test_submission.json", json.dumps(rows).encode()
        return Loaded(rows, lambda replies, judge: {}, submission=submission,
                      notes=["test: writes the submission file"], llava=_vizwiz_llava_ids(items),
                      scored_on="test: the server scores the submission file; image")
    gold = {item["image"]: item for item in items}

    def score(replies: Mapping[str, str], judge) -> dict[str, float]:
        scores = {image: vizwiz_accuracy(reply, [a["answer"] for a in gold[image]["answers"]])
                  for image, reply in replies.items()}
        return {"accuracy": mean(scores.values()),
                **_by_type(scores, {image: gold[image].get("answer_type", "") for image in scores})}

    return Loaded(rows, score, notes=["split val"], llava=_vizwiz_llava_ids(items),
                  scored_on="val, scored here by VizWiz's rule; image")


def _vizwiz_llava_ids(items: list[dict]) -> LlavaIds:
    """LLaVA's ``llava_test.jsonl``: ``question_id`` = the question's position in VizWiz's file, ``image`` its
    image (our id)."""
    def ours(answer: Mapping) -> str | None:
        if "image" in answer:
            return str(answer["image"])
        position = int(answer["question_id"])
        return items[position]["image"] if 0 <= position < len(items) else None

    position = {item["image"]: number for number, item in enumerate(items)}
    return LlavaIds("question_id = the position in VizWiz's file (0, 1, ...), or the image with --question-file",
                    ours, lambda qid: {"question_id": position[qid], "image": qid})


TEXTVQA_QUESTIONS = "TextVQA_0.5.1_val.json"
TEXTVQA_OCR = "TextVQA_Rosetta_OCR_v0.2_val.json"


def load_textvqa(source: Source) -> Loaded:
    """Every question twice: ``ocr/<id>`` with LLaVA's "Reference OCR token:" line (the paper's 58.2) and
    ``plain/<id>`` without it (``accuracy_no_ocr``)."""
    data = source.read_json(TEXTVQA_QUESTIONS, '{"data": [{"question_id", "question", "image_id", "answers"}, ...]}',
                            lambda d: all({"question_id", "question", "image_id", "answers"} <= set(q)
                                          for q in d["data"][:1]))["data"]
    ocr = source.read_json(TEXTVQA_OCR, '{"data": [{"image_id", "ocr_tokens": [...]}, ...]} (Rosetta OCR)',
                           lambda d: all({"image_id", "ocr_tokens"} <= set(o) for o in d["data"][:1]))["data"]
    tokens = {item["image_id"]: item["ocr_tokens"] for item in ocr}
    rows = []
    for q in data:
        image = source.image("train_images", f"{q['image_id']}.jpg")
        hint = f"Reference OCR token: {', '.join(tokens.get(q['image_id'], []))}"  # kept when empty, as LLaVA does
        rows.append(Question(f"ocr/{q['question_id']}", f"{q['question']}\n{hint}\n{SHORT_ANSWER}", image))
        rows.append(Question(f"plain/{q['question_id']}", f"{q['question']}\n{SHORT_ANSWER}", image))
    gold = {str(q["question_id"]): q["answers"] for q in data}

    def score(replies: Mapping[str, str], judge) -> dict[str, float]:
        variant: dict[str, list[float]] = defaultdict(list)
        for qid, reply in replies.items():
            kind, question_id = qid.split("/", 1)
            variant[kind].append(textvqa_accuracy(reply, gold[question_id]))
        return {"accuracy": mean(variant["ocr"]), "accuracy_no_ocr": mean(variant["plain"])}

    by_image_and_question = {(q["image_id"], q["question"].lower()): str(q["question_id"]) for q in data}
    image_of = {str(q["question_id"]): q["image_id"] for q in data}

    def ours(answer: Mapping) -> str | None:
        lines = str(answer.get("prompt", "")).split("\n")  # LLaVA's eval_textvqa.py: the first line, lower-cased
        question_id = by_image_and_question.get((str(answer["question_id"]), lines[0].lower()))
        kind = "ocr" if any(line.startswith("Reference OCR token:") for line in lines) else "plain"
        return None if question_id is None else f"{kind}/{question_id}"

    llava = LlavaIds("question_id = the image id, told apart by the prompt's first line (the question), "
                     "as in llava_textvqa_val_v051_ocr.jsonl", ours,
                     lambda qid: {"question_id": image_of[qid.split("/", 1)[1]]})
    return Loaded(rows, score, notes=["accuracy: with LLaVA's OCR-token line; accuracy_no_ocr: without"],
                  llava=llava, scored_on="val, with OCR tokens in the prompt; image")


GQA_QUESTIONS = "testdev_balanced_questions.json"


def load_gqa(source: Source) -> Loaded:
    questions = source.read_json(GQA_QUESTIONS, '{"<question id>": {"imageId", "question", "answer"}, ...}',
                                 lambda d: isinstance(d, dict) and all({"imageId", "question", "answer"} <= set(q)
                                                                       for q in list(d.values())[:1]))
    rows = [Question(qid, f"{q['question']}\n{SHORT_ANSWER}", source.image("images", f"{q['imageId']}.jpg"))
            for qid, q in questions.items()]

    def score(replies: Mapping[str, str], judge) -> dict[str, float]:
        right = {qid: float(gqa_normalize(reply) == questions[qid]["answer"]) for qid, reply in replies.items()}
        types = {qid: questions[qid].get("types", {}).get("structural", "") for qid in right}
        return {"accuracy": mean(right.values()), **_by_type(right, types)}

    return Loaded(rows, score, llava=same_ids("question_id = GQA's question id (llava_gqa_testdev_balanced.jsonl)"),
                  scored_on="testdev-balanced, exact match; image")
