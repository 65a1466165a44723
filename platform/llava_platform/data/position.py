"""Which rows each optimizer step trains, whatever the number of workers: one global order per epoch.

    order = RowOrder(block_sizes=(16,) * 15, seed=42)            # 240 rows stored in 15 row groups
    batches = GlobalBatches(order, global_batch=12, micro_batch=1)
    batches.steps_per_epoch                                     # 20
    step = batches.step(epoch=0, index=3)                       # global step 3 of epoch 0: 12 micro-batches of ids
    share = step.share(rank=1, world_size=4)                    # rank 1's 3 micro-batches (contiguous) and weights

Every row has a dense id, its place in the stored order (``pipelines.shards.RowReader`` reads rows by
id). Epoch ``e``'s order is a seeded permutation of the ids that never depends on the worker count:
the row groups are shuffled, then the rows inside each window of ``window_blocks`` consecutive row
groups (a block shuffle: a worker reads each row group once per epoch, from a small cache, instead of
one row group per row). Global step ``j`` of an epoch is the slice ``[j * G, (j + 1) * G)`` of that order
(``G``: the global batch in rows), cut into micro-batches in a fixed order; the last step of an epoch
takes the rows that are left. At ``W`` workers rank ``r`` runs micro-batches ``[r * A, (r + 1) * A)`` of
the step (``A``: ``micro_steps``); slots past the step's micro-batches (a global batch that does not
divide among ``W`` workers, with padding allowed, or the epoch's shorter last step) run a filler
micro-batch with weight 0, and the real ones are weighted ``A * W / R`` (``R`` real micro-batches), so
that the update is the mean over the step's micro-batches at every worker count.

``DataPosition`` is where a stage is in its data, saved once, globally, in every checkpoint: a
resumed run on any worker count continues with the next rows of the same order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from llava_platform.data.packing import Packing, balance

ORDER_VERSION = "block-shuffle-v1"
"""The rule ``RowOrder`` draws orders by; a checkpoint of another rule does not resume (its rows would differ)."""
STREAMED_ORDER = "streamed-per-rank-v1"
"""Streamed stages' order: each rank streams its own fixed part of the records (``jobs.train``); the same
rows come back only on the same number of workers."""


def micro_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each of ``world_size`` workers: enough slots for the global batch's
    ``global_batch / micro_batch`` micro-batches (exact when they divide; otherwise some slots are padding)."""
    return max(1, math.ceil(math.ceil(global_batch / micro_batch) / world_size))


def exact_world_sizes(global_batch: int, micro_batch: int, sizes: Sequence[int]) -> list[int]:
    """Those of ``sizes`` on which the global batch splits into whole micro-batches on every worker (no padding)."""
    return [w for w in sizes if global_batch % (micro_batch * w) == 0]


@dataclass(frozen=True)
class RowOrder:
    """The epoch orders of a set of stored rows (see the module docstring).

    ``block_sizes``: rows per row group, in storage order (the ids are ``0 .. sum - 1`` in that order).
    """

    block_sizes: tuple[int, ...]
    seed: int
    window_blocks: int = 64
    """Row groups whose rows are shuffled together: the randomness of a batch's rows against the rows
    a worker keeps cached (``pipelines.shards.RowReader`` holds this many row groups)."""

    @property
    def num_rows(self) -> int:
        return int(sum(self.block_sizes))

    def epoch(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order: every id once, int64, shape (num_rows,)."""
        rng = np.random.default_rng([self.seed, epoch])
        sizes = np.asarray(self.block_sizes, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else sizes
        blocks = rng.permutation(len(sizes))
        pieces = []
        for first in range(0, len(blocks), self.window_blocks):
            window = blocks[first:first + self.window_blocks]
            ids = np.concatenate([np.arange(starts[b], starts[b] + sizes[b]) for b in window])
            pieces.append(ids[rng.permutation(len(ids))])
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


MicroBatch = tuple[np.ndarray, ...]
"""The rows of one model batch, each as the row ids it holds: one id each, or a pack's ids (``data.packing``)."""


@dataclass(frozen=True)
class RankShare:
    """What one rank runs for one optimizer step: ``micro_steps`` slots, each a micro-batch and its loss weight."""

    micro_batches: tuple[MicroBatch, ...]
    """One per slot; a padding slot holds the step's first micro-batch (a filler, weight 0)."""
    weights: tuple[float, ...]
    """Each slot's loss multiplier when every micro-batch weighs the same: ``A * W / R`` for a real
    micro-batch, 0 for padding (a token-weighted loss rescales the real ones, ``train.loss_weights``)."""

    @property
    def trained(self) -> list[int]:
        """Ids of the rows this rank trains (weight above 0), in slot order."""
        return [int(i) for batch, w in zip(self.micro_batches, self.weights, strict=True) if w > 0
                for row in batch for i in row]


@dataclass(frozen=True)
class GlobalStep:
    """One optimizer step's units (rows, or packs) cut into micro-batches in a fixed order, the same at every
    worker count."""

    epoch: int
    index: int
    """The step's place in its epoch (0-based)."""
    micro_batches: tuple[MicroBatch, ...]
    costs: tuple[float, ...] | None = None
    """Each micro-batch's compute (``data.packing.PackCost``): set when packing, so that ``share`` balances."""

    @property
    def units(self) -> int:
        """Rows, or packs when packing (what ``DataPosition.consumed`` counts)."""
        return sum(len(batch) for batch in self.micro_batches)

    def share(self, rank: int, world_size: int, accumulation: int) -> RankShare:
        """Rank ``rank``'s part at ``world_size`` workers with ``accumulation`` slots each: its contiguous run of
        micro-batches, or with costs, those ``data.packing.balance`` gives it (largest cost first).

        Raises:
            ValueError: ``accumulation * world_size`` slots cannot hold the step's micro-batches.
        """
        slots, real = accumulation * world_size, len(self.micro_batches)
        if slots < real:
            raise ValueError(f"{world_size} workers x {accumulation} micro-steps cannot hold {real} micro-batches")
        weight = slots / real
        if self.costs is None:
            mine = self.micro_batches[rank * accumulation:(rank + 1) * accumulation]
        else:
            mine = tuple(self.micro_batches[i]
                         for i in balance(self.costs, world_size=world_size, slots=accumulation)[rank])
        filler = accumulation - len(mine)
        return RankShare(micro_batches=tuple(mine) + (self.micro_batches[0],) * filler,
                         weights=(weight,) * len(mine) + (0.0,) * filler)


@dataclass(frozen=True)
class GlobalBatches:
    """Epochs of ``order`` cut into global batches of ``global_batch`` units and micro-batches of ``micro_batch``.

    A unit is a row, or with ``packing`` a pack of rows (``data.packing.plan_packs`` over the epoch's order).
    Without packing, ``lengths`` and ``modalities`` (per id) group each global batch: its rows sorted by
    modality and length, cut into micro-batches, and the micro-batches shuffled (LLaVA's
    ``group_by_modality_length`` within one global batch, so that it stays the same at every worker count).
    """

    order: RowOrder
    global_batch: int
    micro_batch: int
    lengths: np.ndarray | None = field(default=None, compare=False, repr=False)
    modalities: np.ndarray | None = field(default=None, compare=False, repr=False)
    packing: Packing | None = field(default=None, compare=False, repr=False)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global batch {self.global_batch} is not a whole number of micro-batches of "
                             f"{self.micro_batch}")

    def units(self, epoch: int) -> list[np.ndarray]:
        """Epoch ``epoch``'s units in order, each as its row ids (one epoch kept at a time)."""
        if epoch not in self._cache:
            self._cache.clear()
            order = self.order.epoch(epoch)
            self._cache[epoch] = (self.packing.packs(order, seed=[self.order.seed, epoch]) if self.packing
                                  else list(order.reshape(-1, 1)))
        return self._cache[epoch]

    def steps_in(self, epoch: int) -> int:
        """Global batches of ``epoch``, the last one shorter when the units do not divide."""
        return math.ceil(len(self.units(epoch)) / self.global_batch)

    def step(self, epoch: int, index: int) -> GlobalStep:
        """Global step ``index`` (0-based) of ``epoch``."""
        units = self.units(epoch)[index * self.global_batch:(index + 1) * self.global_batch]
        if not units:
            raise IndexError(f"epoch {epoch} has {self.steps_in(epoch)} steps; no step {index}")
        if self.lengths is not None and self.packing is None:
            rows = np.concatenate(units)
            units = list(rows[np.lexsort((self.lengths[rows], self.modalities[rows]))].reshape(-1, 1))
        cuts = [tuple(units[i:i + self.micro_batch]) for i in range(0, len(units), self.micro_batch)]
        if self.lengths is not None and self.packing is None:
            shuffle = np.random.default_rng([self.order.seed, epoch, index]).permutation(len(cuts))
            cuts = [cuts[i] for i in shuffle]
        costs = tuple(sum(self.packing.cost_of(pack) for pack in batch) for batch in cuts) if self.packing else None
        return GlobalStep(epoch=epoch, index=index, micro_batches=tuple(cuts), costs=costs)


@dataclass(frozen=True)
class DataPosition:
    """Where a stage is in its data: saved once, globally, in every checkpoint (``TrainingPosition.data``)."""

    fingerprint: str
    """The rows the order is drawn over (``pipelines.shards``: manifest and row-group layout; streamed:
    the stage's data settings)."""
    seed: int
    order_version: str
    """``ORDER_VERSION`` (rows by id) or ``STREAMED_ORDER``."""
    global_batch: int
    micro_batch: int
    epoch: int = 0
    consumed: int = 0
    """Units (rows, or packs) of ``epoch`` already trained (the sum of its finished steps' units)."""

    def after_step(self, units: int) -> DataPosition:
        """The position after a step of ``units`` units."""
        return DataPosition(**{**asdict(self), "consumed": self.consumed + units})

    def next_epoch(self) -> DataPosition:
        return DataPosition(**{**asdict(self), "epoch": self.epoch + 1, "consumed": 0})

    @property
    def steps_in_epoch(self) -> int:
        """Whole global batches trained in ``epoch`` (every step but an epoch's last is a whole one)."""
        return self.consumed // self.global_batch + (self.consumed % self.global_batch > 0)

    def differences(self, other: DataPosition) -> list[str]:
        """What makes ``other`` (a plan) continue a different row sequence than this saved position."""
        names = ("fingerprint", "seed", "order_version", "global_batch", "micro_batch")
        return [f"{name} {getattr(self, name)!r} -> {getattr(other, name)!r}" for name in names
                if getattr(self, name) != getattr(other, name)]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataPosition:
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})
