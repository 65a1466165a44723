"""The jobs' own progress output: durations a person reads, rank 0's training progress line, the
preprocessing driver's progress line and the ticker that prints it."""

from __future__ import annotations

import threading

import pytest

from jobs import preprocess
from jobs.console import duration, every
from jobs.train_worker import progress_line
from pipelines.quarantine import PreprocessReport


@pytest.mark.parametrize(("seconds", "text"), [(0, "0 s"), (59.4, "59 s"), (75, "1 min 15 s"), (3700, "1 h 1 min"),
                                               (-3, "0 s")])
def test_durations_read_as_a_person_would_say_them(seconds, text):
    assert duration(seconds) == text


def test_the_training_progress_line_has_step_loss_throughput_and_time_left():
    line = progress_line(1200, 6000, {"loss": 0.13581, "samples_per_s": 171.4}, seconds_per_step=0.1)
    assert line == "step 1200/6000 (20%) loss 0.1358, 171 samples/s, 8 min 0 s left"


def test_the_preprocessing_progress_line_has_done_total_quarantined_and_time_left():
    report = PreprocessReport(read=1200, kept=1197, quarantined={"missing_image": 2, "too_long": 1})
    assert preprocess.progress_line(report, 3000, elapsed_s=10) == \
        "1,200/3,000 records (40%), 3 quarantined, 120 records/s, 15 s left"
    assert preprocess.progress_line(PreprocessReport(), 3000, elapsed_s=10) == \
        "0/3,000 records (0%), 0 quarantined, 0 records/s"


def test_the_ticker_prints_while_the_work_runs_and_stops_with_it(capsys):
    ticks = threading.Event()
    calls = []

    def line(elapsed):
        calls.append(elapsed)
        if len(calls) >= 3:
            ticks.set()
        return None if len(calls) == 2 else f"tick {len(calls)}"

    with every(0.01, line, prefix="work"):
        assert ticks.wait(5)
    count = len(calls)
    assert capsys.readouterr().out.startswith("[work] tick 1\n[work] tick 3\n")  # None prints nothing
    assert calls == sorted(calls) and calls[0] > 0
    threading.Event().wait(0.05)
    assert len(calls) == count, "the ticker went on after the block ended"


def test_a_failing_progress_source_ends_the_ticking_not_the_work(capsys):
    def line(elapsed):
        raise RuntimeError("actor gone")

    with every(0.01, line, prefix="work"):
        threading.Event().wait(0.1)
    assert capsys.readouterr().out == "[work] progress unavailable: actor gone\n"
