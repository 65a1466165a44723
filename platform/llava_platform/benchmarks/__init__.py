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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llava_platform.benchmarks.base import BenchmarkFormatError, Judge, Loaded, Question, Source
from llava_platform.benchmarks.choice import load_mmbench, load_scienceqa, load_seed
from llava_platform.benchmarks.judged import load_llava_bench, load_mmvet
from llava_platform.benchmarks.vqa import load_gqa, load_textvqa, load_vizwiz, load_vqav2
from llava_platform.benchmarks.yesno import load_mme, load_pope

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkFormatError", "Judge", "Loaded", "Question", "ScoreReport",
           "Source", "comparison_table", "load_benchmark", "score_answers"]

from llava_platform.benchmarks.base import Benchmark  # noqa: E402  (re-exported)

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("vqav2", "VQAv2", "accuracy", 78.5, 100, "questions + annotations JSON (val) or test-dev questions; "
              "images val2014/ or test2015/", load_vqav2),
    Benchmark("gqa", "GQA", "accuracy", 62.0, 100, "testdev_balanced_questions.json; images/", load_gqa),
    Benchmark("vizwiz", "VizWiz", "accuracy", 50.0, 100, "val.json (or test.json); images val/ (test/)", load_vizwiz),
    Benchmark("scienceqa", "SQA-IMG", "accuracy", 66.8, 100, "problems.json + pid_splits.json; images/test/<pid>/",
              load_scienceqa),
    Benchmark("textvqa", "TextVQA", "accuracy", 58.2, 100, "TextVQA_0.5.1_val.json + TextVQA_Rosetta_OCR_v0.2_val."
              "json; train_images/", load_textvqa),
    Benchmark("pope", "POPE", "f1", 85.9, 100, "coco_pope_{random,popular,adversarial}.json; val2014/", load_pope),
    Benchmark("mme", "MME", "perception", 1510.7, 1, "MME_Benchmark_release_version/<category>/ (images + .txt)",
              load_mme),
    Benchmark("mmbench", "MMBench", "circular_accuracy", 64.3, 100, "mmbench_dev_20230712.tsv (or test)",
              load_mmbench),
    Benchmark("mmbench_cn", "MMBench-CN", "circular_accuracy", 58.3, 100, "mmbench_dev_cn_20231003.tsv (or test)",
              lambda source: load_mmbench(source, language="cn")),
    Benchmark("seed", "SEED-Bench (image)", "accuracy", 58.6, 100, "SEED-Bench.json; SEED-Bench-image/", load_seed),
    Benchmark("llava_bench", "LLaVA-Bench-in-the-Wild", "relative_score", 65.4, 1, "questions.jsonl, context.jsonl, "
              "answers_gpt4.jsonl; images/", load_llava_bench, needs_judge=True),
    Benchmark("mmvet", "MM-Vet", "score", 31.1, 1, "mm-vet.json; images/", load_mmvet, needs_judge=True),
)}
"""Name -> benchmark, in the paper's column order. ``published``: LLaVA-1.5-7B in the LLaVA-1.5 paper."""


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
    and ``answers/{questions,answered,missing,unmatched,duplicate}``."""
    unmatched: list[str] = field(default_factory=list)
    """Answer ids that match no question (reported, never scored)."""
    missing: list[str] = field(default_factory=list)
    """Questions without an answer (scored as an empty reply)."""
    notes: list[str] = field(default_factory=list)

    @property
    def headline(self) -> float | None:
        """The paper's metric on the paper's scale, ``None`` where there is none (a test split)."""
        benchmark = BENCHMARKS[self.benchmark]
        value = self.metrics.get(benchmark.headline)
        return None if value is None else value * benchmark.scale


def score_answers(name: str, loaded: Loaded, answers: Iterable[Mapping[str, Any]],
                  judge: Judge | None = None) -> ScoreReport:
    """Score LLaVA-format answers (``{"question_id", "text"}`` objects) against a loaded benchmark.

    Every question is scored: one without an answer counts as an empty reply (``answers/missing``);
    answers naming no question are counted (``answers/unmatched``) and listed, as are repeated ids (the
    first answer counts).

    Raises:
        ValueError: a judge-based benchmark without a judge.
    """
    if BENCHMARKS[name].needs_judge and judge is None:
        raise ValueError(f"{name} is scored by a judge model: give --judge-url and --judge-model")
    wanted = {q.question_id for q in loaded.questions}
    replies: dict[str, str] = {}
    unmatched, duplicate = [], 0
    for answer in answers:
        qid = str(answer["question_id"])
        if qid not in wanted:
            unmatched.append(qid)
        elif qid in replies:
            duplicate += 1
        else:
            replies[qid] = str(answer.get("text") or "")
    missing = [q.question_id for q in loaded.questions if q.question_id not in replies]
    replies |= {qid: "" for qid in missing}
    metrics = loaded.score(replies, judge) if loaded.submission is None else {}
    metrics |= {"answers/questions": float(len(wanted)), "answers/answered": float(len(wanted) - len(missing)),
                "answers/missing": float(len(missing)), "answers/unmatched": float(len(unmatched)),
                "answers/duplicate": float(duplicate)}
    return ScoreReport(name, metrics, unmatched, missing, list(loaded.notes))


def comparison_table(reports: Iterable[ScoreReport]) -> str:
    """A markdown table: each benchmark's paper metric for this model beside LLaVA-1.5-7B's published figure."""
    lines = ["| benchmark | metric | this model | LLaVA-1.5-7B (paper) | questions | missing | unmatched |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for report in reports:
        benchmark = BENCHMARKS[report.benchmark]
        value = "submission file" if report.headline is None else f"{report.headline:.1f}"
        m = report.metrics
        lines.append(f"| {benchmark.title} | {benchmark.headline} | {value} | {benchmark.published:.1f} | "
                     f"{int(m['answers/questions'])} | {int(m['answers/missing'])} | {int(m['answers/unmatched'])} |")
    return "\n".join(lines)
