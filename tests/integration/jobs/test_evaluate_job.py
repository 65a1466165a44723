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
