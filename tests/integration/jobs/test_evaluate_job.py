"""jobs.evaluate: Ray Data batch inference on a registered model, scores and predictions into MLflow."""

import json

import pytest
from PIL import Image

from jobs import evaluate
from llava_platform import tracking
from llava_platform.data.synthetic import write_synthetic_dataset
from llava_platform.evaluation import eval_fields, is_correct
from llava_platform.inference import answer_questions
from llava_platform.model.compose import load_pretrained_llava

BAD_RECORDS = {
    "malformed_json": "{not json",
    "bad_eval_record": json.dumps({"id": "no-gold", "conversations": [{"from": "human", "value": "<image>\nHi?"}]}),
    "missing_image": json.dumps({"id": "gone", "image": "images/nope.png", "answer": "Red.",
                                 "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}]}),
}


@pytest.fixture(scope="module")
def evaluated(ray_cluster, saved_checkpoints, mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    files = write_synthetic_dataset(root / "data", train=1, eval=10, seed=5)
    good = [json.loads(line) for line in files["eval"].read_text().splitlines()]
    bad_type = {**good[0], "id": "odd-type", "type": "essay"}
    eval_file = root / "data" / "eval_with_bad_rows.jsonl"
    eval_file.write_text(files["eval"].read_text() + "\n".join([*BAD_RECORDS.values(), json.dumps(bad_type)]) + "\n")
    run_id = tracking.start_run(mlflow_server, "evaluate-test", "export")
    version = tracking.register_export(mlflow_server, run_id, saved_checkpoints["llava"], "tiny-eval")
    result = evaluate.main(["--model", f"models:/tiny-eval/{version}", "--data", str(eval_file), "--image-root",
                            str(root / "data"), "--output", str(root / "out"), "--batch-size", "4",
                            "--tracking-uri", mlflow_server])
    return result, good, run_id, root


def test_every_good_record_is_answered_once_and_scored(evaluated, saved_checkpoints):
    result, good, _, root = evaluated
    rows = [json.loads(line) for line in (root / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in good)
    for row in rows:
        assert row["correct"] == is_correct(row["prediction"], row["answer"], row["type"])
    # the Ray pipeline's batched, left-padded answers equal answering one question at a time
    model, processor = load_pretrained_llava(str(saved_checkpoints["llava"]))
    model.eval()
    by_id = {r["id"]: r for r in good}
    for row in rows[:4]:
        question, _, _ = eval_fields(by_id[row["id"]])
        image = Image.open(root / "data" / by_id[row["id"]]["image"]).convert("RGB")
        assert answer_questions(model, processor, [(image, question)], max_new_tokens=16) == [row["prediction"]]
    scores = result["scores"]
    assert scores["count/short"] + scores["count/mc"] == len(good)
    assert scores["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))


def test_bad_records_are_quarantined_with_their_reason(evaluated):
    result, good, _, root = evaluated
    report = result["report"]
    assert report.read == len(good) + len(BAD_RECORDS) + 1 and report.kept == len(good)
    assert report.quarantined == {"malformed_json": 1, "bad_eval_record": 2, "missing_image": 1}
    quarantined = [json.loads(line) for line in (root / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert {q["id"] for q in quarantined} >= {"no-gold", "gone", "odd-type"}
    assert any("'type' is 'essay'" in q["message"] for q in quarantined)


def test_scores_land_on_the_registered_models_run(evaluated, mlflow_server):
    result, _, run_id, _ = evaluated
    assert result["run_id"] == run_id
    client = tracking.client_for(mlflow_server)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/accuracy"] == pytest.approx(result["scores"]["accuracy"])
    assert metrics["eval/data/quarantined/malformed_json"] == 1 and "eval/accuracy/mc" in metrics
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} >= {
        "evaluation/predictions.jsonl", "evaluation/scores.json", "evaluation/quarantine.jsonl"}


def test_bad_arguments_fail_before_any_work(mlflow_server, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "models:/no-such-model/7", "--data", str(tmp_path / "missing.jsonl"),
                       "--image-root", str(tmp_path / "nowhere"), "--tracking-uri", mlflow_server])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    for expected in ("--data: ", "missing.jsonl does not exist", "--image-root: ", "--model: models:/no-such-model/7"):
        assert expected in err
