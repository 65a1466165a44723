"""Every performance script (``jobs/perf/``) parses its arguments and sets itself up (``--dry-run``); make chaos runs
each one's ``--quick``. So none rots unseen.

The measurements themselves are scripts that print figures (README), never run here.
"""

from __future__ import annotations

import pytest

from jobs.perf import checkpoint_upload as perf_checkpoint_upload
from jobs.perf import datagen as perf_datagen
from jobs.perf import evaluate as perf_evaluate
from jobs.perf import gpu_smoke as perf_gpu_smoke
from jobs.perf import padding as perf_padding
from jobs.perf import preprocess as perf_preprocess
from jobs.perf import serve as perf_serve
from jobs.perf import train as perf_train
from jobs.perf import zero3_load as perf_zero3_load


def test_training_benchmark_owns_its_inputs_and_passes_preflight(tmp_path, capsys):
    perf_train.main(["--steps", "2", "--batch", "2", "--out", str(tmp_path), "--dry-run"])
    assert "pass preflight" in capsys.readouterr().out
    run_dir = next(tmp_path.glob("run-*"))
    assert (run_dir / "data" / "stage1.json").is_file() and (run_dir / "initial" / "config.json").is_file()


def test_checkpoint_upload_benchmark_resolves_both_modes(tmp_path, capsys):
    perf_checkpoint_upload.main(["--steps", "3", "--out", str(tmp_path), "--dry-run"])
    assert "the sync and async recipes resolve" in capsys.readouterr().out


@pytest.mark.parametrize("bench, argv, expected", [
    (perf_preprocess, [], "ours / transformers"),
    (perf_padding, ["--records", "8"], "dry run: 8 records per split"),
    (perf_serve, ["--unbatched"], "transformers, vllm, unbatched applications"),
    (perf_evaluate, ["--questions", "4"], "dry run: 4 questions"),
    (perf_zero3_load, [], "~0.52B parameters"),
    (perf_gpu_smoke, ["--steps", "5"], "0.52B parameters, stage 1 + stage 2 x 5 steps"),
    (perf_datagen, ["--levels", "8,32"], "levels [8, 32], 16 waves, 0.25 s"),
])
def test_benchmark_dry_runs(bench, argv, expected, capsys):
    bench.main([*argv, "--dry-run"])
    assert expected in capsys.readouterr().out


def test_every_perf_script_has_a_quick_run_that_make_chaos_runs():
    from tests.chaos.test_perf_scripts import LAST_LINES
    from tests.helpers import REPO_ROOT

    scripts = {p.stem for p in (REPO_ROOT / "jobs" / "perf").glob("*.py")} - {"__init__", "ranks", "gpu_smoke"}
    assert scripts == set(LAST_LINES)
    for name in scripts:
        assert "--quick" in (REPO_ROOT / "jobs" / "perf" / f"{name}.py").read_text(), name
