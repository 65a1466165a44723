"""Every performance script (``jobs/perf/``) parses its arguments and sets itself up (``--dry-run``); make chaos runs
each one's ``--quick``. So none rots unseen.

The measurements themselves are scripts that print figures (README), never run here.
"""

from __future__ import annotations

import pytest

from jobs.perf import checkpoint_upload as perf_checkpoint_upload
from jobs.perf import datagen as perf_datagen
from jobs.perf import evaluate as perf_evaluate
from jobs.perf import mixture as perf_mixture
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
    (perf_datagen, ["--levels", "8,32"], "levels [8, 32], 16 waves, 0.25 s"),
    (perf_mixture, [], "dry run: 100 sources, 4,000,000 records"),
])
def test_benchmark_dry_runs(bench, argv, expected, capsys):
    bench.main([*argv, "--dry-run"])
    assert expected in capsys.readouterr().out


def test_every_perf_script_has_a_quick_run_that_make_chaos_runs():
    from tests.chaos.test_perf_scripts import LAST_LINES
    from tests.helpers import REPO_ROOT

    helpers = {"__init__", "ranks", "memory", "gpu_smoke"}
    scripts = {p.stem for p in (REPO_ROOT / "jobs" / "perf").glob("*.py")} - helpers
    assert scripts == set(LAST_LINES)
    for name in scripts:
        assert "--quick" in (REPO_ROOT / "jobs" / "perf" / f"{name}.py").read_text(), name


def test_the_gpu_smoke_test_runs_without_what_the_gpu_machine_lacks():
    """The lent GPU machine's Python has no Ray, MLflow, vLLM, pyarrow, PyAV or boto3: the dry run (one padded
    and one packed step of a tiny model on the CPU) with those imports refused. ``make gpu-smoke-proof`` runs it
    in a venv of only the machine's packages and the carried wheels."""
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    refused = ["ray", "mlflow", "vllm", "pyarrow", "av", "boto3"]
    code = (f"import sys, runpy\nfor name in {refused!r}: sys.modules[name] = None\n"
            "sys.argv = ['gpu_smoke', '--dry-run', '--steps', '5']\n"
            "runpy.run_module('jobs.perf.gpu_smoke', run_name='__main__')")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "gpu-smoke plan: 0.52B parameters, 5 steps + 3 warm-up per run" in completed.stdout
    assert "packed/sdpa" in completed.stdout and "gpu-smoke on cpu: packed/padded tokens/s" in completed.stdout
