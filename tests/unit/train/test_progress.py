"""The jobs' own progress output: durations a person reads, and rank 0's training progress line."""

from __future__ import annotations

import pytest

from jobs.console import duration
from jobs.train_worker import progress_line


@pytest.mark.parametrize(("seconds", "text"), [(0, "0 s"), (59.4, "59 s"), (75, "1 min 15 s"), (3700, "1 h 1 min"),
                                               (-3, "0 s")])
def test_durations_read_as_a_person_would_say_them(seconds, text):
    assert duration(seconds) == text


def test_the_training_progress_line_has_step_loss_throughput_and_time_left():
    line = progress_line(1200, 6000, {"loss": 0.13581, "samples_per_s": 171.4}, seconds_per_step=0.1)
    assert line == "step 1200/6000 (20%) loss 0.1358, 171 samples/s, 8 min 0 s left"
