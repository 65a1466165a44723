"""What the jobs print: their own lines, one per meaningful event, a progress line for long work, and
nothing else.

The console is for a person: the jobs' own lines (``say``), a training worker's lines relayed to the
driver (``LineRelay``), summaries and scores. What the libraries print goes elsewhere (``start_ray``,
``libraries_to_log``): the Ray workers' output stays in Ray's log folder (``<temp>/ray/session_latest/
logs``), and this process's library log records and Python warnings go to the job's log file; Ray
Data's progress bars and transformers', MLflow's and tqdm's are off. ``LLAVA_RAY_PROGRESS=1`` puts all
of it back on the console, as the libraries print it, for debugging.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.data

RAY_PROGRESS_ENV = "LLAVA_RAY_PROGRESS"
"""Set to ``1`` to see every library's output and Ray Data's progress bars on the console again."""
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
"""Progress bars of transformers (loading and saving weights), tqdm and MLflow's artifact transfers: off."""
LIBRARY_LOGGERS = ("ray", "mlflow", "DeepSpeed", "deepspeed", "transformers", "torch", "alembic", "urllib3",
                   "filelock", "py.warnings", "huggingface_hub", "botocore", "s3transfer")
"""Loggers whose records go to the job's log file rather than the console."""
_LOG_FILE: list[Path] = []


def verbose() -> bool:
    """``LLAVA_RAY_PROGRESS=1``: the libraries' own output on the console, as they print it."""
    return os.environ.get(RAY_PROGRESS_ENV) == "1"


def quiet_ray_data() -> None:
    """Turn Ray Data's bars and execution logs off in this process and in the datasets it creates from now on
    (their coordinators copy this process's ``DataContext``), unless ``LLAVA_RAY_PROGRESS=1``."""
    if verbose():
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its "progress bars disabled" notice too


def job_log_file(path: str | Path | None = None) -> Path:
    """The job's log file, chosen once per process: by the first job that names one (``jobs.pipeline`` names
    its run folder's, so the jobs it runs write there too), else one under the temp folder."""
    if not _LOG_FILE:
        _LOG_FILE.append(Path(path) if path is not None else
                         Path(tempfile.gettempdir()) / "llava-platform" / f"job-{os.getpid()}.log")
    _LOG_FILE[0].parent.mkdir(parents=True, exist_ok=True)
    return _LOG_FILE[0]


def libraries_to_log() -> Path | None:
    """Route this process's library log records and Python warnings to the job's log file, and switch the
    libraries' progress bars off (``QUIET_ENV``); nothing changes with ``LLAVA_RAY_PROGRESS=1``. Returns the
    file (``None`` when verbose). Call again after importing a library that sets up its own handlers."""
    if verbose():
        return None
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if "DS_ACCELERATOR" not in os.environ:  # DeepSpeed warns when it falls back to the CPU: say so instead
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    path = job_log_file()
    handler = next((h for h in logging.getLogger().handlers if getattr(h, "llava_job_log", False)), None)
    if handler is None:
        handler = logging.FileHandler(path)
        handler.llava_job_log = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in LIBRARY_LOGGERS]
    for name in {*LIBRARY_LOGGERS, *names}:
        logger = logging.getLogger(name)
        logger.handlers = [handler] if "." not in name else []
        logger.propagate = "." in name
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    native_logs_to_file(path)
    return path


NATIVE_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] ")
"""A line of Ray's C++ log (``[2026-01-01 12:00:00,000 E 123 123] core_worker.cc:...``): the driver's core
worker writes its errors to its log file and to standard error, e.g. Ray Data's notice that an actor pool's
constructor arguments live in the object store (Ray Data's own design: it restarts those actors)."""


def native_logs_to_file(path: Path) -> None:
    """Keep Ray's C++ log lines off this process's console: standard error becomes a pipe whose reader thread
    appends those lines to ``path`` and passes every other byte (our lines, tracebacks) on unchanged. Only
    where this process owns its standard error (not where a test runner has replaced it to capture it)."""
    if getattr(native_logs_to_file, "started", False) or sys.stderr is not sys.__stderr__:
        return
    native_logs_to_file.started = True
    sys.stderr.flush()
    console = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe, open(path, "ab") as log:
            for line in iter(pipe.readline, b""):
                if NATIVE_LOG_LINE.match(line):
                    log.write(line)
                    log.flush()
                else:
                    os.write(console, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:  # at exit: hand standard error back, then let the reader finish what is in the pipe
        sys.stderr.flush()
        os.dup2(console, 2)
        thread.join(timeout=2)

    atexit.register(restore)


def start_ray(**init: Any) -> None:
    """``ray.init`` for a job (a no-op when this process is connected already): the workers' output stays in
    Ray's log folder unless ``LLAVA_RAY_PROGRESS=1``; then Ray Data and the libraries quieted here."""
    if not ray.is_initialized():
        ray.init(**{"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": verbose(), **init})
    quiet_ray_data()
    libraries_to_log()


class LineRelay:
    """Lines from Ray workers to the driver's console when worker output is not forwarded (``start_ray``):
    a ``ray.util.queue.Queue`` the workers put lines in and a driver thread prints from (``relaying``)."""

    def __init__(self):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})

    def put(self, line: str) -> None:
        """From a worker: hand one line over (never blocks; a full or gone queue loses the line, not the step)."""
        try:
            self.queue.put_nowait(line)
        except Exception:  # noqa: BLE001 - a console line is never worth a failed training step
            pass

    def drain(self) -> None:
        for line in self.queue.get_nowait_batch(self.queue.qsize()) if self.queue.qsize() else []:
            print(line, file=sys.stderr, flush=True)

    @contextmanager
    def relaying(self, every_s: float = 0.5) -> Iterator[None]:
        """Print the workers' lines on this (the driver's) console while the block runs."""
        stop = threading.Event()

        def pump() -> None:
            while not stop.wait(every_s):
                try:
                    self.drain()
                except Exception:  # noqa: BLE001 - the relay is best effort; the job goes on
                    return

        thread = threading.Thread(target=pump, name="line-relay", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            try:
                self.drain()
            except Exception:  # noqa: BLE001
                pass


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
