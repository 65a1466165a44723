"""Where a training worker's optimizer steps come from: this rank's micro-batches of rows, step by step.

Two sources, one interface (``StepSource.epoch``):

- ``ShardSteps`` (preprocessed stages): the global order of ``llava_platform.data.position`` over the
  shards' row ids; rank ``r`` of ``W`` reads its contiguous part of each global batch by id
  (``pipelines.shards.RowReader``). The same rows and global batches at any ``W``, so a resize or a resume
  on another worker count continues exactly.
- ``StreamedSteps`` (streamed stages): rank ``r`` streams the Ray dataset ``rank<r>``, its fixed part of the
  records, regrouped in windows (``data.grouping.regroup``); exact on the same worker count only (the
  recipe check refuses elastic runs, ``jobs.train``'s preflight a resume on another count).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

import numpy as np

from llava_platform.data.grouping import regroup
from llava_platform.data.packing import Packing
from llava_platform.data.position import GlobalBatches, MicroBatch, RowOrder
from llava_platform.train.plan import LoopSpec
from pipelines.shards import RowReader


@dataclass(frozen=True)
class Step:
    """One optimizer step on this rank."""

    rows: list[dict[str, np.ndarray]]
    """Column batches, one per micro-step slot (``accumulation`` of them)."""
    weights: tuple[float, ...]
    """Each slot's loss weight (``train_step``'s ``weights``; 0 for padding)."""
    trained_ids: list[str]
    """Record ids of the rows this rank trains (not the padding's): the row ledger's entries."""
    global_units: int
    """Units (rows, or packs) of the whole global step, over all ranks (``DataPosition.consumed`` advances by it)."""


class StepSource(Protocol):
    def epoch(self, epoch: int, *, skip: int) -> Iterator[Step]:
        """Epoch ``epoch``'s steps for this rank, after the first ``skip`` (those a checkpoint covers)."""


class ShardSteps:
    """Rows by id in the global order: rank ``rank``'s part of every global batch at ``world_size`` workers."""

    def __init__(self, loop: LoopSpec, rank: int, world_size: int, accumulation: int):
        self.reader = RowReader(loop.shards.files, cache_blocks=loop.shards.window_blocks)
        self.batches = shard_batches(loop, self.reader)
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation

    def epoch(self, epoch: int, *, skip: int) -> Iterator[Step]:
        for index in range(skip, self.batches.steps_in(epoch)):
            step = self.batches.step(epoch, index)
            share = step.share(self.rank, self.world_size, self.accumulation)
            rows = [self.read(batch) for batch in share.micro_batches]
            trained = [str(i) for batch, w in zip(rows, share.weights, strict=True) if w > 0 for i in batch["id"]]
            yield Step(rows=rows, weights=share.weights, trained_ids=trained, global_units=step.units)

    def read(self, batch: MicroBatch) -> dict[str, np.ndarray]:
        """A micro-batch's rows, in order; packed, with ``pack_sizes``: how many rows each model row holds."""
        rows = self.reader.read(np.concatenate(batch))
        if self.batches.packing is not None:
            rows["pack_sizes"] = np.asarray([len(pack) for pack in batch])
        return rows


def shard_batches(loop: LoopSpec, reader: RowReader) -> GlobalBatches:
    """The stage's global batches over the shards ``reader`` reads: rows, grouped by modality and length, or
    packs (the driver counts the stage's steps with it, the workers train by it)."""
    shards = loop.shards
    columns = {}
    if shards.packing is not None:
        columns["packing"] = Packing(shards.packing, tokens=reader.column("length"), tiles=reader.column("num_tiles"))
    elif loop.group_by_modality_length:
        columns.update(lengths=reader.column("length"), modalities=reader.column("modality"))
    return GlobalBatches(RowOrder(shards.block_sizes, seed=loop.seed, window_blocks=shards.window_blocks),
                         global_batch=loop.global_batch_size, micro_batch=loop.micro_batch_size, **columns)


class StreamedSteps:
    """This rank's own streamed dataset (``rank<r>``), ``accumulation`` micro-batches per step; an epoch ends
    when the rank's rows do not fill another step."""

    def __init__(self, loop: LoopSpec, dataset, accumulation: int):
        self.loop, self.dataset, self.accumulation = loop, dataset, accumulation

    def epoch(self, epoch: int, *, skip: int) -> Iterator[Step]:
        windows = self.dataset.iter_batches(batch_size=self.loop.group_window, batch_format="numpy")
        micro_batches = regroup(windows, self.loop.micro_batch_size, group=self.loop.group_by_modality_length,
                                seed=self.loop.seed + epoch)
        for _ in range(skip * self.accumulation):  # the micro-batches the checkpoint covers
            if next(micro_batches, None) is None:
                return
        while len(rows := list(islice(micro_batches, self.accumulation))) == self.accumulation:
            yield Step(rows=rows, weights=(1.0,) * self.accumulation,
                       trained_ids=[str(i) for batch in rows for i in batch["id"]],
                       global_units=self.loop.global_batch_size)
