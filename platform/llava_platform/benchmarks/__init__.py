"""The LLaVA-1.5 benchmark table: each benchmark's published files, LLaVA-1.5's prompts, the official scoring.

    benchmark = BENCHMARKS["pope"]
    loaded = benchmark.load(Source("pope", "/data/pope"))          # BenchmarkFormatError if not as published
    ...answer loaded.questions (jobs.evaluate: Ray Data batch inference)...
    report = score_answers(benchmark, loaded, answers, judge=None)  # answers: [{"question_id", "text"}, ...]
    report.metrics["f1"], report.unmatched

``jobs.score`` does the last step alone from a saved answers file; ``jobs.evaluate --benchmark`` does all
three. The table in ``jobs/README.md`` (The LLaVA-1.5 benchmarks) says, per benchmark, what the readers and
rules here do and which official script each follows. (Not to be confused with ``jobs/perf/``: the
performance scripts.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from llava_platform.benchmarks.base import BenchmarkFormatError, Judge, Loaded, Question, Reference, Source
from llava_platform.benchmarks.choice import load_mmbench, load_scienceqa, load_seed
from llava_platform.benchmarks.judged import load_llava_bench, load_mmvet
from llava_platform.benchmarks.vqa import load_gqa, load_textvqa, load_vizwiz, load_vqav2
from llava_platform.benchmarks.yesno import load_mme, load_pope

__all__ = ["BENCHMARKS", "UNMATCHED_LIMIT", "Benchmark", "BenchmarkFormatError", "Judge", "Loaded", "Question",
           "Reference", "ScoreReport", "Source", "UnmatchedAnswers", "comparison_table", "load_benchmark",
           "llava_answer_lines", "score_answers", "with_llava_questions"]

from llava_platform.benchmarks.base import Benchmark  # noqa: E402  (re-exported)

IMAGE = "image"
SERVER = "EvalAI server"
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("vqav2", "VQAv2", "accuracy", Reference(78.5, f"test-dev, {SERVER}", IMAGE), 100,
              "questions + annotations JSON (val) or test-dev questions; images val2014/ or test2015/", load_vqav2),
    Benchmark("gqa", "GQA", "accuracy", Reference(62.0, "testdev-balanced, GQA's eval.py", IMAGE), 100,
              "testdev_balanced_questions.json; images/", load_gqa),
    Benchmark("vizwiz", "VizWiz", "accuracy", Reference(50.0, f"test-dev, {SERVER}", IMAGE), 100,
              "val.json (or test.json); images val/ (test/)", load_vizwiz),
    Benchmark("scienceqa", "SQA-IMG", "accuracy", Reference(66.8, "test, questions with an image", IMAGE), 100,
              "problems.json + pid_splits.json; images/test/<pid>/", load_scienceqa),
    Benchmark("textvqa", "TextVQA", "accuracy", Reference(58.2, "val, with OCR tokens in the prompt", IMAGE), 100,
              "TextVQA_0.5.1_val.json + TextVQA_Rosetta_OCR_v0.2_val.json; train_images/", load_textvqa),
    Benchmark("pope", "POPE", "f1", Reference(85.9, "COCO random/popular/adversarial, F1 averaged", IMAGE), 100,
              "coco_pope_{random,popular,adversarial}.json; val2014/", load_pope),
    Benchmark("mme", "MME", "perception", Reference(1510.7, "perception (10 subtasks)", IMAGE), 1,
              "MME_Benchmark_release_version/<category>/ (images + .txt)", load_mme),
    Benchmark("mmbench", "MMBench", "circular_accuracy", Reference(64.3, "dev 20230712 (en), CircularEval", IMAGE),
              100, "mmbench_dev_20230712.tsv (or test)", load_mmbench),
    Benchmark("mmbench_cn", "MMBench-CN", "circular_accuracy",
              Reference(58.3, "dev 20231003 (cn), CircularEval", IMAGE), 100, "mmbench_dev_cn_20231003.tsv (or test)",
              lambda source: load_mmbench(source, language="cn")),
    Benchmark("seed", "SEED-Bench", "accuracy",
              Reference(58.6, "all 19,242 questions", "image + video, a video as its middle frame"), 100,
              "SEED-Bench.json; SEED-Bench-image/ (and SEED-Bench-video-image/: LLaVA's middle frames)", load_seed),
    Benchmark("llava_bench", "LLaVA-Bench-in-the-Wild", "relative_score",
              Reference(65.4, "60 questions, GPT-4 judge, mean of 3 runs", IMAGE), 1,
              "questions.jsonl, context.jsonl, answers_gpt4.jsonl; images/", load_llava_bench, needs_judge=True),
    Benchmark("mmvet", "MM-Vet", "score", Reference(31.1, "218 questions, GPT-4 grader, mean of 3 runs", IMAGE), 1,
              "mm-vet.json; images/", load_mmvet, needs_judge=True),
)}
"""Name -> benchmark, in the paper's column order. ``published``: LLaVA-1.5-7B in the LLaVA-1.5 paper, with its
split (VQAv2's and VizWiz's are the evaluation server's test-dev scores: a local val score is not the same
measurement) and modality."""


def load_benchmark(name: str, annotations: str, images: str | None = None,
                   s3_endpoint_url: str | None = None) -> Loaded:
    """Read a benchmark's published files (the driver does this before any model loads).

    Raises:
        KeyError: an unknown benchmark name.
        BenchmarkFormatError: a file missing or not in the published format (names the file and what
            was expected).
    """
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; one of: {', '.join(BENCHMARKS)}")
    loaded = BENCHMARKS[name].load(Source(name, annotations, images, s3_endpoint_url))
    if not loaded.questions:
        raise BenchmarkFormatError(name, annotations, "at least one question")
    return loaded


@dataclass
class ScoreReport:
    """A benchmark's scores and the bookkeeping of its answers."""

    benchmark: str
    metrics: dict[str, float]
    """The benchmark's metrics (fractions are 0-1; MME, LLaVA-Bench and MM-Vet use their papers' scales)
    and ``answers/{questions,answered,missing,unmatched,duplicate,outside}``."""
    unmatched: list[str] = field(default_factory=list)
    """Answer ids that match no question (reported, never scored)."""
    missing: list[str] = field(default_factory=list)
    """Questions without an answer (scored as an empty reply)."""
    notes: list[str] = field(default_factory=list)
    scored_on: str = ""
    """The split and modality of the questions scored (``Loaded.scored_on``)."""

    @property
    def headline(self) -> float | None:
        """The paper's metric on the paper's scale, ``None`` where there is none (a test split)."""
        benchmark = BENCHMARKS[self.benchmark]
        value = self.metrics.get(benchmark.headline)
        return None if value is None else value * benchmark.scale


UNMATCHED_LIMIT = 0.01
"""The share of an answer file that may name no question before scoring refuses it: a file keyed by other ids
must fail, never score as empty replies."""


class UnmatchedAnswers(ValueError):
    """Too many answers name no question of the benchmark; says which ids were expected and which were seen."""


def score_answers(name: str, loaded: Loaded, answers: Iterable[Mapping[str, Any]], judge: Judge | None = None,
                  question_file: Mapping[str, Mapping[str, Any]] | None = None,
                  unmatched_limit: float = UNMATCHED_LIMIT) -> ScoreReport:
    """Score answers (``{"question_id", "text"}`` objects, keyed by our ids or by LLaVA's) against a loaded
    benchmark.

    An answer's id is ours, or LLaVA's (``Loaded.llava``: the ids of LLaVA's question files, told apart by
    the answer's ``prompt`` where they repeat; ``question_file``: LLaVA's question records by id, whose
    fields are added to each answer). Every question is scored: one without an answer counts as an empty
    reply (``answers/missing``); answers to questions the headline leaves out (ScienceQA's text-only, SEED's
    video questions) are counted in ``answers/outside``; repeated ids are counted (the first answer counts).

    Raises:
        ValueError: a judge-based benchmark without a judge.
        UnmatchedAnswers: more than ``unmatched_limit`` of the answers name no question.
    """
    if BENCHMARKS[name].needs_judge and judge is None:
        raise ValueError(f"{name} is scored by a judge model: give --judge-url and --judge-model")
    wanted = {q.question_id for q in loaded.questions}
    replies: dict[str, str] = {}
    unmatched, outside, duplicate, total, llava = [], Counter(), 0, 0, 0
    for answer in answers:
        total += 1
        qid, reason = _question_of(answer, wanted, loaded.llava, question_file or {})
        if reason is not None:
            outside[reason] += 1
        elif qid is None:
            unmatched.append(str(answer["question_id"]))
        elif qid in replies:
            duplicate += 1
        else:
            llava += qid != str(answer["question_id"])
            replies[qid] = str(answer.get("text") or "")
    if total and len(unmatched) > unmatched_limit * total:
        raise UnmatchedAnswers(_unmatched_message(name, loaded, unmatched, total, unmatched_limit))
    missing = [q.question_id for q in loaded.questions if q.question_id not in replies]
    replies |= {qid: "" for qid in missing}
    metrics = loaded.score(replies, judge) if loaded.submission is None else {}
    metrics |= {"answers/questions": float(len(wanted)), "answers/answered": float(len(wanted) - len(missing)),
                "answers/missing": float(len(missing)), "answers/unmatched": float(len(unmatched)),
                "answers/duplicate": float(duplicate), "answers/outside": float(sum(outside.values()))}
    notes = list(loaded.notes) + [f"{count} answers left out: {reason}" for reason, count in outside.items()]
    if llava:
        notes.append(f"{llava} answers matched by LLaVA's ids ({loaded.llava.scheme})")
    return ScoreReport(name, metrics, unmatched, missing, notes, loaded.scored_on)


def _question_of(answer: Mapping[str, Any], wanted: set[str], llava, question_file: Mapping[str, Mapping]):
    """(our question id or ``None``, why it is left out or ``None``) for one answer."""
    qid = str(answer["question_id"])
    if qid in wanted or llava is None:
        return (qid if qid in wanted else None), None
    record = {**question_file.get(qid, {}), **answer}
    try:
        mapped = llava.ours(record)
    except (KeyError, ValueError, TypeError, IndexError):
        mapped = None
    if mapped in wanted:
        return mapped, None
    return None, llava.outside(record)


def _unmatched_message(name: str, loaded: Loaded, unmatched: list[str], total: int, limit: float) -> str:
    expected = f"this platform's ids (e.g. {loaded.questions[0].question_id!r})"
    if loaded.llava is not None:
        expected += f" or LLaVA's ({loaded.llava.scheme})"
    return (f"{name}: {len(unmatched)} of {total} answers name no question (more than "
            f"{limit:.0%}); expected {expected}; saw e.g. {', '.join(map(repr, unmatched[:3]))}. "
            "Is it another benchmark's or split's file, or LLaVA's ids without --question-file?")


def llava_answer_lines(loaded: Loaded, answers: Iterable[Mapping[str, Any]], model_id: str) -> list[dict[str, Any]]:
    """Our answers (``{"question_id", "prompt", "text"}``, our ids) as LLaVA's ``model_vqa*.py`` write them,
    keyed by LLaVA's question files, so LLaVA's own conversion and scoring scripts read them: ``question_id``
    (and ``round_id`` / ``category``) LLaVA's, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``
    (holding our id). In question order."""
    theirs = loaded.llava.theirs if loaded.llava is not None else (lambda qid: {"question_id": qid})
    by_id = {str(answer["question_id"]): answer for answer in answers}
    return [theirs(q.question_id) | {"prompt": by_id[q.question_id].get("prompt", q.prompt),
                                     "text": by_id[q.question_id]["text"], "answer_id": f"{q.question_id}",
                                     "model_id": model_id, "metadata": {"platform_question_id": q.question_id}}
            for q in loaded.questions if q.question_id in by_id]


def with_llava_questions(name: str, loaded: Loaded, records: Iterable[Mapping[str, Any]]) -> Loaded:
    """The benchmark's questions as LLaVA's question file asks them: those of its records only, each with the
    record's prompt (``text``) verbatim (e.g. ``llava_textvqa_val_v051_ocr.jsonl``: the OCR variant only).

    Raises:
        BenchmarkFormatError: a record that names no question of the benchmark (the count and examples).
    """
    by_id = {q.question_id: q for q in loaded.questions}
    chosen, unknown = {}, []
    for record in records:
        qid, outside = _question_of(record | {"prompt": record.get("text", "")}, set(by_id), loaded.llava, {})
        if outside is not None:
            continue  # a question the headline leaves out (ScienceQA's text-only, SEED's video without frames)
        if qid is None:
            unknown.append(str(record.get("question_id")))
        else:
            chosen[qid] = replace(by_id[qid], prompt=str(record.get("text") or by_id[qid].prompt))
    if unknown or not chosen:
        scheme = loaded.llava.scheme if loaded.llava else "our ids"
        raise BenchmarkFormatError(name, f"the question file ({len(unknown)} records)", "records naming this "
                                   f"benchmark's questions by LLaVA's ids ({scheme}); e.g. {unknown[:3]}")
    return replace(loaded, questions=list(chosen.values()))


def comparison_table(reports: Iterable[ScoreReport]) -> str:
    """A markdown table: each benchmark's paper metric for this model, with what it was scored on, beside
    LLaVA-1.5-7B's published figure, with its split, modality and source."""
    lines = ["| benchmark | metric | this model | scored on | LLaVA-1.5-7B, published | questions | missing | "
             "unmatched |", "|---|---|---:|---|---|---:|---:|---:|"]
    for report in reports:
        benchmark = BENCHMARKS[report.benchmark]
        value = "submission file" if report.headline is None else f"{report.headline:.1f}"
        m = report.metrics
        lines.append(f"| {benchmark.title} | {benchmark.headline} | {value} | {report.scored_on} | "
                     f"{benchmark.published.describe()} | {int(m['answers/questions'])} | "
                     f"{int(m['answers/missing'])} | {int(m['answers/unmatched'])} |")
    return "\n".join(lines)
