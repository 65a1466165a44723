"""Score saved answers on a benchmark of the LLaVA-1.5 table, exactly as ``jobs.evaluate --benchmark`` does.

    python -m jobs.score --benchmark pope --annotations /data/pope --predictions answers.jsonl
    python -m jobs.score --benchmark mmvet --annotations s3://bench/mm-vet --predictions answers.jsonl \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-4o-2024-08-06     # key: $OPENAI_API_KEY

``--predictions`` is LLaVA's answer format: one JSON object per line with ``question_id`` and ``text``
(``prompt``, ``round_id`` read where LLaVA's ids need them), keyed by our question ids or by LLaVA's
question files (``llava_pope_test.jsonl``, ``llava_mme.jsonl``, ...; ``--question-file`` gives the file
where an id alone does not say the question: VizWiz, or to check). Every question is scored (one without an
answer as an empty reply); repeated ids, unreadable lines and answers to questions the headline leaves out
are counted and reported; more than 1 % of answers that name no question fail the command (exit 2), naming
the ids expected and those seen. Prints the comparison
with LLaVA-1.5-7B, then the metrics as one JSON object on the last line; writes ``scores.json`` (and the
evaluation server's submission file for a test split) to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from jobs.console import job_log
from llava_platform.benchmarks import (
    BENCHMARKS,
    UNMATCHED_LIMIT,
    BenchmarkFormatError,
    Loaded,
    ScoreReport,
    UnmatchedAnswers,
    comparison_table,
    load_benchmark,
    score_answers,
)
from llava_platform.benchmarks.judge import EndpointJudge
from llava_platform.storage import filesystem_for

log = job_log("score")
"""This job's lines on standard error (``jobs.console.say``)."""


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """The judge options ``jobs.score`` and ``jobs.evaluate`` share."""
    group = parser.add_argument_group("judge (LLaVA-Bench, MM-Vet; MMBench letters the rules cannot read)")
    group.add_argument("--judge-url", help="base URL of any OpenAI-compatible API, e.g. https://api.openai.com/v1")
    group.add_argument("--judge-model", help="the judge model's name on that endpoint")
    group.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding its key")
    group.add_argument("--judge-concurrency", type=int, default=8, help="judge requests in flight")
    group.add_argument("--judge-retries", type=int, default=5, help="retries per request (429/5xx/timeouts, backoff)")


def judge_from_args(args: argparse.Namespace) -> EndpointJudge | None:
    if not args.judge_url:
        return None
    return EndpointJudge(args.judge_url, args.judge_model or "", api_key=os.environ.get(args.judge_key_env, ""),
                         max_retries=args.judge_retries, concurrency=args.judge_concurrency)


def judge_problems(names: list[str], judge: EndpointJudge | None) -> list[str]:
    """Judge settings missing for judge-scored benchmarks, each naming its option."""
    problems = [f"--judge-url: {name} is scored by a judge model; give an OpenAI-compatible endpoint"
                for name in names if BENCHMARKS[name].needs_judge and judge is None]
    if judge is not None and not judge.model:
        problems.append("--judge-model: the judge model's name is needed with --judge-url")
    return problems


def main(argv: list[str] | None = None) -> ScoreReport:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    parser.add_argument("--annotations", required=True, help="the benchmark's published folder (or file), or s3://")
    parser.add_argument("--predictions", required=True, help="answers JSONL: {question_id, text} per line")
    parser.add_argument("--question-file", help="LLaVA's question file the answers were made from (JSONL with "
                        "question_id, or ScienceQA's llava_test_CQM-A.json); optional")
    parser.add_argument("--max-unmatched", type=float, default=UNMATCHED_LIMIT,
                        help="the share of answers that may name no question before the file is refused")
    parser.add_argument("--images", help="image folder, if not the benchmark's usual subfolder (only MMBench "
                        "embeds its images; the others' image paths are checked by jobs.evaluate, not here)")
    parser.add_argument("--output", type=Path, help="where scores.json / the submission file go "
                        "(default: beside --predictions)")
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// paths")
    add_judge_arguments(parser)
    args = parser.parse_args(argv)
    judge = judge_from_args(args)
    problems = judge_problems([args.benchmark], judge)
    try:
        loaded = load_benchmark(args.benchmark, args.annotations, args.images, args.s3_endpoint_url)
    except BenchmarkFormatError as error:
        problems.append(f"--annotations: {error}")
    if problems:
        parser.exit(2, "jobs.score cannot start:\n" + "".join(f"  {p}\n" for p in problems))
    try:
        questions = read_question_file(args.question_file, args.s3_endpoint_url) if args.question_file else None
    except BenchmarkFormatError as error:
        parser.exit(2, f"jobs.score: --question-file: {error}\n")
    answers, malformed = read_answers(args.predictions, args.s3_endpoint_url)
    output = args.output or (Path(args.predictions).parent if "://" not in args.predictions else Path("."))
    try:
        report = score_and_write(args.benchmark, loaded, answers, judge, output, malformed=malformed,
                                 question_file=questions, unmatched_limit=args.max_unmatched)
    except UnmatchedAnswers as error:
        parser.exit(2, f"jobs.score: --predictions: {error}\n")
    print(comparison_table([report]), flush=True)
    print(json.dumps(report.metrics, sort_keys=True), flush=True)
    return report


def _read_text(path: str, s3_endpoint_url: str | None) -> str:
    filesystem, inner = filesystem_for(path, s3_endpoint_url)
    with filesystem.open_input_stream(inner) as stream:
        return stream.readall().decode("utf-8", "replace")


def read_question_file(path: str, s3_endpoint_url: str | None = None) -> dict[str, dict]:
    """LLaVA's question records by id: JSONL with ``question_id`` (``llava_pope_test.jsonl``, ...) or a JSON
    array with ``id`` (``llava_test_CQM-A.json``)."""
    text = _read_text(path, s3_endpoint_url)
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
        return {str(r.get("question_id", r.get("id"))): r for r in records if isinstance(r, dict)}
    except json.JSONDecodeError as error:
        raise BenchmarkFormatError("question file", path, f"JSONL or a JSON array of LLaVA's question records "
                                   f"(not JSON: {error})") from error


def read_answers(path: str, s3_endpoint_url: str | None = None) -> tuple[list[dict], int]:
    """The answers of a LLaVA answer file, and the number of lines that are not ``{question_id, text}`` JSON."""
    lines = _read_text(path, s3_endpoint_url).splitlines()
    answers, malformed = [], 0
    for line in filter(str.strip, lines):
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            malformed += 1
            continue
        if isinstance(answer, dict) and "question_id" in answer and isinstance(answer.get("text", ""), str):
            answers.append(answer)
        else:
            malformed += 1
    return answers, malformed


def score_and_write(name: str, loaded: Loaded, answers: list[dict], judge: EndpointJudge | None, output: Path,
                    malformed: int = 0, question_file: dict[str, dict] | None = None,
                    unmatched_limit: float = UNMATCHED_LIMIT) -> ScoreReport:
    """Score (``llava_platform.benchmarks.score_answers``), then write ``scores.json`` and, for a test split,
    the submission file to ``output``; what was unmatched or missing is logged with examples."""
    report = score_answers(name, loaded, answers, judge, question_file=question_file, unmatched_limit=unmatched_limit)
    report.metrics["answers/malformed"] = float(malformed)
    output.mkdir(parents=True, exist_ok=True)
    if loaded.submission is not None:
        replies: dict[str, str] = {}
        for answer in answers:
            replies.setdefault(str(answer["question_id"]), str(answer.get("text") or ""))
        filename, content = loaded.submission({q.question_id: replies.get(q.question_id, "")
                                               for q in loaded.questions})
        (output / filename).write_bytes(content)
        report.notes.append(f"submission file: {output / filename}")
    (output / "scores.json").write_text(json.dumps(report.metrics, indent=1, sort_keys=True))
    for note in report.notes:
        log(f"{name}: {note}")
    for what, ids in (("answers match no question", report.unmatched), ("questions have no answer", report.missing)):
        if ids:
            log(f"{name}: {len(ids)} {what} (e.g. {', '.join(ids[:5])})")
    if malformed:
        log(f"{name}: {malformed} answer lines are not {{question_id, text}} JSON")
    if judge is not None and judge.failures:
        log(f"{name}: {len(judge.failures)} judge requests failed after retries (judge/failed)")
    return report


if __name__ == "__main__":
    main()
