"""Every performance script's ``--quick`` run (``make chaos``): the real measurement end to end at tiny sizes, so
no script rots unseen. Each prints its last line in the README's format; the test checks only that its
figures parse and are finite: never a timing threshold (these machines are noisy, and figures are the
scripts' output, not assertions). The README's figures come from full runs.

The GPU smoke test (``jobs.perf.gpu_smoke``) needs a GPU: the unit layer dry-runs it.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

NUMBER = r"(-?[0-9.]+|nan|inf)"
LAST_LINES = {
    "activations": rf"activations planned/measured, worst case: {NUMBER}",
    "checkpoint_upload": rf"checkpoint-stall async/sync: {NUMBER}",
    "datagen": rf"datagen throughput/ideal at c=32: {NUMBER}",
    "evaluate": rf"vllm/transformers questions/s: {NUMBER}",
    "mixture": rf"mixture plan driver-peak MiB at {NUMBER} sources x [0-9,]+ records: {NUMBER}",
    "packing": rf"packing useful-tokens/s packed/grouped: {NUMBER} \(padding {NUMBER}% -> {NUMBER}%\)",
    "padding": rf"padding fraction arrival -> grouped: {NUMBER}% -> {NUMBER}%",
    "preprocess": rf"preprocess ours/transformers images/s: {NUMBER}, bytes uint8/float32: {NUMBER}, "
                  rf"peak memory at 10x records: x{NUMBER}",
    "serve": rf"endpoint/bare-vllm tokens/s at c=32: {NUMBER}",
    "train": rf"train s/step vs bare: streamed {NUMBER}, materialised {NUMBER}",
    "zero3_load": rf"zero3-load per-rank-peak/full-model: {NUMBER} \(before: {NUMBER}\)",
}
"""Each script's last line, as the README quotes it (README "Figures" and the layer READMEs)."""
IN_MAKE_TEST = {"activations"}
"""Scripts whose quick run is a unit test of make test (``tests/unit/train/test_activation_calibration.py``)."""
EARLIER_LINES = {"serve": rf"vllm/transformers tokens/s at c=32: {NUMBER}"}
"""Other lines the README quotes from a script's output."""


@pytest.mark.chaos
@pytest.mark.parametrize("script", sorted(set(LAST_LINES) - IN_MAKE_TEST))
def test_the_quick_run_prints_finite_figures_in_the_readme_format(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user runs it
    completed = subprocess.run([sys.executable, "-m", f"jobs.perf.{script}", "--quick"], cwd=tmp_path,
                               env={**env, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    last = completed.stdout.strip().splitlines()[-1]
    match = re.fullmatch(LAST_LINES[script], last)
    assert match, f"the last line is not in the README's format: {last!r}"
    figures = [float(group) for group in match.groups()]
    assert all(math.isfinite(x) for x in figures), last
    if script in EARLIER_LINES:
        earlier = [re.fullmatch(EARLIER_LINES[script], line) for line in completed.stdout.splitlines()]
        found = [m for m in earlier if m]
        assert found and all(math.isfinite(float(g)) for g in found[-1].groups()), EARLIER_LINES[script]
