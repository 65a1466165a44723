"""Tiny copies of the LLaVA-1.5 benchmarks in their published layouts, with answers whose scores are
worked out by hand from the official rules (``CASES``).

``write_benchmark(name, root)`` writes one benchmark's files (and small images) under ``root`` and returns
what ``--annotations`` takes. ``CASES[name]`` holds replies ``{question_id: text}`` and the metrics they
must score, each with the working in a comment.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def image_bytes(color: str = "red", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), COLORS[color]).save(buffer, format=fmt)
    return buffer.getvalue()


def _image(path: Path, color: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(color, "JPEG" if path.suffix == ".jpg" else "PNG"))


def _json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_vqav2(root: Path) -> Path:
    _json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"question_id": 1, "image_id": 42, "question": "What color is the square?"},
        {"question_id": 2, "image_id": 43, "question": "How many circles are there?"}]})
    _json(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 1, "image_id": 42, "answer_type": "other", "multiple_choice_answer": "red",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["red"] * 4 + ["orange"] * 6)]},
        {"question_id": 2, "image_id": 43, "answer_type": "number", "multiple_choice_answer": "3",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["2"] * 2 + ["3"] * 8)]}]})
    _image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    _image(root / "val2014" / "COCO_val2014_000000000043.jpg", "blue")
    return root


def write_gqa(root: Path) -> Path:
    _json(root / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Is the square red?", "answer": "yes", "types": {"structural": "verify"}},
        "202": {"imageId": "n2", "question": "What color is it?", "answer": "red", "types": {"structural": "query"}}})
    _image(root / "images" / "n1.jpg")
    _image(root / "images" / "n2.jpg")
    return root


def write_vizwiz(root: Path) -> Path:
    _json(root / "val.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answer_type": "unanswerable",
         "answerable": 0, "answers": [{"answer": a, "answer_confidence": "yes"}
                                      for a in ["unanswerable"] * 3 + [f"thing {i}" for i in range(7)]]},
        {"image": "VizWiz_val_00000001.jpg", "question": "What drink is this?", "answer_type": "other",
         "answerable": 1, "answers": [{"answer": "coffee", "answer_confidence": "yes"}] * 10}])
    _image(root / "val" / "VizWiz_val_00000000.jpg")
    _image(root / "val" / "VizWiz_val_00000001.jpg")
    return root


def write_textvqa(root: Path) -> Path:
    _json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "question": "what brand is the phone?", "image_id": "abc1",
         "answers": ["nokia"] * 10, "set_name": "val"},
        {"question_id": 34603, "question": "what is written?", "image_id": "abc2", "answers": ["stop"] * 10,
         "set_name": "val"}]})
    _json(root / "TextVQA_Rosetta_OCR_v0.2_val.json",
          {"data": [{"image_id": "abc1", "ocr_tokens": ["nokia", "phone"]}]})
    _image(root / "train_images" / "abc1.jpg")
    _image(root / "train_images" / "abc2.jpg")
    return root


def write_pope(root: Path) -> Path:
    for split in ("random", "popular"):
        _jsonl(root / f"coco_pope_{split}.json", [
            {"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a square in the image?",
             "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a dog in the image?",
             "label": "no"}])
    _image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    return root


def write_mme(root: Path) -> Path:
    """Both published layouts: ``existence/`` and ``code_reasoning/`` with the .txt beside the image,
    ``artwork/`` with ``images/`` and ``questions_answers_YN/``."""
    for category, layout, images in (("existence", "beside", ("1", "2")), ("artwork", "split", ("10",)),
                                     ("code_reasoning", "beside", ("0020",))):
        for stem in images:
            image = root / category / ("images" if layout == "split" else "") / f"{stem}.jpg"
            text = root / category / ("questions_answers_YN" if layout == "split" else "") / f"{stem}.txt"
            _image(image)
            text.parent.mkdir(parents=True, exist_ok=True)
            text.write_text("Is there a square in this image? Please answer yes or no.\tYes\n"
                            "Is there a dog in this image? Please answer yes or no.\tNo\n")
    return root


def write_scienceqa(root: Path) -> Path:
    _json(root / "problems.json", {
        "10": {"question": "Which animal is a pet here?", "choices": ["cat", "dog", "fish"], "answer": 1,
               "hint": "A pet.", "image": "image.png", "split": "test", "subject": "natural science"},
        "11": {"question": "Which word is a noun?", "choices": ["run", "table"], "answer": 1, "hint": "",
               "image": None, "split": "test", "subject": "language science"},
        "12": {"question": "Is the square red?", "choices": ["yes", "no"], "answer": 0, "hint": "",
               "image": "image.png", "split": "test", "subject": "natural science"},
        "13": {"question": "Train only?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
               "split": "train", "subject": "social science"}})
    _json(root / "pid_splits.json", {"train": ["13"], "val": [], "test": ["10", "11", "12"]})
    _image(root / "images" / "test" / "10" / "image.png")
    _image(root / "images" / "test" / "12" / "image.png")
    return root


MMBENCH_ROWS = {
    "en": [("0", "What shape is shown?", "", ["circle", "square", "triangle"], "B", "shape"),
           ("1", "What color is it?", "Look closely.", ["red", "blue"], "A", "color")],
    "cn": [("0", "图中是什么形状？", "", ["圆形", "正方形", "三角形"], "B", "shape"),
           ("1", "它是什么颜色？", "仔细看。", ["红色", "蓝色"], "A", "color")],
}


def write_mmbench(root: Path, language: str = "en") -> Path:
    name = "mmbench_dev_20230712.tsv" if language == "en" else "mmbench_dev_cn_20231003.tsv"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    lines = ["\t".join(header)]
    picture = base64.b64encode(image_bytes()).decode()
    for index, question, hint, options, answer, category in MMBENCH_ROWS[language]:
        padded = options + ["nan"] * (4 - len(options))
        lines.append("\t".join([index, question, hint, *padded, answer, category, picture, "tests", "l2", "", "dev"]))
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / name


def write_seed(root: Path) -> Path:
    _json(root / "SEED-Bench.json", {
        "question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10},
        "questions": [
            {"question_id": "s1", "question": "What is the scene?", "choice_a": "a square", "choice_b": "a beach",
             "choice_c": "a road", "choice_d": "a room", "answer": "A", "data_id": "1_1.jpg", "data_type": "image",
             "question_type_id": 1},
            {"question_id": "s2", "question": "What object is it?", "choice_a": "dog", "choice_b": "cat",
             "choice_c": "square", "choice_d": "tree", "answer": "C", "data_id": "2_2.jpg", "data_type": "image",
             "question_type_id": 2},
            {"question_id": "v1", "question": "What happens?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
             "choice_d": "d", "answer": "A", "data_id": "clip.mp4", "data_type": "video", "question_type_id": 10}]})
    _image(root / "SEED-Bench-image" / "1_1.jpg")
    _image(root / "SEED-Bench-image" / "2_2.jpg")
    return root


def write_llava_bench(root: Path) -> Path:
    _jsonl(root / "questions.jsonl", [
        {"question_id": 0, "image": "001.jpg", "text": "What is in the image?", "category": "conv"},
        {"question_id": 1, "image": "001.jpg", "text": "Describe the image in detail.", "category": "detail"}])
    _jsonl(root / "context.jsonl", [{"id": "001", "image": "001.jpg", "caption": "A red square on a white wall."}])
    _jsonl(root / "answers_gpt4.jsonl", [
        {"question_id": 0, "text": "A red square.", "model_id": "gpt-4"},
        {"question_id": 1, "text": "The image shows a red square on a white wall.", "model_id": "gpt-4"}])
    _image(root / "images" / "001.jpg")
    return root


def write_mmvet(root: Path) -> Path:
    _json(root / "mm-vet.json", {
        "v1_0": {"imagename": "v1_0.png", "capability": ["rec"], "question": "What shape is this?",
                 "answer": "square"},
        "v1_1": {"imagename": "v1_1.png", "capability": ["ocr", "math"], "question": "What is 2+3 on the board?",
                 "answer": "5 <OR> five"}})
    _image(root / "images" / "v1_0.png")
    _image(root / "images" / "v1_1.png")
    return root


WRITERS = {"vqav2": write_vqav2, "gqa": write_gqa, "vizwiz": write_vizwiz, "scienceqa": write_scienceqa,
           "textvqa": write_textvqa, "pope": write_pope, "mme": write_mme, "mmbench": write_mmbench,
           "mmbench_cn": lambda root: write_mmbench(root, "cn"), "seed": write_seed, "llava_bench": write_llava_bench,
           "mmvet": write_mmvet}


def write_benchmark(name: str, root: Path) -> str:
    """Write ``name``'s tiny published layout under ``root/name``; returns what ``--annotations`` takes."""
    return str(WRITERS[name](root / name))


JUDGE_VERDICTS = {
    # LLaVA-Bench: the judge's first line is "<reference score> <reply score>"
    "What is in the image?": "8 6\nAssistant 1 is precise; Assistant 2 misses the color.",
    "Describe the image in detail.": "10 5\nAssistant 2 is short.",
    # MM-Vet: the grade
    "| What shape is this? | square |": "1.0",
    "| What is 2+3 on the board? | 5 <OR> five |": "0.5",
    # MMBench: the letter a reply means, where the rules could not read one
    "Answer: I cannot tell": "B",
}
"""What the tests' scripted judge answers to a prompt that contains the key."""

CASES: dict[str, tuple[dict[str, str], dict[str, float]]] = {
    "vqav2": ({"1": "Red.", "2": "two"}, {
        # q1: "Red." -> "red"; 4 of 10 annotators said red: every leave-one-out subset keeps >= 3 -> 1.0
        # q2: "two" -> "2"; 2 of 10 said 2: leaving one of those out -> 1/3 (twice), else 2/3 (8 times) -> 0.6
        "accuracy": 0.8, "accuracy/other": 1.0, "accuracy/number": 0.6}),
    "gqa": ({"201": "Yes.", "202": "Red square"}, {
        # "Yes." -> "yes" == "yes"; "red square" != "red"
        "accuracy": 0.5, "accuracy/verify": 1.0, "accuracy/query": 0.0}),
    "vizwiz": ({"VizWiz_val_00000000.jpg": "Unanswerable", "VizWiz_val_00000001.jpg": "a coffee"}, {
        # 3 of 10 said unanswerable: those 3 subsets keep 2 -> 2/3, the other 7 keep 3 -> 1: (2 + 7) / 10 = 0.9
        # "a coffee" -> "coffee" (article dropped), 10 of 10 -> 1.0
        "accuracy": 0.95}),
    "textvqa": ({"ocr/34602": "Nokia", "plain/34602": "phone", "ocr/34603": "STOP.", "plain/34603": "stop"},
                # "Nokia" -> "nokia" 1.0, "STOP." -> "stop" 1.0; without OCR: "phone" 0, "stop" 1.0
                {"accuracy": 1.0, "accuracy_no_ocr": 0.5}),
    "pope": ({"random/1": "Yes", "random/2": "No, there is not.", "popular/1": "There is no square.",
              "popular/2": "Yes"}, {
        # random: TP + TN -> accuracy, precision, recall, F1 1.0; yes-ratio 1/2
        # popular: "There is no square." has the word "no" -> no (FN), "Yes" -> FP: all 0, yes-ratio 1/2
        "random/accuracy": 1.0, "random/f1": 1.0, "random/yes_ratio": 0.5, "popular/accuracy": 0.0,
        "popular/precision": 0.0, "popular/recall": 0.0, "popular/f1": 0.0, "popular/yes_ratio": 0.5,
        "f1": 0.5, "accuracy": 0.5}),
    "mme": ({"existence/1.jpg/0": "Yes", "existence/1.jpg/1": "No", "existence/2.jpg/0": "Yes, there is.",
             "existence/2.jpg/1": "Yes", "artwork/10.jpg/0": "yes", "artwork/10.jpg/1": "no",
             "code_reasoning/0020.jpg/0": "Yes", "code_reasoning/0020.jpg/1": "Maybe"}, {
        # existence: 3 of 4 right -> 75; image 1 both right, image 2 not -> acc+ 50; score 125
        # artwork: 2 of 2 -> 100 + 100 = 200; perception = 125 + 200 = 325
        # code_reasoning: "Maybe" is neither yes nor no (wrong): 50 + 0 -> cognition 50
        "existence/accuracy": 75.0, "existence/accuracy_plus": 50.0, "existence/score": 125.0,
        "artwork/score": 200.0, "perception": 325.0, "code_reasoning/score": 50.0, "cognition": 50.0}),
    "scienceqa": ({"10": "B", "12": "The answer is B."}, {
        # "10" (answer index 1 = B) right; "12" answers B, the answer is A; "11" has no image (not asked)
        "accuracy": 0.5}),
    "mmbench": ({"0/0": "B", "0/1": "A. square", "0/2": "It is a square", "1/0": "A", "1/1": "I cannot tell"}, {
        # rotations of question 0: (circle, square, triangle) -> B; (square, triangle, circle) -> A;
        # (triangle, circle, square): no capital letter in the reply, one option text ("square") -> C: all right
        # question 1, second rotation (blue, red): the rules read nothing; without a judge it is wrong
        "circular_accuracy": 0.5, "accuracy": 1.0, "circular_accuracy/shape": 1.0, "circular_accuracy/color": 0.0,
        "extraction/rules": 4, "extraction/judge": 0, "extraction/failed": 1}),
    "mmbench_cn": ({"0/0": "B", "0/1": "A", "0/2": "C", "1/0": "A", "1/1": "A"}, {
        # question 1's second rotation is (蓝色, 红色): the answer 红色 is now B, "A" is wrong
        "circular_accuracy": 0.5, "accuracy": 1.0}),
    "seed": ({"s1": "A", "s2": "C."}, {
        # the video question v1 is left out; s1 right; s2 "C." is not exactly "C" (LLaVA's text == answer)
        "accuracy": 0.5, "accuracy/Scene Understanding": 1.0, "accuracy/Instance Identity": 0.0}),
    "llava_bench": ({"0": "A square.", "1": "A red square."}, {
        # (a first line "8, 6" parses too; "8 6 7" or "Score: 8 6" do not: judge/failed)
        # verdicts 8 6 (conv) and 10 5 (detail): 100 * mean(6, 5) / mean(8, 10) = 100 * 5.5 / 9
        "relative_score": 100 * 5.5 / 9, "relative_score/conv": 75.0, "relative_score/detail": 50.0,
        "judge/failed": 0}),
    "mmvet": ({"v1_0": "A square.", "v1_1": "It says 2+3 = 6"}, {
        # grades 1.0 and 0.5: 100 * 0.75; rec: 100; ocr and math: 50
        "score": 75.0, "score/rec": 100.0, "score/ocr": 50.0, "score/math": 50.0, "judge/failed": 0}),
}


SHORT = "\nAnswer the question using a single word or phrase."
CHOICE = "\nAnswer with the option's letter from the given choices directly."
LLAVA_QUESTIONS: dict[str, dict[str, dict]] = {
    # our question id -> the record of LLaVA's question file (playground/data/eval/<benchmark>/...), as LLaVA's
    # model_vqa*.py copy it into the answer: question_id (LLaVA's), the prompt ("text"), image, category
    "vqav2": {"1": {"question_id": 1, "image": "COCO_val2014_000000000042.jpg",
                    "text": "What color is the square?" + SHORT, "category": "default"},
              "2": {"question_id": 2, "image": "COCO_val2014_000000000043.jpg",
                    "text": "How many circles are there?" + SHORT, "category": "default"}},
    "gqa": {"201": {"question_id": "201", "image": "n1.jpg", "text": "Is the square red?" + SHORT,
                    "category": "default"},
            "202": {"question_id": "202", "image": "n2.jpg", "text": "What color is it?" + SHORT,
                    "category": "default"}},
    "vizwiz": {  # llava_test.jsonl: the position in VizWiz's file
        "VizWiz_val_00000000.jpg": {"question_id": 0, "image": "VizWiz_val_00000000.jpg", "category": "default",
                                    "text": "What is this?\nWhen the provided information is insufficient, respond "
                                            "with 'Unanswerable'." + SHORT},
        "VizWiz_val_00000001.jpg": {"question_id": 1, "image": "VizWiz_val_00000001.jpg", "category": "default",
                                    "text": "What drink is this?\nWhen the provided information is insufficient, "
                                            "respond with 'Unanswerable'." + SHORT}},
    "textvqa": {  # llava_textvqa_val_v051_ocr.jsonl: the image id, repeated; the question is the prompt's first line
        "ocr/34602": {"question_id": "abc1", "image": "abc1.jpg", "category": "default",
                      "text": "what brand is the phone?\nReference OCR token: nokia, phone" + SHORT},
        "plain/34602": {"question_id": "abc1", "image": "abc1.jpg", "category": "default",
                        "text": "what brand is the phone?" + SHORT},
        "ocr/34603": {"question_id": "abc2", "image": "abc2.jpg", "category": "default",
                      "text": "what is written?\nReference OCR token: " + SHORT},
        "plain/34603": {"question_id": "abc2", "image": "abc2.jpg", "category": "default",
                        "text": "what is written?" + SHORT}},
    "pope": {  # llava_pope_test.jsonl: adversarial 1.., random 10000001.., popular 20000001..
        f"{split}/{n}": {"question_id": offset + n, "image": "COCO_val2014_000000000042.jpg", "category": split,
                         "text": f"Is there a {thing} in the image?" + SHORT}
        for split, offset in (("random", 10_000_000), ("popular", 20_000_000))
        for n, thing in ((1, "square"), (2, "dog"))},
    "mme": {  # llava_mme.jsonl: the image's path, two questions each
        f"{category}/{stem}.jpg/{n}": {"question_id": f"{category}/{folder}{stem}.jpg",
                                       "image": f"{category}/{folder}{stem}.jpg", "category": category,
                                       "text": f"Is there a {thing} in this image?" + SHORT}
        for category, folder, stems in (("existence", "", ("1", "2")), ("artwork", "images/", ("10",)),
                                        ("code_reasoning", "", ("0020",)))
        for stem in stems for n, thing in ((0, "square"), (1, "dog"))},
    "scienceqa": {  # answers of model_vqa_science.py over llava_test_CQM-A.json (image questions' prompts: <image>)
        "10": {"question_id": "10", "text": "<image>\nContext: A pet.\nWhich animal is a pet here?\nA. cat\nB. dog\n"
                                            "C. fish" + CHOICE},
        "11": {"question_id": "11", "text": "Which word is a noun?\nA. run\nB. table" + CHOICE},
        "12": {"question_id": "12", "text": "<image>\nIs the square red?\nA. yes\nB. no" + CHOICE}},
    "mmbench": {  # model_vqa_mmbench.py --all-rounds: question_id = the TSV's index, round_id = the rotation
        f"{index}/{r}": {"question_id": index, "round_id": r, "text": "...", "options": [], "option_char": []}
        for index, rounds in ((0, 3), (1, 2)) for r in range(rounds)},
    "seed": {  # llava-seed-bench.jsonl: SEED-Bench's question id; video questions asked on a middle frame
        "s1": {"question_id": "s1", "image": "SEED-Bench-image/1_1.jpg", "category": "Scene Understanding",
               "text": "What is the scene?\nA. a square\nB. a beach\nC. a road\nD. a room" + CHOICE},
        "s2": {"question_id": "s2", "image": "SEED-Bench-image/2_2.jpg", "category": "Instance Identity",
               "text": "What object is it?\nA. dog\nB. cat\nC. square\nD. tree" + CHOICE},
        "v1": {"question_id": "v1", "image": "SEED-Bench-video-image/10_v1.png", "category": "Action Recognition",
               "text": "What happens?\nA. a\nB. b\nC. c\nD. d" + CHOICE}},
    "llava_bench": {str(n): {"question_id": n, "image": "001.jpg", "text": text, "category": category}
                    for n, (text, category) in enumerate((("What is in the image?", "conv"),
                                                          ("Describe the image in detail.", "detail")))},
    "mmvet": {f"v1_{n}": {"question_id": n, "image": f"v1_{n}.png", "text": text, "category": "conv"}
              for n, text in enumerate(("What shape is this?", "What is 2+3 on the board?"))},
}
LLAVA_QUESTIONS["mmbench_cn"] = LLAVA_QUESTIONS["mmbench"]
LLAVA_EXTRA_ANSWERS = {"scienceqa": {"11": "B"}, "seed": {"v1": "A"}}
"""Answers LLaVA's files hold to questions the headline leaves out (text-only ScienceQA, SEED's video)."""


def write_llava_files(name: str, root: Path) -> tuple[Path, Path]:
    """LLaVA's answer file for ``CASES[name]``'s replies, as ``model_vqa*.py`` writes it (``question_id``,
    ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``), and its question file."""
    records = LLAVA_QUESTIONS[name]
    replies = CASES[name][0] | LLAVA_EXTRA_ANSWERS.get(name, {})
    answers = [{"question_id": records[qid]["question_id"], "prompt": records[qid]["text"], "text": reply,
                "answer_id": f"a{n}", "model_id": "llava-v1.5-7b", "metadata": {}}
               | {key: records[qid][key] for key in ("round_id", "options", "option_char") if key in records[qid]}
               for n, (qid, reply) in enumerate(replies.items())]
    folder = root / f"llava-{name}"
    if name == "scienceqa":  # llava_test_CQM-A.json: a JSON array of conversations keyed by "id"
        return _jsonl(folder / "answers.jsonl", answers), _json(folder / "llava_test_CQM-A.json", [
            {"id": r["question_id"], "conversations": [{"from": "human", "value": r["text"]},
                                                       {"from": "gpt", "value": "B"}]}
            | ({"image": f"{r['question_id']}/image.png"} if r["text"].startswith("<image>") else {})
            for r in records.values()])
    questions = [{key: value for key, value in record.items() if key not in ("round_id", "options", "option_char")}
                 for record in records.values()]
    return _jsonl(folder / "answers.jsonl", answers), _jsonl(folder / "questions.jsonl", questions)
