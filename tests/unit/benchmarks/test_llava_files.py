"""LLaVA's own answer files, keyed by LLaVA's question files, score as our answers do.

``tests/helpers/benchmark_files.LLAVA_QUESTIONS`` holds, for each benchmark's tiny layout, the records of
LLaVA's question file (``playground/data/eval/<benchmark>/``: ``llava_pope_test.jsonl`` with its category
offsets, ``llava_mme.jsonl`` keyed by image path, ``llava_textvqa_val_v051_ocr.jsonl`` keyed by image id,
ScienceQA's ``llava_test_CQM-A.json``, MMBench's ``question_id``/``round_id``, ...), and the answers are
written as ``model_vqa*.py`` writes them. Each must reproduce the scores worked out by hand in ``CASES``
with nothing unmatched; a file keyed by other ids must fail, naming the ids expected and seen.
"""

from __future__ import annotations

import base64
import json

import pytest

from jobs import score
from llava_platform.benchmarks import BENCHMARKS
from tests.helpers.benchmark_files import (
    CASES,
    JUDGE_VERDICTS,
    LLAVA_EXTRA_ANSWERS,
    image_bytes,
    write_benchmark,
    write_llava_files,
)
from tests.helpers.judge_server import ScriptedJudge


@pytest.fixture(scope="module")
def judge_server():
    with ScriptedJudge(JUDGE_VERDICTS) as server:
        yield server


def score_llava_file(name, tmp_path, judge_server, *, with_question_file: bool, capsys) -> dict:
    answers, questions = write_llava_files(name, tmp_path)
    argv = ["--benchmark", name, "--annotations", write_benchmark(name, tmp_path), "--predictions", str(answers)]
    argv += ["--question-file", str(questions)] if with_question_file else []
    argv += ["--judge-url", judge_server.url, "--judge-model", "judge"] if BENCHMARKS[name].needs_judge else []
    score.main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("with_question_file", [True, False], ids=["question-file", "answers-alone"])
@pytest.mark.parametrize("name", list(CASES))
def test_llavas_answer_file_scores_as_our_answers(name, with_question_file, tmp_path, judge_server, capsys):
    metrics = score_llava_file(name, tmp_path, judge_server, with_question_file=with_question_file, capsys=capsys)
    replies, expected = CASES[name]
    for metric, value in expected.items():
        assert metrics[metric] == pytest.approx(value), metric
    assert metrics["answers/unmatched"] == metrics["answers/missing"] == 0
    assert metrics["answers/answered"] == len(replies)
    assert metrics["answers/outside"] == len(LLAVA_EXTRA_ANSWERS.get(name, {}))  # ScienceQA text-only, SEED video


@pytest.mark.parametrize("name, wrong_ids", [
    ("pope", lambda qid: qid + 5_000),  # ids outside every split's offset range
    ("mme", lambda qid: qid.replace("existence/", "count/")),
    ("vqav2", lambda qid: f"gqa-{qid}"),
])
def test_a_file_keyed_by_other_ids_fails_naming_both_schemes(name, wrong_ids, tmp_path, capsys):
    answers, _ = write_llava_files(name, tmp_path)
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    answers.write_text("".join(json.dumps(r | {"question_id": wrong_ids(r["question_id"])}) + "\n" for r in rows))
    with pytest.raises(SystemExit) as exit_:
        score.main(["--benchmark", name, "--annotations", write_benchmark(name, tmp_path),
                    "--predictions", str(answers)])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "answers name no question" in message and "LLaVA's" in message and "saw e.g." in message


def test_mmbench_tsv_with_circular_copies_takes_llavas_rows_as_rotations(tmp_path):
    """The dev TSVs LLaVA-1.5 was scored on hold each question's rotations as rows base + k x 10^6; LLaVA asks
    each row once (round_id 0). Those rows are the rotations: nothing is rotated again."""
    from llava_platform.benchmarks import load_benchmark, score_answers

    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    picture = base64.b64encode(image_bytes()).decode()
    rows = [(7, ["circle", "square"], "B"), (1_000_007, ["square", "circle"], "A")]
    lines = ["\t".join(header)] + ["\t".join([str(index), "Which shape?", "", *options, "nan", "nan", answer,
                                              "shape", picture]) for index, options, answer in rows]
    (tmp_path / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n")
    loaded = load_benchmark("mmbench", str(tmp_path / "mmbench_dev_20230712.tsv"))
    assert [q.question_id for q in loaded.questions] == ["7/0", "7/1"]
    given = [{"question_id": 7, "round_id": 0, "text": "B"}, {"question_id": 1_000_007, "round_id": 0, "text": "A"}]
    report = score_answers("mmbench", loaded, given)
    assert report.metrics["circular_accuracy"] == 1.0 and report.metrics["answers/unmatched"] == 0
    wrong = score_answers("mmbench", loaded, [given[0], given[1] | {"text": "B"}])
    assert wrong.metrics["circular_accuracy"] == 0.0 and wrong.metrics["accuracy"] == 1.0


@pytest.mark.parametrize("name", list(CASES))
def test_our_answers_written_in_llavas_ids_score_the_same(name, tmp_path, judge_server, capsys):
    """``llava_answer_lines`` (jobs.evaluate's llava_answers.jsonl): our answers keyed by LLaVA's question files,
    with LLaVA's fields; scored back, the same metrics, nothing unmatched."""
    from llava_platform.benchmarks import llava_answer_lines, load_benchmark

    annotations = write_benchmark(name, tmp_path)
    loaded = load_benchmark(name, annotations)
    replies, expected = CASES[name]
    lines = llava_answer_lines(loaded, [{"question_id": q, "text": t} for q, t in replies.items()], "tiny")
    assert all({"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(line) for line in lines)
    theirs, _ = write_llava_files(name, tmp_path / "theirs")
    llava_ids = {json.dumps(json.loads(line)["question_id"]) for line in theirs.read_text().splitlines()}
    assert {json.dumps(line["question_id"]) for line in lines} <= llava_ids  # LLaVA's ids, LLaVA's JSON types
    path = tmp_path / "llava_answers.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["--benchmark", name, "--annotations", annotations, "--predictions", str(path)]
    argv += ["--judge-url", judge_server.url, "--judge-model", "judge"] if BENCHMARKS[name].needs_judge else []
    score.main(argv)
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for metric, value in expected.items():
        assert metrics[metric] == pytest.approx(value), metric
    assert metrics["answers/unmatched"] == metrics["answers/missing"] == 0


def test_a_llava_question_file_chooses_the_questions_and_their_prompts(tmp_path):
    """TextVQA's llava_textvqa_val_v051_ocr.jsonl asks only the OCR variant; its prompts are taken verbatim."""
    from llava_platform.benchmarks import BenchmarkFormatError, load_benchmark, with_llava_questions
    from tests.helpers.benchmark_files import LLAVA_QUESTIONS

    loaded = load_benchmark("textvqa", write_benchmark("textvqa", tmp_path))
    records = [r for qid, r in LLAVA_QUESTIONS["textvqa"].items() if qid.startswith("ocr/")]
    asked = with_llava_questions("textvqa", loaded, records)
    assert [q.question_id for q in asked.questions] == ["ocr/34602", "ocr/34603"]
    assert [q.prompt for q in asked.questions] == [r["text"] for r in records]
    with pytest.raises(BenchmarkFormatError, match="LLaVA's ids"):
        with_llava_questions("textvqa", loaded, [{"question_id": "zzz", "text": "what?"}])
