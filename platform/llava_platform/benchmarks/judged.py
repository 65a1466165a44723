"""Judge-scored benchmarks: LLaVA-Bench-in-the-Wild and MM-Vet.

The prompt is the question alone; the reply is graded by a judge model (``judge.py``) with a prompt of
the published structure (our wording). A reply the judge could not grade (endpoint failing after its
retries, or a verdict that does not parse) is counted in ``judge/failed`` and left out of the score.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping

from llava_platform.benchmarks.base import (
    BenchmarkFormatError,
    Judge,
    LlavaIds,
    Loaded,
    Question,
    Source,
    mean,
    same_ids,
)


def load_llava_bench(source: Source) -> Loaded:
    """``questions.jsonl``, ``context.jsonl`` (each image's caption) and ``answers_gpt4.jsonl`` (the reference
    answers), images in ``images/``."""
    questions = source.read_jsonl("questions.jsonl", '{"question_id", "image", "text", "category"} per line',
                                  lambda q: {"question_id", "image", "text", "category"} <= set(q))
    captions = {c["image"]: c["caption"] for c in source.read_jsonl(
        "context.jsonl", '{"id", "image", "caption"} per line', lambda c: {"image", "caption"} <= set(c))}
    references = {str(a["question_id"]): a["text"] for a in source.read_jsonl(
        "answers_gpt4.jsonl", '{"question_id", "text"} per line', lambda a: {"question_id", "text"} <= set(a))}
    for q in questions:
        if q["image"] not in captions or str(q["question_id"]) not in references:
            raise BenchmarkFormatError("llava_bench", source.uri("questions.jsonl"),
                                       f"a caption in context.jsonl and a reference in answers_gpt4.jsonl for "
                                       f"question {q['question_id']}")
    rows = [Question(str(q["question_id"]), q["text"], source.image("images", q["image"]), max_new_tokens=1024)
            for q in questions]
    by_id = {str(q["question_id"]): q for q in questions}

    def score(replies: Mapping[str, str], judge: Judge | None) -> dict[str, float]:
        ids = list(replies)
        prompts = [llava_bench_prompt(captions[by_id[qid]["image"]], by_id[qid]["text"], references[qid],
                                      replies[qid]) for qid in ids]
        pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
        failed = 0
        for qid, verdict in zip(ids, _judge(judge, prompts, 256), strict=True):
            scores = parse_pair(verdict)
            if scores is None:
                failed += 1
                continue
            pairs[by_id[qid]["category"]].append(scores)
            pairs["all"].append(scores)
        metrics = {"judge/failed": float(failed)}
        for category, values in pairs.items():
            name = "relative_score" if category == "all" else f"relative_score/{category}"
            metrics[name] = relative_score(values)
        metrics.setdefault("relative_score", 0.0)
        return metrics

    return Loaded(rows, score, notes=["relative score: 100 × the judge's mean score of the reply / of the reference"],
                  llava=same_ids("question_id = questions.jsonl's question_id", numbers=True),
                  scored_on=f"{len(rows)} questions, one judge pass; image")


def llava_bench_prompt(caption: str, question: str, reference: str, reply: str) -> str:
    """Two assistants' answers to one question about an image the judge knows from its description;
    the first line of the verdict holds the two scores (1-10)."""
    return (f"[Image description]\n{caption}\n\n[Question]\n{question}\n\n"
            f"[Assistant 1]\n{reference}\n[End of Assistant 1]\n\n[Assistant 2]\n{reply}\n[End of Assistant 2]\n\n"
            "[System]\nTwo AI assistants answered the question above about an image, which you know only from "
            "its description. Rate how helpful, relevant, accurate and detailed each answer is, from 1 to 10 "
            "(higher is better). On the first line write only the two scores, Assistant 1's then Assistant 2's, "
            "separated by a space. Then explain your rating, without letting the order of the answers or "
            "their length sway you.")


def parse_pair(verdict: str | None) -> tuple[float, float] | None:
    """The two scores of the verdict's first line (LLaVA's ``parse_score``: commas as spaces, exactly two
    numbers), ``None`` otherwise (LLaVA averages a -1 pair in; we count it in ``judge/failed``)."""
    first = (verdict or "").split("\n")[0].replace(",", " ").split()
    try:
        return (float(first[0]), float(first[1])) if len(first) == 2 else None
    except ValueError:
        return None


def relative_score(pairs: list[tuple[float, float]]) -> float:
    """100 × mean(reply scores) / mean(reference scores) (LLaVA's ``summarize_gpt_review``)."""
    reference = mean(ref for ref, _ in pairs)
    return 100 * mean(reply for _, reply in pairs) / reference if reference else 0.0


def load_mmvet(source: Source) -> Loaded:
    """``mm-vet.json`` (``{"v1_0": {"imagename", "capability", "question", "answer"}, ...}``), images in ``images/``."""
    data = source.read_json("mm-vet.json", '{"<id>": {"imagename", "capability": [...], "question", "answer"}, ...}',
                            lambda d: all({"imagename", "capability", "question", "answer"} <= set(v)
                                          for v in list(d.values())[:1]))
    rows = [Question(qid, item["question"], source.image("images", item["imagename"]), max_new_tokens=1024)
            for qid, item in data.items()]

    def score(replies: Mapping[str, str], judge: Judge | None) -> dict[str, float]:
        ids = list(replies)
        prompts = [mmvet_prompt(data[qid]["question"], data[qid]["answer"], replies[qid]) for qid in ids]
        graded: dict[str, float] = {}
        for qid, verdict in zip(ids, _judge(judge, prompts, 16), strict=True):
            value = parse_grade(verdict)
            if value is not None:
                graded[qid] = value
        metrics = {"score": 100 * mean(graded.values()), "judge/failed": float(len(ids) - len(graded))}
        by_capability: dict[str, list[float]] = defaultdict(list)
        for qid, value in graded.items():
            for capability in data[qid]["capability"]:
                by_capability[capability].append(value)
        return metrics | {f"score/{c}": 100 * mean(v) for c, v in sorted(by_capability.items())}

    llava = LlavaIds("question_id = the position in llava-mm-vet.jsonl (0, 1, ...): MM-Vet's v1_<position>",
                     lambda answer: f"v1_{answer['question_id']}",
                     lambda qid: {"question_id": int(qid.removeprefix("v1_"))})
    return Loaded(rows, score, notes=["score: 100 × the judge's mean grade (0.0-1.0); one greedy judge pass"],
                  llava=llava, scored_on=f"{len(rows)} questions, one judge pass; image")


MMVET_EXAMPLES = (
    ("What is x in the equation?", "-1 <AND> -5", "x = 3", "0.0"),
    ("What is x in the equation?", "-1 <AND> -5", "x = -1", "0.5"),
    ("What is x in the equation?", "-1 <AND> -5", "x = -5 or x = -1", "1.0"),
    ("Which animal is on the sign?", "deer <OR> moose", "It is a moose.", "1.0"),
    ("How many cups are on the table?", "3", "There are two cups and a plate.", "0.0"),
)


def mmvet_prompt(question: str, answer: str, reply: str) -> str:
    """MM-Vet's grading task (our wording of its few-shot structure): a correctness grade from 0.0 to 1.0,
    where ``<AND>`` in the ground truth needs every part and ``<OR>`` any one."""
    shots = "\n".join(f"| {q} | {a} | {r} | {g} |" for q, a, r, g in MMVET_EXAMPLES)
    return ("Grade how correct a model's answer is against the ground truth, from 0.0 (wrong) to 1.0 (right); "
            "partly right answers get a grade in between. In the ground truth, <AND> means every part must be "
            "present and <OR> means any one part is enough. Reply with the grade only.\n\n"
            f"| Question | Ground truth | Answer | Grade |\n|---|---|---|---|\n{shots}\n"
            f"| {question} | {answer} | {reply} |")


_GRADE = re.compile(r"^\s*(0(?:\.\d+)?|1(?:\.0+)?)(?!\.?\d)")


def parse_grade(verdict: str | None) -> float | None:
    """The grade at the start of the verdict (0.0-1.0), ``None`` if there is none."""
    match = _GRADE.match(verdict or "")
    return float(match.group(1)) if match else None


def _judge(judge: Judge | None, prompts: list[str], max_tokens: int) -> list[str | None]:
    if judge is None:
        raise ValueError("this benchmark is scored by a judge model: give --judge-url and --judge-model")
    return judge.complete_all(prompts, max_tokens)
