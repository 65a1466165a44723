"""jobs.evaluate refuses bad arguments before any work. (Its batch inference, scoring, quarantine and
MLflow logging run inside the end-to-end job: ``tests/integration/jobs/test_pipeline_job.py``.)"""

import pytest

from jobs import evaluate


def test_bad_arguments_fail_before_any_work(mlflow_server, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "models:/no-such-model/7", "--data", str(tmp_path / "missing.jsonl"),
                       "--image-root", str(tmp_path / "nowhere"), "--tracking-uri", mlflow_server])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    for expected in ("--data: ", "missing.jsonl does not exist", "--image-root: ", "--model: models:/no-such-model/7"):
        assert expected in err


def test_benchmark_files_in_the_wrong_format_fail_before_any_model_loads(mlflow_server, tmp_path, capsys):
    pope = tmp_path / "pope"
    pope.mkdir()
    (pope / "coco_pope_random.json").write_text('{"question_id": 1, "image": "a.jpg", "text": "?"}\n')  # no label
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", str(tmp_path / "no-checkpoint"), "--tracking-uri", mlflow_server,
                       "--benchmark", "pope", "--annotations", str(pope), "--benchmark", "mmvet",
                       "--annotations", str(tmp_path / "mm-vet")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    for expected in (f"--annotations: pope: {pope}/coco_pope_random.json line 1: expected "
                     '{"question_id", "image", "text", "label"} per line',
                     "--annotations: mmvet: ", "--judge-url: mmvet is scored by a judge model",
                     "--model: ", "no-checkpoint is not a Hugging Face checkpoint folder"):
        assert expected in err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "m", "--benchmark", "pope", "--benchmark", "gqa", "--annotations", str(pope)])
    assert "--annotations: give one per --benchmark, in the same order (2 benchmarks, 1 annotations)" in \
        capsys.readouterr().err
