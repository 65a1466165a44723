"""Evaluate a checkpoint on LLaVA-format questions with Ray Data batch inference; scores go to MLflow.

    python -m jobs.evaluate --model models:/tiny-cpu-demo/1 --data outputs/tiny-cpu-demo/data/eval.jsonl \\
        --image-root outputs/tiny-cpu-demo/data
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
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from jobs.console import quiet_ray_data
from llava_platform import tracking
from llava_platform.evaluation import summarize
from llava_platform.model.sources import CheckpointSourceError, source_run_id
from llava_platform.storage import is_remote
from llava_platform.vllm_engine import VllmSettings
from pipelines.evaluate import predict
from pipelines.preprocess import finish
from pipelines.quarantine import PreprocessReport
from pipelines.sources import read_records

METRIC_PREFIX = "eval"
"""MLflow metrics are ``eval/accuracy``, ``eval/accuracy/short``, ``eval/accuracy/mc``, ``eval/data/read``, ..."""


def log(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> EvaluationResult:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder, s3://..., models:/<name>/<version>, runs:/<id>/<path>")
    parser.add_argument("--data", required=True, nargs="+", help="LLaVA-format eval files (JSON, JSONL, Parquet)")
    parser.add_argument("--image-root", help="folder or s3:// prefix of the records' relative image paths")
    parser.add_argument("--output", type=Path, default=Path("outputs/evaluation"), help="where result files go")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (Ray Data actors)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="0: CPU replicas")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                        help="what generates: transformers in each replica, or a vLLM engine per replica "
                             "(continuous batching; its own environment, README 'The vLLM engine')")
    parser.add_argument("--vllm", type=json.loads, default={}, metavar="JSON",
                        help='vLLM engine settings, e.g. \'{"max_model_len": 4096, "enforce_eager": true}\' '
                             "(llava_platform.vllm_engine.VllmSettings; resources come from --*-per-replica)")
    parser.add_argument("--tracking-uri", help="MLflow (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--run-id", help="MLflow run to log into when the model URI names none")
    parser.add_argument("--experiment", default="evaluation", help="experiment of a new run")
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// paths")
    args = parser.parse_args(argv)
    try:
        return run(
            model=args.model, data=args.data, image_root=args.image_root, output=args.output,
            replicas=args.replicas, batch_size=args.batch_size, cpus_per_replica=args.cpus_per_replica,
            gpus_per_replica=args.gpus_per_replica, max_new_tokens=args.max_new_tokens,
            tracking_uri=tracking.resolve_tracking_uri(args.tracking_uri), run_id=args.run_id,
            experiment=args.experiment, s3_endpoint_url=args.s3_endpoint_url, engine=args.engine,
            vllm=VllmSettings.from_args(args.vllm),
        )
    except PreflightError as error:
        parser.exit(2, str(error))


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


class PreflightError(ValueError):
    """Problems found before any work starts, each naming its option (``problems``)."""

    def __init__(self, problems: list[str]):
        super().__init__("jobs.evaluate cannot start:\n" + "".join(f"  {p}\n" for p in problems))
        self.problems = problems


def run(*, model: str, data: list[str], output: Path, tracking_uri: str, image_root: str | None = None,
        replicas: int = 1, batch_size: int = 16, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
        max_new_tokens: int = 16, run_id: str | None = None, experiment: str = "evaluation",
        s3_endpoint_url: str | None = None, engine: str = "transformers",
        vllm: VllmSettings | None = None) -> EvaluationResult:
    """Answer, score, write and log.

    Raises:
        PreflightError: a missing file or folder, or a model URI that does not resolve.
    """
    problems = preflight(model, data, image_root, tracking_uri)
    if problems:
        raise PreflightError(problems)
    run_id = source_run_id(model, tracking_uri) or run_id or tracking.start_run(tracking_uri, experiment, "evaluate")

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    quiet_ray_data()
    log(f"{model}: {', '.join(data)} on {replicas} {engine} replica(s) ({'GPU' if gpus_per_replica else 'CPU'})")
    predictions, quarantine = predict(
        read_records(data, s3_endpoint_url, cpus_per_task=min(1.0, cpus_per_replica)), model=model,
        cache_dir=str(Path(tempfile.gettempdir()) / "llava-model-cache"), tracking_uri=tracking_uri,
        image_root=image_root, s3_endpoint_url=s3_endpoint_url, max_new_tokens=max_new_tokens, batch_size=batch_size,
        num_replicas=replicas, cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica, engine=engine,
        vllm=vllm,
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
    if model.startswith("models:/"):
        try:
            source_run_id(model, tracking_uri)
        except CheckpointSourceError as error:
            problems.append(f"--model: {error}")
    elif not is_remote(model) and not (Path(model) / "config.json").is_file():
        problems.append(f"--model: {model} is not a Hugging Face checkpoint folder (no config.json)")
    return problems


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
