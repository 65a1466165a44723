"""Every benchmark of the LLaVA-1.5 table read from its published layout and scored by the official rules,
against replies whose scores are worked out by hand (``tests/helpers/benchmark_files.py``); the judge is
the tests' scripted OpenAI-protocol server."""

import json

import pytest

from jobs import score
from llava_platform.benchmarks import BENCHMARKS, BenchmarkFormatError, comparison_table, load_benchmark, score_answers
from llava_platform.benchmarks.base import MULTIPLE_CHOICE, SHORT_ANSWER
from llava_platform.benchmarks.judge import EndpointJudge
from tests.helpers.benchmark_files import CASES, JUDGE_VERDICTS, write_benchmark, write_vizwiz
from tests.helpers.judge_server import ScriptedJudge


@pytest.fixture(scope="module")
def judge_server():
    with ScriptedJudge(JUDGE_VERDICTS) as server:
        yield server


def answers(replies: dict[str, str]) -> list[dict]:
    return [{"question_id": qid, "text": text} for qid, text in replies.items()]


@pytest.mark.parametrize("name", list(CASES))
def test_each_benchmark_scores_as_worked_out_by_hand(name, tmp_path, judge_server):
    replies, expected = CASES[name]
    loaded = load_benchmark(name, write_benchmark(name, tmp_path))
    assert sorted(q.question_id for q in loaded.questions) == sorted(replies)
    judge = EndpointJudge(judge_server.url, "judge") if BENCHMARKS[name].needs_judge else None
    report = score_answers(name, loaded, answers(replies), judge)
    for metric, value in expected.items():
        assert report.metrics[metric] == pytest.approx(value), metric
    assert report.metrics["answers/missing"] == report.metrics["answers/unmatched"] == 0


def test_mmbench_asks_the_judge_only_where_the_rules_cannot_read_a_letter(tmp_path, judge_server):
    replies, _ = CASES["mmbench"]
    loaded = load_benchmark("mmbench", write_benchmark("mmbench", tmp_path))
    before = judge_server.requests
    report = score_answers("mmbench", loaded, answers(replies), EndpointJudge(judge_server.url, "judge"))
    assert judge_server.requests - before == 1  # only "I cannot tell"; the judge says B = "red" in rotation (blue, red)
    assert report.metrics["extraction/judge"] == 1 and report.metrics["extraction/failed"] == 0
    assert report.metrics["circular_accuracy"] == 1.0


def test_prompts_are_llava_15s(tmp_path):
    vqa = {q.question_id: q for q in load_benchmark("vqav2", write_benchmark("vqav2", tmp_path)).questions}
    assert vqa["1"].prompt == f"What color is the square?\n{SHORT_ANSWER}" and vqa["1"].max_new_tokens == 128
    assert vqa["1"].image.endswith("val2014/COCO_val2014_000000000042.jpg")
    text = {q.question_id: q.prompt for q in load_benchmark("textvqa", write_benchmark("textvqa", tmp_path)).questions}
    assert text["ocr/34602"] == f"what brand is the phone?\nReference OCR token: nokia, phone\n{SHORT_ANSWER}"
    assert text["plain/34602"] == f"what brand is the phone?\n{SHORT_ANSWER}"
    assert text["ocr/34603"] == f"what is written?\nReference OCR token: \n{SHORT_ANSWER}"  # no tokens: the line stays
    sqa = load_benchmark("scienceqa", write_benchmark("scienceqa", tmp_path)).questions
    assert sqa[0].prompt == f"Context: A pet.\nWhich animal is a pet here?\nA. cat\nB. dog\nC. fish\n{MULTIPLE_CHOICE}"
    mmb = {q.question_id: q for q in load_benchmark("mmbench", write_benchmark("mmbench", tmp_path)).questions}
    assert mmb["1/1"].prompt == f"Look closely.\nWhat color is it?\nA. blue\nB. red\n{MULTIPLE_CHOICE}"
    assert mmb["1/1"].image is None and mmb["1/1"].image_bytes.startswith(b"\x89PNG")
    cn = load_benchmark("mmbench_cn", write_benchmark("mmbench_cn", tmp_path)).questions
    assert cn[0].prompt.endswith("\n请直接回答选项字母。")
    mme = {q.question_id: q.prompt for q in load_benchmark("mme", write_benchmark("mme", tmp_path)).questions}
    assert mme["artwork/10.jpg/1"] == f"Is there a dog in this image?\n{SHORT_ANSWER}"  # "Please answer yes or no." out
    assert mmb["0/0"].max_new_tokens == sqa[0].max_new_tokens == 1024
    vizwiz = load_benchmark("vizwiz", write_benchmark("vizwiz", tmp_path)).questions
    assert vizwiz[0].prompt == ("What is this?\nWhen the provided information is insufficient, respond with "
                                f"'Unanswerable'.\n{SHORT_ANSWER}")


def test_unmatched_missing_and_repeated_answers_are_counted_never_dropped(tmp_path):
    loaded = load_benchmark("gqa", write_benchmark("gqa", tmp_path))
    given = [{"question_id": "201", "text": "yes"}, {"question_id": "201", "text": "no"},
             {"question_id": "999", "text": "yes"}]
    report = score_answers("gqa", loaded, given, unmatched_limit=0.5)  # 1 of 3: allowed here
    assert report.unmatched == ["999"] and report.missing == ["202"]
    assert {k: report.metrics[k] for k in ("answers/unmatched", "answers/missing", "answers/duplicate")} == \
        {"answers/unmatched": 1, "answers/missing": 1, "answers/duplicate": 1}
    assert report.metrics["accuracy"] == 0.5  # the first answer to 201 counts; 202 scored as an empty reply


@pytest.mark.parametrize("name, file, content, expected", [
    ("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json", '[{"question": "x"}]',
     '{"questions": [{"question_id", "image_id", "question"}, ...]}'),
    ("pope", "coco_pope_random.json", '{"question_id": 1, "image": "a.jpg", "text": "?", "label": "maybe"}',
     '{"question_id", "image", "text", "label"} per line'),
    ("gqa", "testdev_balanced_questions.json", "not json", "not JSON"),
    ("mmbench", "mmbench_dev_20230712.tsv", "index\tquestion\n0\tWhat?\n",
     "columns missing: ['A', 'B', 'hint', 'image']"),
    ("seed", "SEED-Bench.json", '{"questions": []}', '"question_type": {"<name>": <id>}'),
])
def test_a_file_in_the_wrong_format_is_refused_naming_it_and_what_was_expected(name, file, content, expected,
                                                                               tmp_path):
    folder = tmp_path / name
    folder.mkdir()
    (folder / file).write_text(content)
    with pytest.raises(BenchmarkFormatError) as error:
        load_benchmark(name, str(folder / file) if name == "mmbench" else str(folder))
    assert file in str(error.value) and expected in str(error.value)


def test_a_folder_without_the_benchmark_files_names_them(tmp_path):
    with pytest.raises(BenchmarkFormatError, match="coco_pope_random.json"):
        load_benchmark("pope", str(tmp_path))
    with pytest.raises(BenchmarkFormatError, match="does not exist"):
        load_benchmark("mme", str(tmp_path / "nowhere"))


def test_a_failing_judge_is_retried_and_what_it_could_not_judge_is_reported(tmp_path):
    loaded = load_benchmark("mmvet", write_benchmark("mmvet", tmp_path))
    replies, _ = CASES["mmvet"]
    with ScriptedJudge(JUDGE_VERDICTS, faults=[429, 500, "garbage"]) as server:  # retried, then answered
        report = score_answers("mmvet", loaded, answers(replies), EndpointJudge(server.url, "judge", concurrency=1))
        assert server.requests == 5 and report.metrics["score"] == 75.0 and report.metrics["judge/failed"] == 0
    with ScriptedJudge(JUDGE_VERDICTS, faults=[503] * 2) as server:  # one prompt exhausts its retry
        judge = EndpointJudge(server.url, "judge", max_retries=1, concurrency=1)
        report = score_answers("mmvet", loaded, answers(replies), judge)
    assert report.metrics["judge/failed"] == 1 and len(judge.failures) == 1 and "503" in judge.failures[0]
    assert report.metrics["score"] == 50.0  # the other reply's grade alone (0.5), never a silent zero


def test_test_splits_write_the_evaluation_servers_files(tmp_path):
    folder = tmp_path / "vqav2"
    folder.mkdir()
    (folder / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps({"questions": [
        {"question_id": 7, "image_id": 1, "question": "What?"}]}))
    (folder / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps({"questions": [
        {"question_id": 7, "image_id": 1, "question": "What?"},
        {"question_id": 8, "image_id": 2, "question": "Who?"}]}))
    loaded = load_benchmark("vqav2", str(folder))
    name, content = loaded.submission({"7": "Two dogs."})
    assert name == "vqav2_test-dev_submission.json"
    assert json.loads(content) == [{"question_id": 7, "answer": "2 dogs"}, {"question_id": 8, "answer": ""}]
    write_vizwiz(tmp_path / "vizwiz")
    (tmp_path / "vizwiz" / "test.json").write_text(json.dumps([{"image": "VizWiz_test_00000000.jpg", "question": "?"}]))
    loaded = load_benchmark("vizwiz", str(tmp_path / "vizwiz" / "test.json"))
    assert json.loads(loaded.submission({"VizWiz_test_00000000.jpg": "Unanswerable"})[1]) == \
        [{"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"}]


def test_jobs_score_reproduces_the_scores_from_an_answers_file(tmp_path, capsys):
    replies, expected = CASES["pope"]
    lines = [json.dumps(a) for a in answers(replies)] + [json.dumps({"question_id": "random/99", "text": "yes"}),
                                                         "not json"]
    (tmp_path / "answers.jsonl").write_text("\n".join(lines) + "\n")
    report = score.main(["--benchmark", "pope", "--annotations", write_benchmark("pope", tmp_path),
                         "--predictions", str(tmp_path / "answers.jsonl"), "--max-unmatched", "0.25"])  # 1 of 5
    out = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(out[-1])
    assert printed == report.metrics and printed["f1"] == expected["f1"]
    assert printed["answers/unmatched"] == 1 and printed["answers/malformed"] == 1
    assert json.loads((tmp_path / "scores.json").read_text()) == printed
    assert "| POPE | f1 | 50.0 | COCO random/popular, F1 averaged; image | 85.9 (COCO random/popular/adversarial" \
        in "\n".join(out)


def test_jobs_score_refuses_a_judge_benchmark_without_a_judge(tmp_path, capsys):
    (tmp_path / "answers.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        score.main(["--benchmark", "mmvet", "--annotations", str(tmp_path / "nowhere"),
                    "--predictions", str(tmp_path / "answers.jsonl")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--judge-url: mmvet is scored by a judge model" in err
    assert "--annotations: mmvet:" in err


def test_the_comparison_table_shows_the_papers_figures():
    published = {name: b.published.value for name, b in BENCHMARKS.items()}
    assert published == {"vqav2": 78.5, "gqa": 62.0, "vizwiz": 50.0, "scienceqa": 66.8, "textvqa": 58.2,
                         "pope": 85.9, "mme": 1510.7, "mmbench": 64.3, "mmbench_cn": 58.3, "seed": 58.6,
                         "llava_bench": 65.4, "mmvet": 31.1}
    from llava_platform.benchmarks import ScoreReport
    counts = {"answers/questions": 8, "answers/missing": 0, "answers/unmatched": 0}
    report = ScoreReport("mme", {"perception": 325.0} | counts, scored_on="2 of 10 perception subtasks; image")
    row = comparison_table([report]).splitlines()[-1]
    assert row == ("| MME | perception | 325.0 | 2 of 10 perception subtasks; image | 1510.7 (perception "
                   "(10 subtasks); image; LLaVA-1.5 paper, Table 4 (LLaVA's docs/MODEL_ZOO.md)) | 8 | 0 | 0 |")


def test_every_reference_figure_names_its_split_modality_and_source():
    for name, benchmark in BENCHMARKS.items():
        reference = benchmark.published
        assert reference.split and reference.modality and reference.source, name
    assert "test-dev" in BENCHMARKS["vqav2"].published.split and "test-dev" in BENCHMARKS["vizwiz"].published.split
    assert "video" in BENCHMARKS["seed"].published.modality  # 58.6 is over images and video


def test_seed_scores_video_questions_on_llavas_middle_frames_when_present(tmp_path):
    """Without SEED-Bench-video-image/ the video question is left out and the score says it is image-only; with
    LLaVA's middle frame there it is asked on that frame and counted (accuracy/video)."""
    root = write_benchmark("seed", tmp_path)
    images_only = load_benchmark("seed", root)
    assert [q.question_id for q in images_only.questions] == ["s1", "s2"] and "image only" in images_only.scored_on
    (tmp_path / "seed" / "SEED-Bench-video-image").mkdir()
    (tmp_path / "seed" / "SEED-Bench-video-image" / "10_v1.png").write_bytes(b"png")
    everything = load_benchmark("seed", root)
    video = next(q for q in everything.questions if q.question_id == "v1")
    assert video.image.endswith("SEED-Bench-video-image/10_v1.png") and "video" in everything.scored_on
    metrics = score_answers("seed", everything, answers({"s1": "A", "s2": "C.", "v1": "A"})).metrics
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["accuracy/video"] == 1.0
    assert metrics["accuracy/image"] == 0.5


def test_mmbench_test_split_writes_the_excel_sheet_the_server_takes(tmp_path):
    import io

    import pandas as pd

    path = write_benchmark("mmbench", tmp_path)
    text = open(path, encoding="utf-8").read()
    text = text.replace("\tB\tshape\t", "\t\tshape\t").replace("\tA\tcolor\t", "\t\tcolor\t")  # no answers
    test_file = tmp_path / "mmbench_test_en_20231003.tsv"
    test_file.write_text(text, encoding="utf-8")
    loaded = load_benchmark("mmbench", str(test_file))
    assert loaded.submission is not None and len(loaded.questions) == 5  # every rotation is still asked
    name, content = loaded.submission({"0/0": "B", "0/1": "A", "1/0": "A"})
    sheet = pd.read_excel(io.BytesIO(content))
    assert name == "mmbench_test_submission.xlsx" and "image" not in sheet.columns
    assert list(sheet["index"]) == [0, 1] and list(sheet["prediction"]) == ["B", "A"]  # the first rotation's reply


def test_judge_verdicts_parse_as_llavas_and_mm_vets_scripts_read_them():
    from llava_platform.benchmarks.judged import parse_grade, parse_pair

    assert parse_pair("8 6\nbecause") == parse_pair("8, 6") == (8.0, 6.0)
    assert parse_pair("8 6 7") is parse_pair("Score: 8 6") is parse_pair("") is parse_pair(None) is None
    assert parse_grade("0.4") == 0.4 and parse_grade("1.0 because") == 1.0
    assert parse_grade("1.5") is parse_grade("grade: 0.4") is parse_grade(None) is None
