"""pytest plugin: the reliability table and the time per test layer, printed at the end of every run.

The reliability table: every test marked ``@pytest.mark.fault("what is injected")`` is one row, and its
``lost`` column is what the test measured and recorded with ``tests.helpers.losses.record_loss`` (a
passing fault test that recorded nothing fails here: there is no default). Tests marked
``@pytest.mark.loss_control("what is planted")`` are the negative controls: a loss planted on purpose,
which must read non-zero.

``make test`` runs the unit and integration layers and saves its rows (``--report-file``); ``make chaos``
runs the ``@pytest.mark.chaos`` tests (``--chaos -m chaos``) and, given make test's file
(``--merge-report``), prints the whole table: make test's rows, then its own. Nothing runs in both.

The time per layer (``unit``, ``integration``, and ``chaos`` for every chaos-marked test wherever it
lives: set-up, call and tear-down) is compared with ``LAYER_BUDGET_S``; a layer over its budget is named
in the summary (the run still passes: timings are not assertions). The machine's busy CPU-seconds per
test (all processes: Ray workers, servers, background jobs) are listed too: on 2 cores, CPU, not
waiting, is what the suite's time is made of.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

LAYER_BUDGET_S = {"unit": 120, "integration": 720, "chaos": 1500}
"""Seconds per layer on the 2-core CPU machine (README "Tests"): make test's two layers fit its 15 minutes
with the install; the chaos layer fits the rest of CI's 45 minutes (``.ci/run`` prints both totals)."""

_ROWS: list[dict] = []
_CONTROLS: list[dict] = []
_LAYER_SECONDS: dict[str, float] = defaultdict(float)
_CPU_SECONDS: dict[str, float] = defaultdict(float)
_STARTED = time.monotonic()


def _busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine has spent busy since boot (``/proc/stat``; 0 where there is none)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    started = _busy_cpu_seconds()
    try:
        return (yield)
    finally:
        _CPU_SECONDS[item.nodeid] += _busy_cpu_seconds() - started


def pytest_configure(config):
    config.addinivalue_line("markers", "fault(description): a fault-injection test, one row of the reliability table")
    config.addinivalue_line("markers", "loss_control(planted): a negative control: a planted loss the measure reads")
    config.addinivalue_line("markers", "chaos: a test too slow for `make test`; `make chaos` runs it")


def pytest_addoption(parser):
    parser.addoption("--chaos", action="store_true", help="also run the @pytest.mark.chaos tests (make chaos)")
    parser.addoption("--report-file", help="save this run's table rows and layer times as JSON (make test/chaos)")
    parser.addoption("--merge-report", help="a --report-file of an earlier run to print before this run's rows")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--chaos"):
        return
    skip = pytest.mark.skip(reason="too slow for make test: `make chaos` runs it")
    for item in items:
        if item.get_closest_marker("chaos"):
            item.add_marker(skip)


def _layer(item) -> str:
    if item.get_closest_marker("chaos"):
        return "chaos"
    parts = item.nodeid.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else "other"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    report.layer = _layer(item)
    for kind in ("fault", "loss_control"):
        marker = item.get_closest_marker(kind)
        if marker:
            variant = getattr(item, "callspec", None)  # a parametrized test: one row per variant
            setattr(report, kind, marker.args[0] + (f" [{variant.id}]" if variant else ""))
    properties = dict(report.user_properties)
    if report.when == "call" and report.passed and _missing_loss(item, properties):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid}: a fault test must measure what it lost and record it "
                           "(tests.helpers.losses.record_loss); the table has no default")
    if report.when == "call" and report.passed and item.get_closest_marker("loss_control") \
            and not properties.get("lost_count"):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: a negative control whose planted loss read 0: the measure cannot fail"
    return report


def _missing_loss(item, properties: dict) -> bool:
    marked = item.get_closest_marker("fault") or item.get_closest_marker("loss_control")
    return bool(marked) and "lost" not in properties


def pytest_runtest_logreport(report):
    _LAYER_SECONDS[getattr(report, "layer", "other")] += report.duration
    counted = report.when == "call" or (report.when == "setup" and report.outcome != "passed")
    if not counted or (report.skipped and report.layer == "chaos"):  # make chaos runs it: its row comes from there
        return
    properties = dict(report.user_properties)
    for kind, rows, passed in (("fault", _ROWS, "survived"), ("loss_control", _CONTROLS, "read")):
        what = getattr(report, kind, None)
        if what:
            rows.append({"what": what, "result": passed if report.passed else report.outcome.upper(),
                         "lost": str(properties.get("lost", "?")), "lost_count": properties.get("lost_count"),
                         "layer": report.layer})


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _this_run(config) -> dict:
    return {"run": "make chaos" if config.getoption("--chaos") else "make test", "commit": _commit(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(time.monotonic() - _STARTED),
            "faults": _ROWS, "controls": _CONTROLS, "layers": {k: round(v) for k, v in _LAYER_SECONDS.items()}}


def _earlier_run(config) -> dict | None:
    path = config.getoption("--merge-report")
    if not path:
        return None
    if not Path(path).exists():
        return {"missing": path}
    return json.loads(Path(path).read_text())


def pytest_sessionfinish(session):
    path = session.config.getoption("--report-file")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(_this_run(session.config), indent=1))


def _write_rows(write, rows: list[dict], width: int, result: str = "result") -> None:
    write(f"{'':2}{'fault injected' if result == 'result' else 'loss planted':<{width}}  {result:<9} lost")
    for row in rows:
        write(f"{'':2}{row['what']:<{width}}  {row['result']:<9} {row['lost']}")


def pytest_terminal_summary(terminalreporter, config):
    write = terminalreporter.write_line
    earlier, runs = _earlier_run(config), []
    if earlier and "missing" in earlier:
        terminalreporter.section("reliability: faults injected vs survived")
        write(f"make test's rows: no {earlier['missing']} (run `make test` first, or `make ci`): this run's only")
    elif earlier:
        runs.append(earlier)
    if _ROWS or _CONTROLS or runs:
        runs.append(_this_run(config))
        rows = [row for run in runs for row in run["faults"]]
        controls = [row for run in runs for row in run["controls"]]
        width = max(len(row["what"]) for row in rows + controls)
        terminalreporter.section("reliability: faults injected vs survived, lost as measured")
        for run in runs:
            if run["faults"]:
                write(f"{run['run']} (commit {run['commit']}, finished {run['finished']}):")
                _write_rows(write, run["faults"], width)
        survived = sum(row["result"] == "survived" for row in rows)
        write(f"{survived}/{len(rows)} survived; {sum(bool(row['lost_count']) for row in rows)} with a measured loss")
        if controls:
            terminalreporter.section("negative controls: a loss planted on purpose, read by the same measure")
            _write_rows(write, controls, width, result="read")
    if _LAYER_SECONDS or runs:
        terminalreporter.section("time per layer (set-up + call + tear-down) against its budget")
        layers = {layer: seconds for run in runs[:-1] for layer, seconds in run["layers"].items()}
        layers.update(_LAYER_SECONDS)
        for layer, seconds in sorted(layers.items()):
            budget = LAYER_BUDGET_S.get(layer)
            verdict = "" if budget is None else f"  (budget {budget} s{', OVER' if seconds > budget else ''})"
            write(f"{layer:<12} {seconds:7.0f} s{verdict}")
        for run in runs[:-1]:
            write(f"{run['run'] + ' wall':<12} {run['wall_s']:7.0f} s")
        write(f"{'wall':<12} {time.monotonic() - _STARTED:7.0f} s")
    if any(_CPU_SECONDS.values()):
        terminalreporter.section("busy CPU-seconds of the machine per test (top 15)")
        for nodeid, seconds in sorted(_CPU_SECONDS.items(), key=lambda kv: -kv[1])[:15]:
            write(f"{seconds:7.1f}  {nodeid}")
        write(f"{sum(_CPU_SECONDS.values()):7.1f}  in all")
