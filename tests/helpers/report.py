"""pytest plugin: the reliability table and the time per test layer, printed at the end of every run.

The reliability table: every test marked ``@pytest.mark.fault("what is injected")`` is one row;
``make chaos`` runs those and the slow tests moved out of ``make test`` (``pytest -m "fault or chaos"
--chaos``), any other run prints the rows it included. A test reports what it could not deliver with
``record_property("lost", n)`` (default 0).

The time per layer (``tests/unit``, ``tests/integration``, ``tests/chaos``: set-up, call and
tear-down of its tests) is checked against the budgets README "Tests" states; a layer over its
budget is named in the summary (the run still passes: timings are not assertions). The machine's
busy CPU-seconds per test (all processes: Ray workers, servers, background jobs) are listed too:
on 2 cores, CPU, not waiting, is what the suite's time is made of.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import pytest

LAYER_BUDGET_S = {"unit": 120, "integration": 720}
"""Seconds per layer on the 2-core CPU machine (README "Tests"); ``chaos`` (``make chaos``) has none."""

_FAULT_ROWS: list[tuple[str, str, str]] = []
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
    config.addinivalue_line("markers", "chaos: a test too slow for `make test`; `make chaos` runs it")


def pytest_addoption(parser):
    parser.addoption("--chaos", action="store_true", help="also run the @pytest.mark.chaos tests (make chaos)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--chaos"):
        return
    skip = pytest.mark.skip(reason="too slow for make test: `make chaos` runs it")
    for item in items:
        if item.get_closest_marker("chaos"):
            item.add_marker(skip)


def _layer(nodeid: str) -> str:
    parts = nodeid.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else "other"


def pytest_runtest_logreport(report):
    _LAYER_SECONDS[_layer(report.nodeid)] += report.duration
    counted = report.when == "call" or (report.when == "setup" and report.outcome != "passed")
    fault = getattr(report, "fault", None)
    if counted and fault:
        lost = dict(report.user_properties).get("lost", 0 if report.passed else "?")
        _FAULT_ROWS.append((fault, "survived" if report.passed else report.outcome.upper(), str(lost)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    marker = item.get_closest_marker("fault")
    if marker:
        variant = getattr(item, "callspec", None)  # a parametrized fault test: one row per variant
        report.fault = marker.args[0] + (f" [{variant.id}]" if variant else "")
    return report


def pytest_terminal_summary(terminalreporter):
    if _FAULT_ROWS:
        width = max(len(row[0]) for row in _FAULT_ROWS)
        terminalreporter.section("reliability: faults injected vs survived")
        terminalreporter.write_line(f"{'fault injected':<{width}}  {'result':<9} lost")
        for fault, result, lost in _FAULT_ROWS:
            terminalreporter.write_line(f"{fault:<{width}}  {result:<9} {lost}")
        survived = sum(result == "survived" for _, result, _ in _FAULT_ROWS)
        terminalreporter.write_line(f"{survived}/{len(_FAULT_ROWS)} survived")
    if _LAYER_SECONDS:
        terminalreporter.section("time per layer (set-up + call + tear-down)")
        for layer, seconds in sorted(_LAYER_SECONDS.items()):
            budget = LAYER_BUDGET_S.get(layer)
            verdict = "" if budget is None else f"  (budget {budget} s{', OVER' if seconds > budget else ''})"
            terminalreporter.write_line(f"{layer:<12} {seconds:7.0f} s{verdict}")
        terminalreporter.write_line(f"{'wall':<12} {time.monotonic() - _STARTED:7.0f} s")
    if any(_CPU_SECONDS.values()):
        terminalreporter.section("busy CPU-seconds of the machine per test (top 15)")
        for nodeid, seconds in sorted(_CPU_SECONDS.items(), key=lambda kv: -kv[1])[:15]:
            terminalreporter.write_line(f"{seconds:7.1f}  {nodeid}")
        terminalreporter.write_line(f"{sum(_CPU_SECONDS.values()):7.1f}  in all")
