"""``jobs.evaluate --benchmark``: all twelve benchmarks of the LLaVA-1.5 table, in their published layouts
(POPE read from S3), answered by the tiny LLaVA-1.5 checkpoint in one Ray Data pass, scored (the judge:
the tests' scripted OpenAI-protocol server), logged to a real MLflow server; ``jobs.score`` reproduces
every score from the answers files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from jobs import evaluate, score
from llava_platform.benchmarks import BENCHMARKS, load_benchmark
from llava_platform.benchmarks.judge import EndpointJudge
from llava_platform.config.schema import InferenceConfig
from tests.helpers.benchmark_files import JUDGE_VERDICTS, write_benchmark
from tests.helpers.judge_server import ScriptedJudge
from tests.helpers.servers import S3_TEST_ENV


@dataclass
class BenchmarkRun:
    result: evaluate.BenchmarkResult
    annotations: dict[str, str]
    printed: str


def upload_folder(folder: Path, bucket: str, endpoint: str) -> str:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"])
    s3.create_bucket(Bucket=bucket)
    for path in folder.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"pope/{path.relative_to(folder)}")
    return f"s3://{bucket}/pope"


@pytest.fixture(scope="module")
def benchmark_run(ray_cluster, mlflow_server, s3_server, saved_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    annotations = {name: write_benchmark(name, root) for name in BENCHMARKS}
    annotations["pope"] = upload_folder(Path(annotations["pope"]), "bench", s3_server)
    (root / "gqa" / "images" / "n2.jpg").unlink()  # one question's image is missing: quarantined, reported missing
    with ScriptedJudge(JUDGE_VERDICTS) as judge:
        result = evaluate.run_benchmarks(
            model=str(saved_checkpoints["llava"]), tracking_uri=mlflow_server, output=root / "out",
            benchmarks=[evaluate.BenchmarkSpec(name, path) for name, path in annotations.items()],
            judge=EndpointJudge(judge.url, "scripted-judge"), max_new_tokens=4,
            inference=InferenceConfig(batch_size=16, cpus_per_replica=0.5), s3_endpoint_url=s3_server)
        yield BenchmarkRun(result, annotations, (root / "out" / "benchmarks.md").read_text())


def test_every_question_of_every_benchmark_is_answered_once(benchmark_run, s3_server):
    for name, path in benchmark_run.result.answers.items():
        loaded = load_benchmark(name, benchmark_run.annotations[name], s3_endpoint_url=s3_server)
        answers = [json.loads(line) for line in path.read_text().splitlines()]
        expected = {q.question_id: q.prompt for q in loaded.questions}
        if name == "gqa":
            expected.pop("202")  # its image is missing
        assert {a["question_id"]: a["prompt"] for a in answers} == expected, name
        assert len(answers) == len(expected) and all(isinstance(a["text"], str) for a in answers)


def test_a_question_whose_image_is_missing_is_quarantined_and_reported_missing(benchmark_run):
    assert benchmark_run.result.report.quarantined == {"missing_image": 1}
    gqa = next(r for r in benchmark_run.result.reports if r.benchmark == "gqa")
    assert gqa.missing == ["202"] and gqa.metrics["answers/missing"] == 1


def test_jobs_score_reproduces_every_score_from_the_answers_files(benchmark_run, s3_server, capsys):
    with ScriptedJudge(JUDGE_VERDICTS) as server:  # the same verdicts, from a fresh server
        for report in benchmark_run.result.reports:
            answers = benchmark_run.result.answers[report.benchmark]
            again = score.main(["--benchmark", report.benchmark, "--annotations",
                                benchmark_run.annotations[report.benchmark], "--s3-endpoint-url", s3_server,
                                "--predictions", str(answers), "--output", str(answers.parent / "again"),
                                "--judge-url", server.url, "--judge-model", "scripted-judge"])
            last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert last == again.metrics == report.metrics, report.benchmark
            theirs = score.main(["--benchmark", report.benchmark, "--annotations",  # LLaVA's ids, the same scores
                                 benchmark_run.annotations[report.benchmark], "--s3-endpoint-url", s3_server,
                                 "--predictions", str(answers.parent / "llava_answers.jsonl"), "--output",
                                 str(answers.parent / "theirs"), "--judge-url", server.url,
                                 "--judge-model", "scripted-judge"])
            capsys.readouterr()
            assert theirs.metrics == report.metrics, report.benchmark


def test_scores_and_answers_land_on_the_mlflow_run(benchmark_run, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    metrics = client.get_run(benchmark_run.result.run_id).data.metrics
    for report in benchmark_run.result.reports:
        headline = BENCHMARKS[report.benchmark].headline
        assert metrics[f"eval/{report.benchmark}/{headline}"] == pytest.approx(report.metrics[headline])
    assert metrics["eval/pope/random/yes_ratio"] >= 0 and metrics["eval/data/quarantined/missing_image"] == 1
    artifacts = {a.path for a in client.list_artifacts(benchmark_run.result.run_id, "evaluation")}
    assert {"evaluation/benchmarks.md", "evaluation/pope", "evaluation/mmvet"} <= artifacts
    pope = {a.path for a in client.list_artifacts(benchmark_run.result.run_id, "evaluation/pope")}
    assert pope == {"evaluation/pope/answers.jsonl", "evaluation/pope/llava_answers.jsonl",
                    "evaluation/pope/scores.json"}


def test_the_comparison_table_has_every_benchmark_beside_the_paper(benchmark_run):
    rows = benchmark_run.printed.splitlines()
    for name, benchmark in BENCHMARKS.items():
        row = next(r for r in rows if r.startswith(f"| {benchmark.title} |"))
        assert f"| {benchmark.published.describe()} |" in row, name


def test_the_answers_are_the_checkpoints_greedy_answers_to_llava_15s_prompts(benchmark_run, saved_checkpoints):
    from PIL import Image

    from llava_platform.generation.engine import answer_questions
    from llava_platform.generation.transformers import TransformersEngine
    from llava_platform.model.compose import load_pretrained_llava

    model, processor = load_pretrained_llava(str(saved_checkpoints["llava"]))
    path = Path(benchmark_run.annotations["vqav2"]) / "val2014" / "COCO_val2014_000000000042.jpg"
    answers = [json.loads(line) for line in benchmark_run.result.answers["vqav2"].read_text().splitlines()]
    first = next(a for a in answers if a["question_id"] == "1")
    with Image.open(path) as image:
        engine = TransformersEngine(model, processor, "cpu")
        expected = answer_questions(engine, [(image.convert("RGB"), first["prompt"])],
                                    max_new_tokens=4)
    assert first["text"] == expected[0]


@pytest.mark.chaos
def test_the_vllm_engine_gives_the_same_benchmark_answers(benchmark_run, mlflow_server, s3_server, saved_checkpoints,
                                                          tmp_path):
    """The same benchmarks (MMBench's embedded images, POPE's files on S3) on vLLM's CPU build: the same
    greedy answers as the transformers engine, question for question. (``make chaos``: ~30 s of engine start.)"""
    from tests.helpers.endpoint import VLLM_TEST_SETTINGS

    names = ["pope", "mmbench", "scienceqa", "textvqa"]
    result = evaluate.run_benchmarks(
        model=str(saved_checkpoints["llava"]), tracking_uri=mlflow_server, output=tmp_path,
        benchmarks=[evaluate.BenchmarkSpec(name, benchmark_run.annotations[name]) for name in names],
        max_new_tokens=4, s3_endpoint_url=s3_server,
        inference=InferenceConfig(batch_size=16, engine="vllm", vllm=VLLM_TEST_SETTINGS))
    for name in names:
        def texts(path):
            return {a["question_id"]: a["text"] for a in map(json.loads, path.read_text().splitlines())}
        assert texts(result.answers[name]) == texts(benchmark_run.result.answers[name]), name
