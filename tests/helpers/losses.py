"""What a fault cost, measured from the run itself: the ``lost`` column of the reliability table.

Every ``@pytest.mark.fault`` test measures the kind of loss its fault threatens with a function below and
records it with ``record_loss``; the report plugin (``report.py``) fails a passing fault test that
recorded none, so no row can show a default. Each kind has a negative control in
``tests/unit/test_loss_measures.py`` (``@pytest.mark.loss_control``): a loss planted on purpose, which the
measure must read as non-zero.

    loss = steps_loss(history_steps, expected=range(1, 9))
    record_loss(record_property, loss, rows_loss(...))
    assert not loss.count
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

KINDS = {
    "optimizer steps": "missing from MLflow's loss history, or logged twice",
    "training rows": "never trained, or trained twice, in an epoch of the final model (row ledger)",
    "checkpoint resumes": "a restart that resumed from a half-written checkpoint",
    "requests": "a 5xx, a hang (timeout) or a wrong answer (wrong status, wrong text)",
    "records": "written twice, or not at all (neither delivered nor quarantined)",
    "quarantine entries": "a bad record without its quarantine entry, or with the wrong reason",
    "metric entries": "missing from the tracking server, or delivered twice",
    "files": "missing from storage, or not whole",
    "loads that ran untrusted code": "code of an untrusted file that ran",
    "places leaking a secret": "a secret's value found in MLflow or in the output",
    "engine starts not refused": "an engine that started (or hung) where it should have refused, naming the reason",
}
"""Every kind of loss the table measures, and what counts as one."""


@dataclass(frozen=True)
class Loss:
    """``count`` of ``total`` things of ``kind`` lost; ``detail`` says which."""

    kind: str
    count: int
    total: int
    detail: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of loss {self.kind!r}; known: {', '.join(KINDS)}")

    def __str__(self) -> str:
        text = f"{self.count} of {self.total} {self.kind}"
        return f"{text} ({self.detail})" if self.count and self.detail else text


def record_loss(record_property, *losses: Loss) -> tuple[Loss, ...]:
    """Put the measured losses in the test's report: the table's ``lost`` column and their sum."""
    if not losses:
        raise ValueError("record_loss needs at least one measured Loss")
    record_property("lost", "; ".join(map(str, losses)))
    record_property("lost_count", sum(loss.count for loss in losses))
    return losses


def _counted(kind: str, total: int, **parts: Sequence | int) -> Loss:
    """A loss made of named parts (each a count or the things counted): ``missing=[...], twice=2``."""
    counts = {name: part if isinstance(part, int) else len(part) for name, part in parts.items()}
    detail = ", ".join(
        f"{name} {part if isinstance(part, int) else sorted(map(str, part))[:6]}"
        for name, part in parts.items() if counts[name])
    return Loss(kind, sum(counts.values()), total, detail)


def steps_loss(logged: Iterable, expected: Iterable, kind: str = "optimizer steps") -> Loss:
    """Steps of a metric history (``get_metric_history``'s ``.step``; or ``(key, step)`` entries) against those
    that should each be there once: the missing, the extra, and every repeat."""
    seen, wanted = Counter(logged), set(expected)
    return _counted(kind, len(wanted), missing=sorted(wanted - set(seen)), extra=sorted(set(seen) - wanted),
                    twice=sum(n - 1 for n in seen.values() if n > 1))


def rows_loss(ledger: str | Path, dataset: Sequence[str], global_batch: int, steps: int) -> Loss:
    """Rows of the final model's steps (the row ledger, ``jobs.faults.committed_steps``) per epoch: every
    row of a complete epoch trained once, a partial epoch's rows once each and as many as its steps take
    (``global_batch`` per step). Also counts a step missing from the ledger (its rows unaccounted for)."""
    from jobs.faults import committed_steps

    committed = committed_steps(ledger)
    per_epoch = len(dataset) // global_batch
    epochs: dict[int, Counter] = {}
    for step in sorted(committed):
        epochs.setdefault(committed[step]["epoch"], Counter()).update(
            row for rank in committed[step]["rows"] for row in rank)
    twice, never = [], []
    for epoch, trained in epochs.items():
        twice += [f"{row}@{epoch}" for row, n in trained.items() for _ in range(n - 1)]
        steps_in_epoch = sum(1 for line in committed.values() if line["epoch"] == epoch)
        if steps_in_epoch == per_epoch:
            never += [f"{row}@{epoch}" for row in sorted(set(dataset) - set(trained))]
        else:
            never += [f"?@{epoch}"] * max(0, steps_in_epoch * global_batch - len(trained))
    unaccounted = sum(1 for step in range(1, steps + 1) if step not in committed)
    return _counted("training rows", steps * global_batch, never=never, twice=twice,
                    **{"of steps missing from the ledger": unaccounted * global_batch})


def resumes_loss(resumed_from: Iterable[int], half_written: Iterable[int], restarts: int) -> Loss:
    """Restarts (``resumed_at_step`` values) that resumed from a checkpoint known to be half-written."""
    bad = set(half_written)
    return _counted("checkpoint resumes", restarts, **{"from half-written": [s for s in resumed_from if s in bad]})


def requests_loss(outcomes: Sequence[str], expected: Sequence[str] | str) -> Loss:
    """Requests whose outcome differs from what each should get (``ok``, ``4xx``, ``401``...): a ``5xx``, a
    ``hang``, a ``wrong`` answer or a wrong status all count. ``expected`` is one outcome for all, or one each."""
    wanted = [expected] * len(outcomes) if isinstance(expected, str) else list(expected)
    if len(wanted) != len(outcomes):
        raise ValueError(f"{len(outcomes)} outcomes, {len(wanted)} expectations")
    wrong = Counter(got for got, want in zip(outcomes, wanted, strict=True) if got != want)
    return Loss("requests", sum(wrong.values()), len(outcomes),
                ", ".join(f"{n} {what}" for what, n in wrong.most_common()))


def http_outcome(status: int | None, *, answer_ok: bool = True) -> str:
    """One request's outcome: ``ok`` (2xx and the right answer), ``wrong`` (2xx, wrong answer), the status
    class (``4xx``; ``401`` and ``404`` by name) or ``5xx``, or ``hang`` (``status`` None: no answer in time)."""
    if status is None:
        return "hang"
    if 200 <= status < 300:
        return "ok" if answer_ok else "wrong"
    if status in (401, 404):
        return str(status)
    return f"{status // 100}xx"


def chat_outcome(ask: Callable[[], str | None], expected_text: str) -> str:
    """The outcome of one chat request made by ``ask`` (an ``openai`` client call returning the answer's
    text): ``ok`` when it is ``expected_text``, ``wrong`` when not, else the failure's ``http_outcome``."""
    import openai

    try:
        return http_outcome(200, answer_ok=ask() == expected_text)
    except openai.APITimeoutError:
        return "hang"
    except openai.APIStatusError as error:
        return http_outcome(error.status_code)
    except openai.APIConnectionError:
        return "5xx"  # no HTTP answer at all, after the client's retries


def records_loss(expected: Iterable[str], written: Sequence[str], kind: str = "records") -> Loss:
    """Record ids written (delivered plus quarantined, say) against the ids that should each appear once."""
    wanted, seen = set(expected), Counter(written)
    return _counted(kind, len(wanted), missing=sorted(wanted - set(seen)), extra=sorted(set(seen) - wanted),
                    twice=sum(n - 1 for n in seen.values() if n > 1))


def quarantine_loss(expected: Mapping[str, str], entries: Mapping[str, str]) -> Loss:
    """Bad records (id -> reason) against the quarantine's entries (id -> reason): missing or wrongly reasoned."""
    return _counted("quarantine entries", len(expected),
                    missing=[rid for rid in expected if rid not in entries],
                    **{"wrong reason": [rid for rid, reason in expected.items()
                                        if rid in entries and entries[rid] != reason]})


def files_loss(expected: Mapping[str, int], stored: Mapping[str, int]) -> Loss:
    """Files (name -> size) that should be in storage against what is there."""
    return _counted("files", len(expected), missing=[n for n in expected if n not in stored],
                    incomplete=[n for n in expected if n in stored and stored[n] != expected[n]])


def found_loss(kind: str, found: Sequence[str], checked: int) -> Loss:
    """Things that should not have been found (a secret in a param, a marker a pickle wrote), of ``checked``."""
    return _counted(kind, checked, found=list(found))


def mlflow_steps(client, run_id: str, key: str = "loss") -> list[int]:
    """The steps of one metric's history in a run (each record once, as the server holds them)."""
    return [m.step for m in client.get_metric_history(run_id, key)]


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
