"""What the jobs print: their own lines, one per meaningful event, and a progress line for long work.

Ray Data's per-operator progress bars and execution logs are off in jobs (they come from every
process that runs a dataset, and bury the lines a person wants); ``LLAVA_RAY_PROGRESS=1`` turns them
back on for debugging a pipeline.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import ray.data

RAY_PROGRESS_ENV = "LLAVA_RAY_PROGRESS"
"""Set to ``1`` to see Ray Data's own progress bars and execution logs again."""


def quiet_ray_data() -> None:
    """Turn Ray Data's bars and execution logs off in this process and in the datasets it creates from now on
    (their coordinators copy this process's ``DataContext``), unless ``LLAVA_RAY_PROGRESS=1``."""
    if os.environ.get(RAY_PROGRESS_ENV) == "1":
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def say(prefix: str, message: str, *, stream=None) -> None:
    """One line ``[prefix] message`` for a person, on standard error (standard output is for results: a
    job's summary, a score table, a dry run's recipe), flushed at once."""
    print(f"[{prefix}] {message}", file=stream or sys.stderr, flush=True)


def job_log(prefix: str) -> Callable[[str], None]:
    """A job's ``log(message)``: ``say`` with the job's prefix."""
    return partial(say, prefix)


class PreflightError(ValueError):
    """What a job found wrong before claiming any resource, all at once, each problem naming its option or
    recipe key (``problems``). The jobs' ``main`` prints it and exits with status 2."""

    def __init__(self, job: str, problems: list[str]):
        super().__init__(f"jobs.{job} cannot start:\n" + "".join(f"  {p}\n" for p in problems))
        self.problems = problems


def duration(seconds: float) -> str:
    """``75`` -> ``1 min 15 s``; ``3700`` -> ``1 h 1 min``: how long, for a person."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


PROGRESS_EVERY_S = 15.0
"""How often long work prints its progress line (training on rank 0, preprocessing on the driver)."""


@contextmanager
def every(seconds: float, line: Callable[[float], str | None], prefix: str) -> Iterator[None]:
    """Print ``[prefix] line(elapsed_s)`` from a driver thread every ``seconds`` while the block runs
    (``None``: nothing this time). A failing ``line`` ends the ticking, never the work it reports on."""
    stop, started = threading.Event(), time.perf_counter()

    def tick() -> None:
        while not stop.wait(seconds):
            try:
                text = line(time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001 - progress is best effort
                print(f"[{prefix}] progress unavailable: {error}", flush=True)
                return
            if text:
                print(f"[{prefix}] {text}", flush=True)

    thread = threading.Thread(target=tick, name=f"{prefix}-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
