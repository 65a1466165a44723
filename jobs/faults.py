"""Fault injection for training: a test facility, off unless ``LLAVA_TRAIN_KILL_WORKER_AT_STEP`` is set.

    LLAVA_TRAIN_KILL_WORKER_AT_STEP=<step>[:<rank>[:kill|hang|checkpoint]][,...] python -m jobs.train ...

``kill`` (default) SIGKILLs the worker right after that optimizer step (the signal the kernel's OOM
killer sends; nothing is cleaned up); ``hang`` stops it there until something outside kills it (a
test that removes the worker's node); ``checkpoint`` kills it halfway through writing its part of
that step's checkpoint (the step must be a checkpoint step). The rank defaults to the last one.

The training loop calls two hooks and knows nothing else of this module: ``Faults.after_step`` after
every optimizer step, and ``Faults.upload`` for the ``checkpoint_upload_fn`` of every checkpoint
report. Each fault fires once: when it fires it writes a marker file (JSON, ``FAULT_MARKER`` in the
stage's output folder) that the restarted worker group sees, and that tells the test what was done.
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
        return cls(tuple(faults))

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
