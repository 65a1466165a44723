"""The planner's activation term against what autograd really keeps: ``train.memory.saved_activation_bytes``
within 25 % of the peak saved-tensor bytes (``saved_tensors_hooks``) of one forward and backward, for LLaVA,
LLaVA-NeXT and LLaVA-OneVision, with and without gradient checkpointing. This is ``jobs.perf.activations
--quick`` (its full run prints the README's figure at a larger size), so make chaos does not run it again."""

from __future__ import annotations

import re

from jobs.perf import activations
from tests.chaos.test_perf_scripts import LAST_LINES

QUICK = dict(hidden=128, layers=2, vocab=1024, tokens=384)


def test_the_activation_term_is_within_25_percent_of_the_saved_tensors(capsys, record_property):
    worst = activations.main(["--quick"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(LAST_LINES["activations"], lines[-1]), lines[-1]
    cases = [line for line in lines if "measured" in line and "MiB" in line]
    assert len(cases) == len(activations.CASES)
    record_property("planned/measured worst", worst)
    for line in cases:
        ratio = float(line.split()[-1])
        assert abs(ratio - 1) <= 0.25, line


def test_the_measure_sees_the_saved_tensors():
    """A negative control: the hooks count what the step saves (the loss's float32 log-probabilities alone
    are tokens x vocabulary x 4 bytes), and gradient checkpointing really keeps less."""
    case = activations.CASES[0]
    _, kept = activations.run_case(case, **QUICK)
    _, checkpointed = activations.run_case(activations.Case(case.arch, True, case.tunable), **QUICK)
    assert kept > QUICK["tokens"] * QUICK["vocab"] * 4 and checkpointed < kept / 1.5
