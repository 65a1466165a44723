"""Multiple-choice benchmarks: ScienceQA-IMG, MMBench / MMBench-CN (CircularEval) and SEED-Bench (images).

Prompt (LLaVA-1.5): the context or hint, the question, one ``"A. text"`` line per option, then the
multiple-choice suffix (MMBench-CN: its Chinese suffix).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections import defaultdict
from collections.abc import Mapping

from llava_platform.benchmarks.base import (
    MULTIPLE_CHOICE,
    MULTIPLE_CHOICE_CN,
    BenchmarkFormatError,
    Judge,
    Loaded,
    Question,
    Source,
    mean,
    options_text,
)
from llava_platform.benchmarks.rules import letter_by_rules, scienceqa_letter

LETTERS = "ABCDEFGHIJ"


def load_scienceqa(source: Source) -> Loaded:
    """``problems.json`` + ``pid_splits.json``: the test split's questions with an image (ScienceQA-IMG)."""
    problems = source.read_json("problems.json", '{"<pid>": {"question", "choices", "answer", "hint", "image"}, ...}',
                                lambda d: all({"question", "choices", "answer", "image"} <= set(p)
                                              for p in list(d.values())[:1]))
    splits = source.read_json("pid_splits.json", '{"test": ["<pid>", ...], ...}', lambda d: isinstance(d["test"], list))
    rows, gold = [], {}
    for pid in splits["test"]:
        problem = problems.get(pid)
        if problem is None:
            raise BenchmarkFormatError("scienceqa", source.uri("pid_splits.json"), f"test ids in problems.json ({pid})")
        if not problem["image"]:
            continue
        options = dict(zip(LETTERS, problem["choices"], strict=False))
        context = f"Context: {problem['hint']}\n" if problem.get("hint") else ""
        prompt = f"{context}{problem['question']}\n{options_text(options)}\n{MULTIPLE_CHOICE}"
        rows.append(Question(pid, prompt, source.image("images", f"test/{pid}/{problem['image']}"),
                             max_new_tokens=1024))
        gold[pid] = (LETTERS[problem["answer"]], tuple(options))

    def score(replies: Mapping[str, str], judge) -> dict[str, float]:
        picked = {pid: scienceqa_letter(reply, gold[pid][1]) for pid, reply in replies.items()}
        return {"accuracy": mean(float(letter == gold[pid][0]) for pid, letter in picked.items()),
                "unparsed": float(sum(letter is None for letter in picked.values()))}

    return Loaded(rows, score, notes=["test split, questions with an image (IMG)"])


MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "image")


def load_mmbench(source: Source, language: str = "en") -> Loaded:
    """MMBench's TSV (``mmbench_dev_20230712.tsv``, ``mmbench_dev_cn_20231003.tsv``, the test files) with each
    question asked once per rotation of its options: ids ``<index>/<rotation>``."""
    name = source.file.rsplit("/", 1)[1] if source.file else next(iter(source.files(suffix=".tsv")), None)
    if name is None:
        raise BenchmarkFormatError(source.benchmark, source.uri(""), "MMBench's .tsv file (index, question, hint, "
                                   "A, B, C, D, answer, category, image)")
    table = source.read_tsv(name, "MMBench's tab-separated layout", MMBENCH_COLUMNS)
    suffix = MULTIPLE_CHOICE_CN if language == "cn" else MULTIPLE_CHOICE
    rows, rounds, gold, categories = [], {}, {}, {}
    for line, row in enumerate(table, 2):
        try:
            image = base64.b64decode(row["image"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise BenchmarkFormatError(source.benchmark, f"{source.uri(name)} line {line}",
                                       "a base64-encoded image in the 'image' column") from error
        texts = [row[letter] for letter in LETTERS if row.get(letter, "").strip() and row[letter] != "nan"]
        question = row["question"] if row["hint"] in ("", "nan") else f"{row['hint']}\n{row['question']}"
        for turn in range(len(texts)):
            rotated = texts[turn:] + texts[:turn]
            options = dict(zip(LETTERS, rotated, strict=False))
            qid = f"{row['index']}/{turn}"
            rows.append(Question(qid, f"{question}\n{options_text(options)}\n{suffix}", image_bytes=image,
                                 max_new_tokens=1024))
            rounds[qid] = options
        if row.get("answer", "") not in ("", "nan"):
            gold[row["index"]] = texts[LETTERS.index(row["answer"].strip())]
        categories[row["index"]] = row.get("category", "")
    if not gold:
        return Loaded(rows, lambda replies, judge: {}, notes=["test split: writes the submission file"],
                      submission=lambda replies: _mmbench_submission(table, replies, rounds, source.benchmark))

    def score(replies: Mapping[str, str], judge: Judge | None) -> dict[str, float]:
        picked, how = pick_letters(replies, rounds, judge)
        right: dict[str, list[bool]] = defaultdict(list)
        for qid, letter in picked.items():
            index = qid.split("/", 1)[0]
            right[index].append(letter is not None and rounds[qid][letter] == gold[index])
        metrics = {"circular_accuracy": mean(float(all(oks)) for oks in right.values()),
                   "accuracy": mean(float(right[index][0]) for index in right)}
        by_category: dict[str, list[float]] = defaultdict(list)
        for index, oks in right.items():
            by_category[categories[index]].append(float(all(oks)))
        metrics |= {f"circular_accuracy/{c}": mean(v) for c, v in sorted(by_category.items()) if c}
        return metrics | {f"extraction/{k}": float(v) for k, v in how.items()}

    return Loaded(rows, score, notes=["CircularEval: a question counts only if every rotation is answered right; "
                                      "accuracy: the first rotation alone"])


def pick_letters(replies: Mapping[str, str], rounds: Mapping[str, Mapping[str, str]],
                 judge: Judge | None) -> tuple[dict[str, str | None], dict[str, int]]:
    """Each reply's option letter: by ``letter_by_rules`` first, by the judge where the rules fail.

    Returns:
        (question id -> letter or ``None``), and how many were read by ``rules``, by the ``judge``, and
        ``failed`` (neither: counted wrong).
    """
    picked = {qid: letter_by_rules(reply, rounds[qid]) for qid, reply in replies.items()}
    unread = [qid for qid, letter in picked.items() if letter is None]
    how = {"rules": len(picked) - len(unread), "judge": 0, "failed": 0}
    if unread and judge is not None:
        prompts = [choice_judge_prompt(replies[qid], rounds[qid]) for qid in unread]
        for qid, verdict in zip(unread, judge.complete_all(prompts, max_tokens=8), strict=True):
            letter = (verdict or "").strip().strip(".()").upper()[:1]
            picked[qid] = letter if letter in rounds[qid] else None
    how["judge"] = sum(picked[qid] is not None for qid in unread)
    how["failed"] = len(unread) - how["judge"]
    return picked, how


def choice_judge_prompt(reply: str, options: Mapping[str, str]) -> str:
    """The judge's task where the rules cannot read a letter (MMBench's matching prompt, our wording)."""
    return ("You match an answer to the options of a multiple-choice question. Reply with the single letter "
            "of the option the answer means, or Z if it means none of them or several.\n\n"
            f"Options:\n{options_text(options)}\n\nAnswer: {reply}\n\nLetter:")


def _mmbench_submission(table, replies: Mapping[str, str], rounds, benchmark: str) -> tuple[str, bytes]:
    """The test split's file for the MMBench server: the TSV's columns (less the image) and ``prediction``,
    the first rotation's reply, as an Excel sheet."""
    import pandas as pd

    rows = [{key: value for key, value in row.items() if key != "image"}
            | {"prediction": replies.get(f"{row['index']}/0", "")} for row in table]
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_excel(buffer, index=False)
    return f"{benchmark}_test_submission.xlsx", buffer.getvalue()


SEED_FILE = "SEED-Bench.json"
SEED_IMAGE_DIMENSIONS = range(1, 10)
"""SEED-Bench's question types 1-9 are about images (10-12 are video)."""


def load_seed(source: Source) -> Loaded:
    data = source.read_json(SEED_FILE, '{"questions": [{"question_id", "question", "choice_a".."choice_d", "answer", '
                            '"data_id", "question_type_id"}, ...], "question_type": {"<name>": <id>}}',
                            lambda d: isinstance(d["question_type"], dict) and all(
                                {"question_id", "question", "choice_a", "answer", "data_id", "question_type_id"}
                                <= set(q) for q in d["questions"][:1]))
    dimension = {type_id: name for name, type_id in data["question_type"].items()}
    rows, gold = [], {}
    for q in data["questions"]:
        if q["question_type_id"] not in SEED_IMAGE_DIMENSIONS:
            continue
        options = {letter: q[f"choice_{letter.lower()}"] for letter in "ABCD"}
        qid = str(q["question_id"])  # scored by exact match of the reply with the letter (LLaVA's script)
        rows.append(Question(qid, f"{q['question']}\n{options_text(options)}\n{MULTIPLE_CHOICE}",
                             source.image("SEED-Bench-image", q["data_id"])))
        gold[qid] = (q["answer"], dimension.get(q["question_type_id"], str(q["question_type_id"])))

    def score(replies: Mapping[str, str], judge) -> dict[str, float]:
        by_dimension: dict[str, list[float]] = defaultdict(list)
        for qid, reply in replies.items():
            answer, name = gold[qid]
            by_dimension[name].append(float(reply == answer))  # LLaVA's convert_seed_for_submission: text == answer
        everything = [v for values in by_dimension.values() for v in values]
        return {"accuracy": mean(everything),
                **{f"accuracy/{name}": mean(values) for name, values in sorted(by_dimension.items())}}

    return Loaded(rows, score, notes=["image questions (dimensions 1-9)"])
