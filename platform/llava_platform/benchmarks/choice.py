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
    LlavaIds,
    Loaded,
    Question,
    Source,
    mean,
    options_text,
)
from llava_platform.benchmarks.rules import exact_letter, letter_by_rules, scienceqa_letter

LETTERS = "ABCDEFGHIJ"


def load_scienceqa(source: Source) -> Loaded:
    """``problems.json`` + ``pid_splits.json``: the test split's questions with an image (ScienceQA-IMG)."""
    problems = source.read_json("problems.json", '{"<pid>": {"question", "choices", "answer", "hint", "image"}, ...}',
                                lambda d: all({"question", "choices", "answer", "image"} <= set(p)
                                              for p in list(d.values())[:1]))
    splits = source.read_json("pid_splits.json", '{"test": ["<pid>", ...], ...}', lambda d: isinstance(d["test"], list))
    rows, gold, text_only = [], {}, set()
    for pid in splits["test"]:
        problem = problems.get(pid)
        if problem is None:
            raise BenchmarkFormatError("scienceqa", source.uri("pid_splits.json"), f"test ids in problems.json ({pid})")
        if not problem["image"]:
            text_only.add(pid)
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

    llava = LlavaIds("question_id = ScienceQA's problem id (llava_test_CQM-A.json's id)",
                     lambda answer: str(answer["question_id"]), lambda qid: {"question_id": qid},
                     lambda answer: "a text-only question (ScienceQA-IMG scores those with an image)"
                     if str(answer["question_id"]) in text_only else None)
    return Loaded(rows, score, notes=["test split, questions with an image (IMG)"], llava=llava,
                  scored_on="test, questions with an image; image")


MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "image")
CIRCULAR_COPY = 1_000_000
"""MMBench's TSVs may hold each question's circular copies as rows of their own: index ``base + k x 10^6``
for the k-th rotation of question ``base`` (the dev files LLaVA-1.5 was scored on do)."""


def load_mmbench(source: Source, language: str = "en") -> Loaded:
    """MMBench's TSV (``mmbench_dev_20230712.tsv``, ``mmbench_dev_cn_20231003.tsv``, the test files), each
    question asked once per rotation of its options, ids ``<index>/<rotation>``: the TSV's own circular
    copies where it has them (row ``base + k x 10^6`` is ``<base>/<k>``), else rotations made here."""
    name = source.file.rsplit("/", 1)[1] if source.file else next(iter(source.files(suffix=".tsv")), None)
    if name is None:
        raise BenchmarkFormatError(source.benchmark, source.uri(""), "MMBench's .tsv file (index, question, hint, "
                                   "A, B, C, D, answer, category, image)")
    table = source.read_tsv(name, "MMBench's tab-separated layout", MMBENCH_COLUMNS)
    copies = any(int(row["index"]) >= CIRCULAR_COPY for row in table)
    suffix = MULTIPLE_CHOICE_CN if language == "cn" else MULTIPLE_CHOICE
    rows, rounds, gold, categories, row_ids = [], {}, {}, {}, []
    for line, row in enumerate(table, 2):
        try:
            image = base64.b64decode(row["image"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise BenchmarkFormatError(source.benchmark, f"{source.uri(name)} line {line}",
                                       "a base64-encoded image in the 'image' column") from error
        texts = [row[letter] for letter in LETTERS if row.get(letter, "").strip() and row[letter] != "nan"]
        question = row["question"] if row["hint"] in ("", "nan") else f"{row['hint']}\n{row['question']}"
        base, copy = int(row["index"]) % CIRCULAR_COPY, int(row["index"]) // CIRCULAR_COPY
        turns = [copy] if copies else range(len(texts))
        for turn in turns:
            rotated = texts if copies else texts[turn:] + texts[:turn]
            options = dict(zip(LETTERS, rotated, strict=False))
            qid = f"{base}/{turn}"
            rows.append(Question(qid, f"{question}\n{options_text(options)}\n{suffix}", image_bytes=image,
                                 max_new_tokens=1024))
            rounds[qid] = options
            if row.get("answer", "") not in ("", "nan"):
                gold[qid] = texts[LETTERS.index(row["answer"].strip())]
        row_ids.append(f"{base}/{turns[0]}")
        categories[str(base)] = row.get("category", "")
    if not gold:
        return Loaded(rows, lambda replies, judge: {}, notes=["test split: writes the submission file"],
                      submission=lambda replies: _mmbench_submission(table, row_ids, replies, source.benchmark),
                      llava=_mmbench_llava_ids(copies), scored_on=f"{name}: the server scores the submission file")
    circular = "the TSV's circular copies" if copies else "rotations of each question's options"

    def score(replies: Mapping[str, str], judge: Judge | None) -> dict[str, float]:
        picked, how = pick_letters(replies, rounds, judge)
        right: dict[str, dict[int, bool]] = defaultdict(dict)
        for qid, letter in picked.items():
            base, turn = qid.split("/", 1)
            right[base][int(turn)] = rounds[qid].get(letter) == gold[qid]
        metrics = {"circular_accuracy": mean(float(all(oks.values())) for oks in right.values()),
                   "accuracy": mean(float(oks[min(oks)]) for oks in right.values())}
        by_category: dict[str, list[float]] = defaultdict(list)
        for base, oks in right.items():
            by_category[categories[base]].append(float(all(oks.values())))
        metrics |= {f"circular_accuracy/{c}": mean(v) for c, v in sorted(by_category.items()) if c}
        return metrics | {f"extraction/{k}": float(v) for k, v in how.items()}

    return Loaded(rows, score, llava=_mmbench_llava_ids(copies), scored_on=f"{name}, CircularEval; image",
                  notes=[f"CircularEval over {circular}: a question counts only if every rotation is answered "
                         "right; accuracy: the first rotation alone"])


def _mmbench_llava_ids(copies: bool) -> LlavaIds:
    """LLaVA's ``model_vqa_mmbench.py`` answers: ``question_id`` = the TSV's index, ``round_id`` = the rotation."""
    def ours(answer: Mapping) -> str | None:
        index, round_id = int(answer["question_id"]), int(answer.get("round_id") or 0)
        if copies:
            return f"{index % CIRCULAR_COPY}/{index // CIRCULAR_COPY}" if round_id == 0 else None
        return f"{index}/{round_id}"

    def theirs(qid: str) -> dict:
        base, turn = map(int, qid.split("/", 1))
        if copies:
            return {"question_id": base + turn * CIRCULAR_COPY, "round_id": 0}
        return {"question_id": base, "round_id": turn}

    return LlavaIds("question_id = the TSV's index (base + k x 10^6 for the k-th circular copy), round_id", ours,
                    theirs)


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


def _mmbench_submission(table, row_ids: list[str], replies: Mapping[str, str], benchmark: str) -> tuple[str, bytes]:
    """The test split's file for the MMBench server: the TSV's columns (less the image) and ``prediction``,
    each row's reply (its first rotation where the rotations are made here), as an Excel sheet."""
    import pandas as pd

    rows = [{key: value for key, value in row.items() if key != "image"} | {"prediction": replies.get(qid, "")}
            for row, qid in zip(table, row_ids, strict=True)]
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_excel(buffer, index=False)
    return f"{benchmark}_test_submission.xlsx", buffer.getvalue()


SEED_FILE = "SEED-Bench.json"
SEED_IMAGE_DIMENSIONS = range(1, 10)
"""SEED-Bench's question types 1-9 are about images (10-12 are video)."""
SEED_FRAMES = "SEED-Bench-video-image"
"""LLaVA's ``extract_video_frames.py`` writes each video question's middle frame here as
``<question_type_id>_<question_id>.png``; LLaVA-1.5's SEED figure answers video questions from them."""


def load_seed(source: Source) -> Loaded:
    """Image questions from ``SEED-Bench-image/``; video questions too where ``SEED-Bench-video-image/`` holds
    LLaVA's middle frames (then ``accuracy`` is over all questions, as LLaVA-1.5's 58.6; else over images,
    not comparable with it). ``accuracy/image`` and ``accuracy/video`` apart, and per dimension."""
    data = source.read_json(SEED_FILE, '{"questions": [{"question_id", "question", "choice_a".."choice_d", "answer", '
                            '"data_id", "question_type_id"}, ...], "question_type": {"<name>": <id>}}',
                            lambda d: isinstance(d["question_type"], dict) and all(
                                {"question_id", "question", "choice_a", "answer", "data_id", "question_type_id"}
                                <= set(q) for q in d["questions"][:1]))
    dimension = {type_id: name for name, type_id in data["question_type"].items()}
    frames = set(source.files(SEED_FRAMES, suffix=".png"))
    rows, gold, video, left_out = [], {}, set(), set()
    for q in data["questions"]:
        qid, is_video = str(q["question_id"]), q["question_type_id"] not in SEED_IMAGE_DIMENSIONS
        frame = f"{SEED_FRAMES}/{q['question_type_id']}_{qid}.png"
        if is_video and frame not in frames:
            left_out.add(qid)
            continue
        options = {letter: q[f"choice_{letter.lower()}"] for letter in "ABCD"}
        image = source.uri(frame) if is_video else source.image("SEED-Bench-image", q["data_id"])
        rows.append(Question(qid, f"{q['question']}\n{options_text(options)}\n{MULTIPLE_CHOICE}", image))
        gold[qid] = (q["answer"], dimension.get(q["question_type_id"], str(q["question_type_id"])))
        if is_video:
            video.add(qid)

    def score(replies: Mapping[str, str], judge) -> dict[str, float]:
        by_dimension: dict[str, list[float]] = defaultdict(list)
        by_kind: dict[str, list[float]] = defaultdict(list)
        for qid, reply in replies.items():
            answer, name = gold[qid]
            right = float(exact_letter(reply, answer))
            by_dimension[name].append(right)
            by_kind["video" if qid in video else "image"].append(right)
        everything = [v for values in by_dimension.values() for v in values]
        return {"accuracy": mean(everything), **{f"accuracy/{kind}": mean(v) for kind, v in sorted(by_kind.items())},
                **{f"accuracy/{name}": mean(values) for name, values in sorted(by_dimension.items())}}

    llava = LlavaIds("question_id = SEED-Bench's question id (llava-seed-bench.jsonl)",
                     lambda answer: str(answer["question_id"]),
                     lambda qid: {"question_id": int(qid) if qid.isdigit() else qid},
                     lambda answer: f"a video question without its middle frame in {SEED_FRAMES}/"
                     if str(answer["question_id"]) in left_out else None)
    if left_out:
        return Loaded(rows, score, llava=llava, notes=[
            f"{len(left_out)} video questions left out: no {SEED_FRAMES}/ frames (LLaVA's extract_video_frames.py); "
            "accuracy is over images only and not comparable with LLaVA-1.5's figure (images + video)"],
            scored_on=f"{len(rows)} image questions; image only (video frames missing)")
    return Loaded(rows, score, llava=llava, notes=[f"{len(video)} video questions on their middle frames"],
                  scored_on=f"all {len(rows)} questions; image + video, a video as its middle frame")
