"""Several training ranks on one machine without Ray: fresh processes joined by a gloo process group.

    results = spawn_ranks(rank_memory, 2, RankMemoryTask(model=..., overrides=(...)))

For the measurements that need real DeepSpeed ranks but nothing of Ray Train (memory per rank; the
ZeRO-3 loading benchmark and the memory planner's check): each rank is a new ``spawn`` process, so
its memory is its own.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, target: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    try:
        from llava_platform.train.deepspeed_engine import init_distributed

        init_distributed("gloo")
        # plain pickle bytes: torch's queue pickler would share tensors through file descriptors that die
        # with this process, before the parent reads them
        queue.put((rank, pickle.dumps(target(rank, world_size, *args)), None))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, None, traceback.format_exc()))


MALLOC_MMAP_THRESHOLD = 64 * 1024
"""The ranks' glibc serves every allocation from 64 KiB up with its own ``mmap`` and unmaps it when freed,
so resident memory follows the live tensors (by default glibc raises that threshold as tensors are
freed and keeps freed heap memory resident: ZeRO-3's transient gathers then look like allocations)."""


def spawn_ranks(target: Callable, world_size: int, *args: Any, timeout_s: float = 900) -> list[Any]:
    """``target(rank, world_size, *args)`` in ``world_size`` new processes (a module-level function and
    picklable arguments); returns the ranks' results in rank order. The ranks run with
    ``MALLOC_MMAP_THRESHOLD_`` set (``MALLOC_MMAP_THRESHOLD``), so their resident memory measures live memory.

    Raises:
        RuntimeError: a rank failed (its traceback in the message) or did not answer in time.
    """
    context = mp.get_context("spawn")
    queue, port = context.Queue(), _free_port()
    processes = [context.Process(target=_rank_main, args=(rank, world_size, port, target, args, queue))
                 for rank in range(world_size)]
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)  # read by glibc when a process starts
    try:
        for process in processes:
            process.start()
    finally:
        if previous is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, result, error = queue.get(timeout=timeout_s)
            if error:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results[rank] = pickle.loads(result)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return [results[rank] for rank in range(world_size)]


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> None:
    """Start this process's peak-RSS counter (``VmHWM``) again from its current resident memory (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """This process's peak resident memory since ``reset_peak_rss`` (``VmHWM``). Not ``getrusage``: its
    maximum survives ``fork`` + ``exec``, so a spawned rank would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@dataclass(frozen=True)
class RankMemory:
    """Resident memory of one rank around building its engine and taking one optimizer step (bytes)."""

    before: int
    """After imports and joining the process group, before the model is loaded."""
    peak_build: int
    """The process's peak up to the built engine (loading, partitioning, optimizer set-up)."""
    after_step: int
    """After one optimizer step (Adam's moments exist from the first step on)."""


@dataclass(frozen=True)
class EngineTask:
    """What each rank builds: ``recipe`` + ``overrides``' ``stage`` engine around the checkpoint ``model``."""

    recipe: str
    overrides: tuple[str, ...]
    stage: str
    model: str
    step: bool = True
    """Also take one optimizer step on a text-only micro-batch (Adam's moments appear at the first step)."""


def rank_memory(rank: int, world_size: int, task: EngineTask,
                build: Callable | None = None) -> RankMemory:
    """Build the stage's engine the way training does (``build_deepspeed_engine``, or ``build`` given the spec), and
    measure this rank's resident memory around it."""
    import gc

    import torch

    from llava_platform.config import load_recipe
    from llava_platform.config.build import deepspeed_spec
    from llava_platform.train.deepspeed_engine import build_deepspeed_engine, train_step

    torch.set_num_threads(1)
    recipe = load_recipe(task.recipe, [*task.overrides, f"scaling.num_workers={world_size}"])
    spec = deepspeed_spec(recipe, recipe.stages()[task.stage], task.model, total_steps=10)
    gc.collect()
    before = rss_bytes()
    reset_peak_rss()
    engine, processor = (build or build_deepspeed_engine)(spec)
    peak = peak_rss_bytes()
    if task.step:
        ids = torch.randint(3, len(processor.tokenizer) - 1, (1, 32))
        train_step(engine, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}])
    gc.collect()
    return RankMemory(before=before, peak_build=peak, after_step=rss_bytes())
