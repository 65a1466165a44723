"""Evaluate a checkpoint on LLaVA-format questions or the LLaVA-1.5 benchmarks with Ray Data batch inference;
scores go to MLflow.

    python -m jobs.evaluate --model models:/tiny-cpu-demo/1 --data outputs/tiny-cpu-demo/data/eval.jsonl \\
        --image-root outputs/tiny-cpu-demo/data
    python -m jobs.evaluate --model models:/llava15-7b/3 --benchmark pope --annotations /data/pope \\
        --benchmark mmbench --annotations /data/mmbench/mmbench_dev_20230712.tsv --gpus-per-replica 1 --engine vllm
    ray job submit --working-dir . -- python -m jobs.evaluate --model models:/llava15-7b/3 \\
        --data s3://bucket/eval/scienceqa.jsonl --image-root s3://bucket/eval/images --replicas 8 --gpus-per-replica 1 \
        --engine vllm

Each record's first human turn is the question; ``answer`` (or the first assistant turn) is the gold
answer, and ``type`` says how it is scored: ``short`` (VQA-style normalised exact match, the
default) or ``mc`` (the option letter, ScienceQA-style). Model replicas are a Ray Data actor pool
(CPU or GPU); malformed records are quarantined with their reason and counted, never scored.
``--engine vllm`` gives each replica a vLLM engine (continuous batching) instead of transformers'
``generate``: the same prompts and greedy decoding, so the same predictions.

Writes ``predictions.jsonl``, ``quarantine.jsonl`` and ``scores.json`` to ``--output`` and logs the
scores as ``eval/*`` metrics and the files as artifacts into an MLflow run: the run that produced the
model for ``models:/`` and ``runs:/`` URIs, else ``--run-id``, else a new run in ``--experiment``.

``--benchmark NAME --annotations PATH`` (repeatable) reads benchmarks of the LLaVA-1.5 table from their
published files (``llava_platform.benchmarks``; every file is checked before any model loads; with
``--question-file NAME=PATH``, only the records of LLaVA's question file, with its prompts), answers
all their questions in one Ray Data pass with LLaVA-1.5's prompts and token caps, greedily, and scores
each with ``jobs.score``'s code: ``<output>/<benchmark>/answers.jsonl`` (LLaVA's answer format, so
``jobs.score`` reproduces the scores), ``llava_answers.jsonl`` (the same keyed by LLaVA's question files, for
LLaVA's own conversion scripts), ``scores.json``, ``eval/<benchmark>/<metric>`` in MLflow, and
``benchmarks.md``, the comparison with LLaVA-1.5-7B's published figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from pydantic import ValidationError

from jobs.console import PreflightError, job_log, start_ray
from jobs.score import add_judge_arguments, judge_from_args, judge_problems, read_question_file, score_and_write
from llava_platform import tracking
from llava_platform.benchmarks import (
    BENCHMARKS,
    BenchmarkFormatError,
    ScoreReport,
    comparison_table,
    llava_answer_lines,
    load_benchmark,
    with_llava_questions,
)
from llava_platform.benchmarks.judge import EndpointJudge
from llava_platform.config.schema import InferenceConfig, VllmConfig
from llava_platform.evaluation import summarize
from llava_platform.model.sources import CheckpointSourceError, source_run_id
from llava_platform.storage import is_remote
from pipelines.evaluate import answer_benchmarks, predict
from pipelines.preprocess import finish
from pipelines.quarantine import PreprocessReport
from pipelines.sources import read_records

METRIC_PREFIX = "eval"
"""MLflow metrics are ``eval/accuracy``, ``eval/accuracy/short``, ``eval/accuracy/mc``, ``eval/data/read``, ..."""


log = job_log("evaluate")
"""This job's lines on standard error (``jobs.console.say``)."""


def main(argv: list[str] | None = None) -> EvaluationResult:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder, s3://..., models:/<name>/<version>, runs:/<id>/<path>")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", nargs="+", help="LLaVA-format eval files (JSON, JSONL, Parquet)")
    what.add_argument("--benchmark", action="append", choices=list(BENCHMARKS),
                      help="a benchmark of the LLaVA-1.5 table (repeat for several), each with an --annotations")
    parser.add_argument("--annotations", action="append", default=[],
                        help="the benchmark's published folder or file (local or s3://), one per --benchmark")
    parser.add_argument("--images", action="append", default=[], metavar="NAME=PATH",
                        help="a benchmark's image folder, where it is not the usual subfolder of its annotations")
    parser.add_argument("--question-file", action="append", default=[], metavar="NAME=PATH",
                        help="ask a benchmark's questions as LLaVA's question file does (its records and prompts, "
                        "e.g. pope=llava_pope_test.jsonl)")
    parser.add_argument("--image-root", help="folder or s3:// prefix of the records' relative image paths")
    parser.add_argument("--output", type=Path, default=Path("outputs/evaluation"), help="where result files go")
    add_inference_arguments(parser)
    parser.add_argument("--tracking-uri", help="MLflow (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--run-id", help="MLflow run to log into when the model URI names none")
    parser.add_argument("--experiment", default="evaluation", help="experiment of a new run")
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// paths")
    add_judge_arguments(parser)
    args = parser.parse_args(argv)
    try:
        inference = inference_from_args(args)
        if args.benchmark:
            return run_benchmarks(
                model=args.model, benchmarks=benchmark_specs(args.benchmark, args.annotations, args.images,
                                                             args.question_file),
                output=args.output, tracking_uri=tracking.resolve_tracking_uri(args.tracking_uri),
                judge=judge_from_args(args), inference=inference, max_new_tokens=args.max_new_tokens,
                run_id=args.run_id, experiment=args.experiment, s3_endpoint_url=args.s3_endpoint_url)
        return run(
            model=args.model, data=args.data, image_root=args.image_root, output=args.output, inference=inference,
            tracking_uri=tracking.resolve_tracking_uri(args.tracking_uri), run_id=args.run_id,
            experiment=args.experiment, s3_endpoint_url=args.s3_endpoint_url,
        )
    except PreflightError as error:
        parser.exit(2, str(error))


INFERENCE_FLAGS = {"replicas": "num_replicas", "batch_size": "batch_size", "cpus_per_replica": "cpus_per_replica",
                   "gpus_per_replica": "gpus_per_replica", "video_frames": "video_frames",
                   "max_image_pixels": "max_image_pixels", "engine": "engine", "dtype": "dtype"}
"""``jobs.evaluate``'s flags (argparse dest) of ``InferenceConfig``'s settings: each flag's default and help are
the setting's (``--max-new-tokens`` and ``--vllm`` below)."""


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch-inference flags, their defaults and help taken from ``InferenceConfig``."""
    for dest, name in INFERENCE_FLAGS.items():
        field = InferenceConfig.model_fields[name]
        choices = list(typing.get_args(field.annotation)) or None
        kind = None if choices else type(InferenceConfig.default(name))
        parser.add_argument(f"--{dest.replace('_', '-')}", dest=dest, type=kind, choices=choices,
                            default=InferenceConfig.default(name), help=InferenceConfig.doc(name))
    parser.add_argument("--max-new-tokens", type=int, help=f"answer length cap (--data: default "
                        f"{InferenceConfig.default('max_new_tokens')}; benchmarks: each one's own LLaVA-1.5 cap, "
                        "which this lowers)")
    parser.add_argument("--vllm", type=json.loads, default={}, metavar="JSON",
                        help='vLLM engine settings, e.g. \'{"max_model_len": 4096, "enforce_eager": true}\' '
                             "(config.schema.VllmConfig; resources come from --*-per-replica)")


def inference_from_args(args: argparse.Namespace) -> InferenceConfig:
    """The flags as an ``InferenceConfig``, validated.

    Raises:
        PreflightError: a value the setting refuses (named by its flag).
    """
    values = {name: getattr(args, dest) for dest, name in INFERENCE_FLAGS.items()}
    if args.max_new_tokens:
        values["max_new_tokens"] = args.max_new_tokens
    try:
        vllm = VllmConfig.model_validate(args.vllm)
    except ValidationError as error:
        problems = [f"--vllm: {e['loc'][0] if e['loc'] else ''}: {e['msg']}" for e in error.errors()]
        raise PreflightError("evaluate", problems) from error
    try:
        return InferenceConfig(**values, vllm=vllm)
    except ValidationError as error:
        flags = {name: dest for dest, name in INFERENCE_FLAGS.items()} | {"max_new_tokens": "max_new_tokens"}
        problems = [f"--{flags[e['loc'][0]].replace('_', '-')}: {e['msg']}" for e in error.errors()]
        raise PreflightError("evaluate", problems) from error


@dataclass(frozen=True)
class EvaluationResult:
    """What an evaluation produced."""

    scores: dict[str, float]
    """``accuracy``, ``accuracy/short``, ``accuracy/mc``, ``count/short``, ``count/mc``."""
    run_id: str
    """The MLflow run the ``eval/*`` metrics and files went to."""
    predictions: Path
    report: PreprocessReport
    """Records read, kept (scored) and quarantined."""


def run(*, model: str, data: list[str], output: Path, tracking_uri: str, inference: InferenceConfig,
        image_root: str | None = None, run_id: str | None = None, experiment: str = "evaluation",
        s3_endpoint_url: str | None = None) -> EvaluationResult:
    """Answer, score, write and log (``inference``: the engine, replicas, batch size, answer length, media limits).

    Raises:
        PreflightError: a missing file or folder, or a model URI that does not resolve.
    """
    problems = preflight(model, data, image_root, tracking_uri)
    if problems:
        raise PreflightError("evaluate", problems)
    run_id = source_run_id(model, tracking_uri) or run_id or tracking.start_run(tracking_uri, experiment, "evaluate")

    start_ray()
    plan = inference.build()
    log(f"{model}: {', '.join(data)} on {plan.num_replicas} {plan.engine} replica(s) "
        f"({'GPU' if plan.gpus_per_replica else 'CPU'})")
    predictions, quarantine = predict(
        read_records(data, s3_endpoint_url, cpus_per_task=min(1.0, plan.cpus_per_replica)), model=model,
        cache_dir=str(Path(tempfile.gettempdir()) / "llava-model-cache"), tracking_uri=tracking_uri,
        image_root=image_root, s3_endpoint_url=s3_endpoint_url, plan=plan,
    )
    rows = sorted(predictions.take_all(), key=lambda row: row["id"])
    output.mkdir(parents=True, exist_ok=True)
    report = finish(quarantine, output / "quarantine.jsonl")
    scores = summarize(rows)
    files = write_results(output, rows, scores)

    metrics = {f"{METRIC_PREFIX}/{name}": value for name, value in scores.items()}
    metrics |= {f"{METRIC_PREFIX}/{name}": value for name, value in report.as_metrics().items()}
    tracking.log_metrics(tracking_uri, run_id, metrics, step=0)
    for path in files:
        tracking.log_artifact(tracking_uri, run_id, path, artifact_path="evaluation")
    print(score_table(scores), flush=True)
    log(f"MLflow run {run_id}: {len(metrics)} eval/* metrics, predictions under artifacts/evaluation")
    return EvaluationResult(scores=scores, run_id=run_id, predictions=files[0], report=report)


def preflight(model: str, data: list[str], image_root: str | None, tracking_uri: str) -> list[str]:
    """Everything that can be checked before Ray starts, each problem naming its option."""
    problems = [f"--data: {path} does not exist" for path in data if not is_remote(path) and not Path(path).exists()]
    if image_root and not is_remote(image_root) and not Path(image_root).is_dir():
        problems.append(f"--image-root: {image_root} is not a folder")
    return problems + model_problems(model, tracking_uri)


def model_problems(model: str, tracking_uri: str) -> list[str]:
    """``--model`` problems found without loading it: an unknown registered model, a folder without a checkpoint."""
    problems = []
    if model.startswith("models:/"):
        try:
            source_run_id(model, tracking_uri)
        except CheckpointSourceError as error:
            problems.append(f"--model: {error}")
    elif not is_remote(model) and not (Path(model) / "config.json").is_file():
        problems.append(f"--model: {model} is not a Hugging Face checkpoint folder (no config.json)")
    return problems


@dataclass(frozen=True)
class BenchmarkSpec:
    """One ``--benchmark`` with its ``--annotations`` (and ``--images``, ``--question-file``, if given)."""

    name: str
    annotations: str
    images: str | None = None
    question_file: str | None = None
    """LLaVA's question file for it: its records and prompts are asked (``with_llava_questions``)."""


def benchmark_specs(names: list[str], annotations: list[str], images: list[str],
                    question_files: list[str] = ()) -> list[BenchmarkSpec]:
    """Pair each ``--benchmark`` with its ``--annotations`` (in order), ``--images NAME=PATH`` and
    ``--question-file NAME=PATH``.

    Raises:
        PreflightError: counts that do not pair up, an ``--images``/``--question-file`` not NAME=PATH.
    """
    problems = []
    if len(annotations) != len(names):
        problems.append(f"--annotations: give one per --benchmark, in the same order "
                        f"({len(names)} benchmarks, {len(annotations)} annotations)")
    named = {}
    for flag, items in (("--images", images), ("--question-file", question_files)):
        named[flag] = dict(item.split("=", 1) for item in items if "=" in item)
        problems += [f"{flag}: {item!r} is not NAME=PATH" for item in items if "=" not in item]
        problems += [f"{flag}: {name} is not one of the --benchmark names" for name in named[flag] if name not in names]
    if problems:
        raise PreflightError("evaluate", problems)
    return [BenchmarkSpec(name, path, named["--images"].get(name), named["--question-file"].get(name))
            for name, path in zip(names, annotations, strict=True)]


@dataclass(frozen=True)
class BenchmarkResult:
    """What a benchmark evaluation produced."""

    reports: list[ScoreReport]
    """Per benchmark: metrics (``report.headline`` on the paper's scale), unmatched and missing answers."""
    run_id: str
    answers: dict[str, Path]
    """Benchmark -> its answers file (LLaVA's answer format, what ``jobs.score`` takes)."""
    report: PreprocessReport
    """Questions read, answered and quarantined (an image that cannot be read)."""
    table: str
    """The markdown comparison with LLaVA-1.5-7B (also ``benchmarks.md``)."""


def run_benchmarks(*, model: str, benchmarks: list[BenchmarkSpec], output: Path, tracking_uri: str,
                   inference: InferenceConfig, judge: EndpointJudge | None = None, max_new_tokens: int | None = None,
                   run_id: str | None = None, experiment: str = "evaluation",
                   s3_endpoint_url: str | None = None) -> BenchmarkResult:
    """Read every benchmark (before any model loads), answer all questions in one Ray Data pass, score each
    as ``jobs.score`` does, write and log. Each benchmark answers with its own LLaVA-1.5 token cap, lowered to
    ``max_new_tokens`` when given (``inference.max_new_tokens`` is not used).

    Raises:
        PreflightError: a benchmark file missing or not in its published format, a judge-scored benchmark
            without a judge, a model URI that does not resolve.
    """
    problems = model_problems(model, tracking_uri) + judge_problems([b.name for b in benchmarks], judge)
    loaded = {}
    for spec in benchmarks:
        try:
            loaded[spec.name] = load_benchmark(spec.name, spec.annotations, spec.images, s3_endpoint_url)
            if spec.question_file:
                records = read_question_file(spec.question_file, s3_endpoint_url).values()
                loaded[spec.name] = with_llava_questions(spec.name, loaded[spec.name], records)
        except BenchmarkFormatError as error:
            problems.append(f"--annotations: {error}")
    if problems:
        raise PreflightError("evaluate", problems)
    run_id = source_run_id(model, tracking_uri) or run_id or tracking.start_run(tracking_uri, experiment, "evaluate")

    start_ray()
    rows = [{"benchmark": name, "question_id": q.question_id, "prompt": q.prompt, "image": q.image,
             "image_bytes": q.image_bytes,
             "max_new_tokens": min(q.max_new_tokens, max_new_tokens) if max_new_tokens else q.max_new_tokens}
            for name, benchmark in loaded.items() for q in benchmark.questions]
    plan = inference.build()
    log(f"{model}: {len(rows)} questions of {', '.join(loaded)} on {plan.num_replicas} {plan.engine} replica(s)")
    answers, quarantine = answer_benchmarks(
        ray.data.from_items(rows), model=model, cache_dir=str(Path(tempfile.gettempdir()) / "llava-model-cache"),
        tracking_uri=tracking_uri, s3_endpoint_url=s3_endpoint_url, plan=plan)
    by_benchmark: dict[str, list[dict[str, Any]]] = {name: [] for name in loaded}
    for answer in answers.take_all():
        by_benchmark[answer.pop("benchmark")].append(answer | {"model_id": model})
    output.mkdir(parents=True, exist_ok=True)
    report = finish(quarantine, output / "quarantine.jsonl")

    reports, files, metrics = [], {}, {}
    for name, benchmark in loaded.items():
        folder = output / name
        folder.mkdir(parents=True, exist_ok=True)
        files[name] = folder / "answers.jsonl"
        files[name].write_text("".join(json.dumps(a) + "\n" for a in sorted(by_benchmark[name],
                                                                              key=lambda a: a["question_id"])))
        (folder / "llava_answers.jsonl").write_text("".join(  # LLaVA's ids: its conversion scripts read these
            json.dumps(line, ensure_ascii=False) + "\n" for line in llava_answer_lines(benchmark, by_benchmark[name],
                                                                                       model)))
        scored = score_and_write(name, benchmark, by_benchmark[name], judge, folder)
        reports.append(scored)
        metrics |= {f"{METRIC_PREFIX}/{name}/{metric}": value for metric, value in scored.metrics.items()}
    table = comparison_table(reports)
    (output / "benchmarks.md").write_text(f"# {model}\n\n{table}\n")
    metrics |= {f"{METRIC_PREFIX}/{name}": value for name, value in report.as_metrics().items()}
    tracking.log_metrics(tracking_uri, run_id, metrics, step=0)
    for path in [output / "benchmarks.md", output / "quarantine.jsonl"]:
        tracking.log_artifact(tracking_uri, run_id, path, artifact_path="evaluation")
    for name in loaded:
        tracking.log_artifact(tracking_uri, run_id, output / name, artifact_path=f"evaluation/{name}")
    print(table, flush=True)
    log(f"MLflow run {run_id}: {len(metrics)} eval/* metrics; answers, scores and benchmarks.md under "
        "artifacts/evaluation")
    return BenchmarkResult(reports=reports, run_id=run_id, answers=files, report=report, table=table)


def write_results(output: Path, rows: list[dict[str, Any]], scores: dict[str, float]) -> list[Path]:
    predictions = output / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (output / "scores.json").write_text(json.dumps(scores, indent=1))
    return [predictions, output / "scores.json", output / "quarantine.jsonl"]


def score_table(scores: dict[str, float]) -> str:
    lines = ["evaluation"]
    for name, value in scores.items():
        lines.append(f"  {name:<18}{value:>8.1%}" if name.startswith("accuracy") else f"  {name:<18}{int(value):>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
