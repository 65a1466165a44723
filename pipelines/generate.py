"""Ray Data pipeline for GPT-assisted instruction data: (image context, response type) units -> responses.

    units = pending_units(contexts, kinds, journal.done)                 # what no earlier run wrote
    outcomes = generate(units, plan, ledger)                             # lazily: one stats row per unit
    for row in outcomes.iter_rows(): ...                                 # progress, counts, tokens

Each actor of the pool runs ``concurrency / actors`` requests at a time on its own event loop and
appends every finished unit (a record, or a rejection with its reason) to its own journal file
``<output>/parts/part-<actor>.jsonl`` the moment the response arrives, flushed: a run killed at any
point keeps every response it paid for. An actor starting (also one that replaces a dead actor and
retries its batch) reads the journals first and skips the units already there, so nothing is asked
for or written twice. Units that failed (the endpoint kept failing) or were not sent (the token budget
was spent) are not journaled: the next run asks for them. ``commit`` merges the journals into the
output files atomically.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from llava_platform.datagen.annotations import Box, ImageContext
from llava_platform.datagen.client import ChatClient, ClientSettings
from llava_platform.datagen.parse import Rejected, to_record
from llava_platform.datagen.prompts import PromptSet, context_text

PARTS = "parts"
BATCHES_IN_FLIGHT = 2
"""Batches an actor works on at once (see ``Generator``)."""
OUTCOME_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("kind", pa.string()),
    ("status", pa.string()),  # ok | quarantined | failed | skipped (budget) | done (an earlier run's)
    ("reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("tokens_charged", pa.int64()),  # charged to the cap: the reported usage + unreported tries' worst cases
    ("unreported_tries", pa.int64()),
    ("requests", pa.int64()),
    ("retries", pa.int64()),
])


def unit_key(image_id: str, kind: str) -> str:
    return f"{image_id}/{kind}"


@dataclass(frozen=True)
class GenerationPlan:
    """What every actor needs, resolved on the driver."""

    client: ClientSettings
    api_key_env: str
    prompts: PromptSet
    output: str
    """Local (or shared) folder: the journals go to ``<output>/parts``."""
    actors: int = 1


class Journal:
    """The journals under ``<output>/parts``: read them all, or append to one of your own."""

    def __init__(self, output: str | Path):
        self.folder = Path(output) / PARTS

    def entries(self) -> tuple[dict[str, dict[str, Any]], int]:
        """Every journaled unit by key (the first entry wins), and the number of torn lines (a process killed
        mid-write; their units are asked for again)."""
        entries, torn = {}, 0
        for path in sorted(self.folder.glob("part-*.jsonl")) if self.folder.is_dir() else []:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    torn += 1
                    continue
                entries.setdefault(entry["key"], entry)
        return entries, torn

    def writer(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        return open(self.folder / f"part-{uuid.uuid4().hex}.jsonl", "a", encoding="utf-8")


def token_ledger(cap: int | None):
    """The run's ``TokenLedger`` actor, or ``None`` without a cap (nothing to reserve: no round trips)."""
    return TokenLedger.remote(cap) if cap is not None else None


@ray.remote(num_cpus=0)
class TokenLedger:
    """The run's token cap (``None``: no cap): reservations are held until the usage is known."""

    def __init__(self, cap: int | None):
        self.cap, self.reserved, self.used = cap, 0, 0

    def reserve(self, tokens: int) -> bool:
        if self.cap is not None and self.used + self.reserved + tokens > self.cap:
            return False
        self.reserved += tokens
        return True

    def settle(self, reserved: int, used: int) -> None:
        self.reserved -= reserved
        self.used += used

    def spent(self) -> int:
        return self.used


class LedgerBudget:
    """``client.Budget`` over a ``TokenLedger`` actor (Ray object refs are awaitable)."""

    def __init__(self, ledger):
        self.ledger = ledger

    async def reserve(self, tokens: int) -> bool:
        return await self.ledger.reserve.remote(tokens)

    async def settle(self, reserved: int, used: int) -> None:
        await self.ledger.settle.remote(reserved, used)


def unit_rows(contexts: Iterable[ImageContext], kinds: Iterable[str], skip: set[str]) -> list[dict[str, Any]]:
    """One row per (image, kind) not in ``skip``, in input order."""
    return [{"id": c.id, "image": c.image, "captions": list(c.captions), "boxes": [asdict(b) for b in c.boxes],
             "kind": kind} for c in contexts for kind in kinds if unit_key(c.id, kind) not in skip]


class Generator:
    """The per-actor callable of ``map_batches``: unit rows -> ``OUTCOME_SCHEMA`` rows, journaling as it goes.

    One event loop per actor, in a thread of its own, holds the client (its connections, concurrency
    slots and rate buckets) for the actor's life; the actor takes ``BATCHES_IN_FLIGHT`` batches at once
    (threads that hand their units to that loop), so the next batch's requests start while the last
    answers of the previous one arrive and the endpoint never sees a gap at a batch boundary. Units are
    journaled from the loop's thread only.
    """

    def __init__(self, plan: GenerationPlan, ledger):
        self.plan = plan
        self.journal = Journal(plan.output)
        self.done = set(self.journal.entries()[0])
        self.out = self.journal.writer()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="datagen-client").start()

        async def make_client() -> ChatClient:
            return ChatClient(plan.client, api_key=os.environ.get(plan.api_key_env, ""),
                              budget=LedgerBudget(ledger) if ledger is not None else None, share=1 / plan.actors)

        self.client = asyncio.run_coroutine_threadsafe(make_client(), self.loop).result()

    def __call__(self, batch: pa.Table) -> pa.Table:
        units = batch.to_pylist()
        rows = asyncio.run_coroutine_threadsafe(self._batch(units), self.loop).result()
        return pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA)

    async def _batch(self, units: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._unit(self.client, unit) for unit in units)))

    def __del__(self):  # the pool is done with this actor: close the connections, stop the loop
        try:
            asyncio.run_coroutine_threadsafe(self.client.close(), self.loop).result(timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.out.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown: nothing left to close)
            pass

    async def _unit(self, client: ChatClient, unit: dict[str, Any]) -> dict[str, Any]:
        key = unit_key(unit["id"], unit["kind"])
        row = {"key": key, "kind": unit["kind"], "status": "done", "reason": "", "prompt_tokens": 0,
               "completion_tokens": 0, "tokens_charged": 0, "unreported_tries": 0, "requests": 0, "retries": 0}
        if key in self.done:
            return row
        image = ImageContext(unit["id"], unit["image"], tuple(unit["captions"]),
                             tuple(Box(**box) for box in unit["boxes"]))
        outcome = await client.complete(self.plan.prompts.messages(unit["kind"], context_text(image)))
        row.update(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                   tokens_charged=outcome.charged, unreported_tries=outcome.unreported_tries,
                   retries=outcome.retries, requests=0 if outcome.skipped else outcome.retries + 1)
        if outcome.skipped:
            return row | {"status": "skipped", "reason": "budget"}
        if outcome.error is not None:
            return row | {"status": "failed", "reason": outcome.error[:200]}
        entry = {"key": key, "kind": unit["kind"], "id": unit["id"],
                 "usage": {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens}}
        try:
            entry |= {"status": "ok", "record": to_record(image, unit["kind"], outcome.content,
                                                          outcome.finish_reason, self.plan.prompts)}
        except Rejected as rejected:
            entry |= {"status": "quarantined", "reason": rejected.reason, "message": str(rejected),
                      "response": (outcome.content or "")[:2000]}
        self.out.write(json.dumps(entry) + "\n")
        self.out.flush()  # in the OS's hands before the next response: a killed process keeps it
        self.done.add(key)
        return row | {"status": entry["status"], "reason": entry.get("reason", "")}


def generate(units: ray.data.Dataset, plan: GenerationPlan, ledger, *, batch_size: int) -> ray.data.Dataset:
    """Lazily run every unit through the teacher; one ``OUTCOME_SCHEMA`` row per unit.

    The API key goes from the driver's environment to the actors' (``runtime_env``), never into the plan,
    the journals or MLflow. The actors run on the driver's node: the work is waiting on HTTP, not cores,
    and the journals then sit on the disk the driver commits from, on a laptop and on a cluster alike.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    key = os.environ.get(plan.api_key_env)
    return units.map_batches(
        Generator, fn_constructor_kwargs=dict(plan=plan, ledger=ledger), batch_format="pyarrow",
        batch_size=batch_size, compute=ActorPoolStrategy(size=plan.actors), num_cpus=0.25,
        max_concurrency=BATCHES_IN_FLIGHT, scheduling_strategy=here,
        runtime_env={"env_vars": {plan.api_key_env: key}} if key else None)


def commit(output: str | Path, kinds: Iterable[str]) -> dict[str, Any]:
    """Merge the journals into ``<type>.json`` (LLaVA-format arrays) and ``quarantine.jsonl``, each written to a
    temporary name and renamed (a reader sees the old file or the new one, never half of one).

    Returns: per type the records written, the quarantine reasons, the usage of everything journaled
    (across runs), and the torn lines skipped.
    """
    output = Path(output)
    entries, torn = Journal(output).entries()
    records = {kind: [] for kind in kinds}
    quarantined, reasons, usage = [], {}, {"prompt_tokens": 0, "completion_tokens": 0}
    for key in sorted(entries):
        entry = entries[key]
        for name in usage:
            usage[name] += entry["usage"][name]
        if entry["status"] == "ok":
            records.setdefault(entry["kind"], []).append(entry["record"])
        else:
            quarantined.append({k: entry[k] for k in ("key", "id", "kind", "reason", "message", "response")})
            reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    for kind, rows in records.items():
        _atomic_write(output / f"{kind}.json", json.dumps(rows, indent=1, ensure_ascii=False))
    _atomic_write(output / "quarantine.jsonl", "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantined))
    return {"records": {kind: len(rows) for kind, rows in records.items()}, "quarantined": reasons,
            "journaled_usage": usage, "torn_lines": torn}


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
