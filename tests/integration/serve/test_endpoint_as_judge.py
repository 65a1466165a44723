"""Our own OpenAI-compatible endpoint as the benchmarks' judge model: the judge client reaches it through
the ``openai`` client, and every verdict the tiny model gives is either scored or counted as not judged."""

from llava_platform.benchmarks import load_benchmark, score_answers
from llava_platform.benchmarks.judge import EndpointJudge
from llava_platform.benchmarks.judged import mmvet_prompt, parse_grade
from tests.helpers.benchmark_files import CASES, write_benchmark
from tests.helpers.endpoint import KEY, MODEL


def test_our_endpoint_judges_mm_vet(server, tmp_path):
    loaded = load_benchmark("mmvet", write_benchmark("mmvet", tmp_path))
    replies, _ = CASES["mmvet"]
    judge = EndpointJudge(f"{server}/v1", MODEL, api_key=KEY, concurrency=2)
    report = score_answers("mmvet", loaded, [{"question_id": q, "text": t} for q, t in replies.items()], judge)
    assert judge.failures == []  # the endpoint answered every prompt
    # the tiny model's greedy verdicts, asked again: those without a grade are counted, never scored as 0
    questions = {"v1_0": ("What shape is this?", "square"), "v1_1": ("What is 2+3 on the board?", "5 <OR> five")}
    verdicts = judge.complete_all([mmvet_prompt(*questions[q], replies[q]) for q in replies], max_tokens=16)
    grades = [parse_grade(verdict) for verdict in verdicts]
    assert report.metrics["judge/failed"] == sum(grade is None for grade in grades)
    graded = [grade for grade in grades if grade is not None]
    assert report.metrics["score"] == (100 * sum(graded) / len(graded) if graded else 0.0)
