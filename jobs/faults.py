"""Fault injection for training, and the ledger of the rows each step trained: a test facility, off unless
``LLAVA_TRAIN_KILL_WORKER_AT_STEP`` (faults) or ``LLAVA_TRAIN_ROW_LEDGER`` (the ledger) is set.

    LLAVA_TRAIN_KILL_WORKER_AT_STEP=<step>[:<rank>[:kill|hang|checkpoint]][,...] python -m jobs.train ...

``kill`` (default) SIGKILLs the worker right after that optimizer step (the signal the kernel's OOM
killer sends; nothing is cleaned up); ``hang`` stops it there until something outside kills it (a
test that removes the worker's node); ``checkpoint`` kills it halfway through writing its part of
that step's checkpoint (the step must be a checkpoint step). The rank defaults to the last one.

The training loop calls three hooks and knows nothing else of this module: ``Faults.after_step`` after
every optimizer step, ``Faults.upload`` for the ``checkpoint_upload_fn`` of every checkpoint report, and
``Faults.row_ledger`` once per worker group start (its ``record`` after every step). Each fault fires
once: when it fires it writes a marker file (JSON, ``FAULT_MARKER`` in the stage's output folder) that the
restarted worker group sees, and that tells the test what was done.

    LLAVA_TRAIN_ROW_LEDGER=1 python -m jobs.train ...

writes, per worker group start (an attempt), ``<stage output>/row-ledger/attempt-NNN.jsonl``: a header
line ``{"from_step", "world_size"}``, then per optimizer step ``{"step", "epoch", "rows": [[ids of rank
0], [ids of rank 1], ...]}`` (rank 0 gathers and writes, flushed per step). ``committed_steps`` replays
the attempts: what a restart rolled back is dropped, so the result is the rows each step of the final
model was trained on. The tests measure rows trained twice or never from it (``tests/helpers/losses.py``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

KILL_AT_STEP_ENV = "LLAVA_TRAIN_KILL_WORKER_AT_STEP"
"""The environment variable that arms fault injection (read on the driver by ``Faults.from_env``)."""
ROW_LEDGER_ENV = "LLAVA_TRAIN_ROW_LEDGER"
"""Set (to anything but empty or 0) to write the row ledger (read on the driver by ``Faults.from_env``)."""
ROW_LEDGER_DIR = "row-ledger"
"""The ledger's folder in the stage's output folder."""
FAULT_MARKER = ".fault-{action}-step{step}-rank{rank}"
"""The file a fault writes in the stage's output folder when it fires."""
FAULT_UPLOAD_S = 5.0
"""How long the interrupted upload takes before it dies: longer than Ray Train's controller takes to
collect the ranks' earlier reports (it polls every 2 s), as a real upload would, so that the previous
checkpoint is registered. A failure within that window after a report loses that checkpoint too (Known limits)."""

Action = Literal["kill", "hang", "checkpoint"]


@dataclass(frozen=True)
class Fault:
    step: int
    rank: int
    action: Action
    marker: str
    """The marker file's path."""

    def due(self, step: int, rank: int, actions: tuple[Action, ...]) -> bool:
        return (self.action in actions and step == self.step and rank == self.rank
                and not Path(self.marker).exists())

    def mark(self, step: int, what: str, **details: Any) -> None:
        """Write the marker file (fires once) and say what was done."""
        Path(self.marker).write_text(json.dumps({"what": what, "pid": os.getpid(), "step": step, "at": time.time(),
                                                 **details}))
        print(f"[train rank {self.rank}] fault injection: {what} (pid {os.getpid()})", flush=True)


@dataclass(frozen=True)
class Faults:
    """The faults armed for one stage (none by default)."""

    faults: tuple[Fault, ...] = ()
    ledger: str | None = None
    """The row ledger's folder, when ``LLAVA_TRAIN_ROW_LEDGER`` arms it."""

    @classmethod
    def from_env(cls, stage_dir: Path, workers: int) -> Faults:
        """The faults that ``LLAVA_TRAIN_KILL_WORKER_AT_STEP`` asks for, one per comma-separated spec.

        Raises:
            ValueError: an action other than kill, hang or checkpoint.
        """
        faults = []
        for spec in filter(None, os.environ.get(KILL_AT_STEP_ENV, "").split(",")):
            step, rank, action = (spec.split(":") + ["", ""])[:3]
            if action not in ("", "kill", "hang", "checkpoint"):
                raise ValueError(f"{KILL_AT_STEP_ENV}={spec}: the action is kill (default), hang or checkpoint")
            fault = {"step": int(step), "rank": int(rank or workers - 1), "action": action or "kill"}
            faults.append(Fault(**fault, marker=str(stage_dir / FAULT_MARKER.format(**fault))))
        armed = os.environ.get(ROW_LEDGER_ENV, "") not in ("", "0")
        return cls(tuple(faults), str(stage_dir / ROW_LEDGER_DIR) if armed else None)

    def row_ledger(self, from_step: int, rank: int, world_size: int) -> RowLedger:
        """Hook at every worker group start, on every rank: the attempt's ledger (a no-op unless armed)."""
        return RowLedger(self.ledger, from_step, rank, world_size)

    def after_step(self, step: int, rank: int) -> None:
        """Hook after optimizer step ``step``: SIGKILL this worker (``kill``) or stop it for good (``hang``)."""
        fault = self._due(step, rank, ("kill", "hang"))
        if fault is None:
            return
        fault.mark(step, f"{fault.action} rank {rank} at step {step}")
        if fault.action == "hang":
            time.sleep(600)
        os.kill(os.getpid(), signal.SIGKILL)

    def upload(self, step: int, rank: int) -> Callable | None:
        """Hook for ``ray.train.report(checkpoint_upload_fn=...)``: ``None`` (Ray Train's own upload) unless a
        ``checkpoint`` fault fires now; then an upload that writes half of this rank's checkpoint files into
        storage and SIGKILLs the worker: a worker lost in the middle of a checkpoint write."""
        fault = self._due(step, rank, ("checkpoint",))
        if fault is None:
            return None

        def write_half_then_die(checkpoint, checkpoint_dir_name: str) -> None:
            import ray.train

            time.sleep(FAULT_UPLOAD_S)
            storage = ray.train.get_context().get_storage()
            destination = f"{storage.experiment_fs_path}/{checkpoint_dir_name}"
            files = sorted(path for path in Path(checkpoint.path).rglob("*") if path.is_file())
            written = [str(path.relative_to(checkpoint.path)) for path in files[:len(files) // 2]]
            for name in written:
                storage.storage_filesystem.create_dir(str(Path(destination, name).parent), recursive=True)
                with storage.storage_filesystem.open_output_stream(f"{destination}/{name}") as stream:
                    stream.write((Path(checkpoint.path) / name).read_bytes())
            fault.mark(step, f"killed rank {rank} writing {checkpoint_dir_name}: "
                             f"{len(written)} of {len(files)} files written", written=written)
            os.kill(os.getpid(), signal.SIGKILL)

        return write_half_then_die

    def _due(self, step: int, rank: int, actions: tuple[Action, ...]) -> Fault | None:
        return next((fault for fault in self.faults if fault.due(step, rank, actions)), None)


class RowLedger:
    """One attempt's ledger: ``record`` after every optimizer step, on every rank (a collective when armed)."""

    def __init__(self, folder: str | None, from_step: int, rank: int, world_size: int):
        self.rank, self.file = rank, None
        self.armed = folder is not None
        if self.armed and rank == 0:
            Path(folder).mkdir(parents=True, exist_ok=True)
            attempt = len(list(Path(folder).glob("attempt-*.jsonl")))
            self.file = open(Path(folder) / f"attempt-{attempt:03d}.jsonl", "w")  # noqa: SIM115 - one per attempt
            self._write({"from_step": from_step, "world_size": world_size, "at": time.time()})

    def record(self, step: int, epoch: int, row_ids: list[str]) -> None:
        """The ids of the rows this rank trained in ``step`` (all its micro-batches); rank 0 writes every rank's."""
        if not self.armed:
            return
        import torch.distributed as dist

        ids = [str(i) for i in row_ids]
        rows: list = [None] * dist.get_world_size() if dist.is_initialized() else [ids]  # one process: itself
        if dist.is_initialized():
            dist.all_gather_object(rows, ids)
        if self.file is not None:
            self._write({"step": step, "epoch": epoch, "rows": rows})

    def _write(self, line: dict) -> None:
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()


def committed_steps(folder: str | Path) -> dict[int, dict[str, Any]]:
    """Step -> ``{"epoch", "rows"}`` of the steps the final model holds: the attempts replayed in order, each
    start rolling back every step after the checkpoint it resumed from (``from_step``)."""
    committed: dict[int, dict[str, Any]] = {}
    for path in sorted(Path(folder).glob("attempt-*.jsonl")):
        header, *steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        committed = {step: line for step, line in committed.items() if step <= header["from_step"]}
        committed.update({line["step"]: {"epoch": line["epoch"], "rows": line["rows"]} for line in steps})
    return committed
