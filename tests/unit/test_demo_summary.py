"""What ``make demo`` prints at the end: scores, the demo answer, where the model and runs are, and
how to reach the endpoint and its chat page."""

from __future__ import annotations

from jobs.pipeline import PipelineResult, print_summary


def summary(capsys, keep: bool) -> str:
    result = PipelineResult(
        scores={"stage1": {"accuracy/short": 0.0, "count/short": 50, "accuracy/mc": 0.02, "count/mc": 50},
                "stage2": {"accuracy/short": 1.0, "count/short": 50, "accuracy/mc": 0.98, "count/mc": 50}},
        demo={"image": "eval_00000.jpg", "question": "What colour is the top shape?", "answer": "Red.",
              "gold": "Red.", "correct": True},
        model_uri="models:/tiny-cpu-demo/1", tracking_uri="sqlite:///mlflow.db",
        runs={"experiment": "1", "parent": "p", "stage1": "a", "stage2": "b"}, timings={"train": 500.4, "serve": 9.6})
    print_summary("tiny-cpu-demo", result, ("tiny-cpu-demo", "1"), serving=(8123, keep))
    return capsys.readouterr().out


def test_the_summary_reports_scores_answer_model_and_endpoint(capsys):
    out = summary(capsys, keep=False)
    assert "done in 510 s (train 500 s, serve 10 s)" in out
    assert "accuracy stage2   short 100% of 50 | mc 98% of 50   (chance 25%)" in out
    assert "answer            'Red.'   (gold 'Red.': correct)" in out
    assert "models:/tiny-cpu-demo/1  (registered tiny-cpu-demo version 1)" in out
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out
    assert "http://127.0.0.1:8123/v1/chat/completions  (stopped" in out
    assert "chat page" not in out, "a stopped endpoint has no page to open"


def test_a_kept_endpoint_prints_its_chat_page(capsys):
    out = summary(capsys, keep=True)
    assert "(running; Ctrl-C stops it)" in out
    assert "chat page         http://127.0.0.1:8123/   (open it in a browser" in out


def test_latest_points_at_the_last_finished_run_and_moves_atomically(tmp_path):
    from jobs.pipeline import point_latest_at

    first, second = tmp_path / "run-1", tmp_path / "run-2"
    for run in (first, second):
        (run / "train").mkdir(parents=True)
        (run / "train" / "marker").write_text(run.name)
    link = point_latest_at(first)
    assert link == tmp_path / "latest" and (link / "train" / "marker").read_text() == "run-1"
    point_latest_at(second)
    assert (tmp_path / "latest" / "train" / "marker").read_text() == "run-2"
    assert (tmp_path / "latest").readlink().as_posix() == "run-2", "relative: the outputs folder can move"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run-1", "run-2"], "no staged link left"
