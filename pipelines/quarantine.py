"""A Ray actor that collects quarantined records and counts, exactly once per record.

Preprocessing workers send each batch's record keys and bad rows here; retried tasks and repeated
epochs send the same keys again, so everything is keyed by ``source:index`` and counted once.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ray


@dataclass
class PreprocessReport:
    """What a preprocessing run read, kept and quarantined (by reason)."""

    read: int = 0
    kept: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, int]:
        """Flat numbers for MLflow: ``data/read``, ``data/kept``, ``data/quarantined/<reason>``."""
        metrics = {"data/read": self.read, "data/kept": self.kept}
        metrics.update({f"data/quarantined/{reason}": n for reason, n in self.quarantined.items()})
        return metrics

    def table(self) -> str:
        """The summary table a run prints at the end."""
        rows = [("read", self.read), ("kept", self.kept), ("quarantined", sum(self.quarantined.values()))]
        rows += [(f"  {reason}", n) for reason, n in sorted(self.quarantined.items())]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {n:>9,}" for name, n in rows)


@ray.remote(num_cpus=0)
class QuarantineLog:
    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.bad: dict[str, dict] = {}

    def add(self, keys: list[str], bad_rows: list[dict]) -> None:
        self.seen.update(keys)
        for row in bad_rows:
            self.bad.setdefault(row["key"], row)

    def report(self) -> PreprocessReport:
        reasons = Counter(row["reason"] for row in self.bad.values())
        return PreprocessReport(read=len(self.seen), kept=len(self.seen) - len(self.bad), quarantined=dict(reasons))

    def rows(self) -> list[dict]:
        return sorted(self.bad.values(), key=lambda row: row["key"])


def start_quarantine_log():
    """A ``QuarantineLog`` on this process's node (the driver's). Placed anywhere, it could sit on a worker
    node that is later lost: every preprocessing task would then fail on it, restart after restart, and
    the records it holds would be gone. The driver's node lives as long as the job does."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return QuarantineLog.options(scheduling_strategy=here).remote()


def write_quarantine(rows: list[dict], path: str | Path) -> Path:
    """One JSON line per quarantined record: id, source, index, reason, message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "key"}) + "\n" for row in rows))
    return path
