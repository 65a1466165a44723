"""Every benchmark script parses its arguments and sets itself up (``--dry-run``), so none rots unseen.

The measurements themselves are scripts that print figures (README), never run here.
"""

from __future__ import annotations

import pytest

from jobs.benchmarks import checkpoint_upload as bench_checkpoint_upload
from jobs.benchmarks import datagen as bench_datagen
from jobs.benchmarks import evaluate as bench_evaluate
from jobs.benchmarks import gpu_smoke as bench_gpu_smoke
from jobs.benchmarks import padding as bench_padding
from jobs.benchmarks import preprocess as bench_preprocess
from jobs.benchmarks import serve as bench_serve
from jobs.benchmarks import train as bench_train
from jobs.benchmarks import zero3_load as bench_zero3_load


def test_training_benchmark_owns_its_inputs_and_passes_preflight(tmp_path, capsys):
    bench_train.main(["--steps", "2", "--batch", "2", "--out", str(tmp_path), "--dry-run"])
    assert "pass preflight" in capsys.readouterr().out
    run_dir = next(tmp_path.glob("run-*"))
    assert (run_dir / "data" / "stage1.json").is_file() and (run_dir / "initial" / "config.json").is_file()


def test_checkpoint_upload_benchmark_resolves_both_modes(tmp_path, capsys):
    bench_checkpoint_upload.main(["--steps", "3", "--out", str(tmp_path), "--dry-run"])
    assert "the sync and async recipes resolve" in capsys.readouterr().out


@pytest.mark.parametrize("bench, argv, expected", [
    (bench_preprocess, [], "ours / transformers"),
    (bench_padding, ["--records", "8"], "dry run: 8 records per split"),
    (bench_serve, ["--unbatched"], "transformers, vllm, unbatched applications"),
    (bench_evaluate, ["--questions", "4"], "dry run: 4 questions"),
    (bench_zero3_load, [], "~0.52B parameters"),
    (bench_gpu_smoke, ["--steps", "5"], "0.52B parameters, stage 1 + stage 2 x 5 steps"),
    (bench_datagen, ["--levels", "8,32"], "levels [8, 32], 16 waves, 0.25 s"),
])
def test_benchmark_dry_runs(bench, argv, expected, capsys):
    bench.main([*argv, "--dry-run"])
    assert expected in capsys.readouterr().out


def test_every_benchmark_script_has_a_quick_run_that_make_chaos_runs():
    from tests.chaos.test_benchmark_scripts import LAST_LINES
    from tests.helpers import REPO_ROOT

    scripts = {p.stem for p in (REPO_ROOT / "jobs" / "benchmarks").glob("*.py")} - {"__init__", "ranks", "gpu_smoke"}
    assert scripts == set(LAST_LINES)
    for name in scripts:
        assert "--quick" in (REPO_ROOT / "jobs" / "benchmarks" / f"{name}.py").read_text(), name
