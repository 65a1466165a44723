"""Several samples, with their images, in one training row: packs planned from exact lengths, and the costs
that balance them over ranks.

    packs = plan_packs(order, tokens, tiles, PackBudget(max_tokens=4096, max_tiles=40), window=1024, seed=s)
    ranks = balance(costs, world_size=8, slots=2)          # which of a step's packs each rank runs

Every preprocessed row's token count (images expanded) and tile/frame count are known, so an epoch's
packs are planned before any tensor is built: best-fit decreasing inside consecutive windows of the
epoch's order (``data.position.RowOrder``), under a token budget and a tile budget, a sample never split.
The packs of a window are then shuffled (seeded), so long and short packs mix. The plan depends on the
order, the lengths and the budgets only, never on the worker count: ``data.position.GlobalBatches``
takes a pack as its unit. ``balance`` then gives each global step's packs to ranks largest-cost first
(a rank whose pack holds more tiles would make every other rank wait at the all-reduce).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PackBudget:
    """What one pack may hold."""

    max_tokens: int
    """Tokens of a pack (image tokens included): its row length."""
    max_tiles: int | None = None
    """Tiles and video frames of a pack (what the vision tower runs); ``None``: no limit."""


class PackingError(ValueError):
    """A sample that no pack can hold."""


def plan_packs(order: np.ndarray, tokens: np.ndarray, tiles: np.ndarray, budget: PackBudget, *, window: int,
               seed: Sequence[int]) -> list[np.ndarray]:
    """An epoch's packs: row ids, each pack in decreasing-length order.

    Args:
        order: the epoch's row ids (``RowOrder.epoch``).
        tokens, tiles: per row id, its token count and tile (+ frame) count.
        window: rows packed together (best-fit decreasing inside each window of ``order``).
        seed: seeds the order of the packs inside each window (e.g. ``[recipe seed, epoch]``).

    Raises:
        PackingError: a row longer than ``budget.max_tokens`` or with more tiles than ``budget.max_tiles``.
    """
    too_long = np.flatnonzero(tokens[order] > budget.max_tokens)
    if len(too_long):
        row = int(order[too_long[0]])
        raise PackingError(f"row {row} has {int(tokens[row])} tokens, more than data.packing.max_tokens "
                           f"{budget.max_tokens} ({len(too_long)} such rows)")
    if budget.max_tiles is not None and (tiles[order] > budget.max_tiles).any():
        row = int(order[np.flatnonzero(tiles[order] > budget.max_tiles)[0]])
        raise PackingError(f"row {row} has {int(tiles[row])} tiles, more than data.packing.max_tiles "
                           f"{budget.max_tiles}")
    rng = np.random.default_rng(list(seed))
    packs: list[np.ndarray] = []
    for first in range(0, len(order), window):
        planned = _best_fit_decreasing(order[first:first + window], tokens, tiles, budget)
        packs += [planned[i] for i in rng.permutation(len(planned))]
    return packs


def _best_fit_decreasing(ids: np.ndarray, tokens: np.ndarray, tiles: np.ndarray,
                         budget: PackBudget) -> list[np.ndarray]:
    """Longest first, each into the open pack it fills most (fewest tokens left that still fit, tiles too)."""
    by_length = ids[np.argsort(-tokens[ids], kind="stable")]
    room: list[tuple[int, int]] = []  # (tokens left, pack index), sorted
    members: list[list[int]] = []
    tiles_left: list[float] = []
    tile_limit = float("inf") if budget.max_tiles is None else budget.max_tiles
    for row in by_length:
        need, need_tiles = int(tokens[row]), int(tiles[row])
        at = bisect.bisect_left(room, (need, -1))
        while at < len(room) and tiles_left[room[at][1]] < need_tiles:
            at += 1
        if at == len(room):
            members.append([int(row)])
            tiles_left.append(tile_limit - need_tiles)
            bisect.insort(room, (budget.max_tokens - need, len(members) - 1))
            continue
        left, pack = room.pop(at)
        members[pack].append(int(row))
        tiles_left[pack] -= need_tiles
        bisect.insort(room, (left - need, pack))
    return [np.asarray(pack, dtype=np.int64) for pack in members]


@dataclass(frozen=True)
class PackCost:
    """Relative compute of a pack (one forward and backward): per token, per token pair inside a sample
    (attention), per tile or frame through the vision tower (``PackCost.of`` derives them from a model's
    shapes)."""

    per_token: float
    per_token_pair: float
    per_tile: float

    @classmethod
    def of(cls, *, lm_params: float, lm_layers: int, lm_hidden: int, tower_params: float, tokens_per_tile: int,
           tower_trains: bool) -> PackCost:
        """Training FLOPs: 6 per parameter per token for the language model, 12 x layers x hidden per token
        pair (scores and values, forward and backward), and the tower's 6 (trained) or 2 (frozen) per
        parameter per patch token."""
        return cls(per_token=6.0 * lm_params, per_token_pair=12.0 * lm_layers * lm_hidden,
                   per_tile=(6.0 if tower_trains else 2.0) * tower_params * tokens_per_tile)

    def __call__(self, sample_tokens: Sequence[int], tiles: int) -> float:
        """The cost of a pack of samples of ``sample_tokens`` tokens with ``tiles`` tiles in all."""
        lengths = np.asarray(sample_tokens, dtype=np.float64)
        return float(self.per_token * lengths.sum() + self.per_token_pair * (lengths ** 2).sum()
                     + self.per_tile * tiles)


def balance(costs: Sequence[float], *, world_size: int, slots: int) -> list[list[int]]:
    """Give a step's units (packs) to ``world_size`` ranks of ``slots`` each, largest cost first, each to the
    rank with the least cost so far that has a free slot (ties: the lowest rank). Returns the unit indices
    of each rank, in the order given.

    Raises:
        ValueError: more units than ``world_size x slots``.
    """
    if len(costs) > world_size * slots:
        raise ValueError(f"{len(costs)} packs do not fit {world_size} ranks x {slots} slots")
    load = [0.0] * world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for unit in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min((r for r in range(world_size) if len(ranks[r]) < slots), key=lambda r: (load[r], r))
        ranks[rank].append(unit)
        load[rank] += costs[unit]
    return [sorted(units) for units in ranks]


@dataclass(frozen=True)
class PackingSpec:
    """How a stage packs (``config.schema.PackingConfig.build``): what a pack may hold, the window, the cost model."""

    budget: PackBudget
    window: int
    """Rows packed together (``plan_packs``)."""
    cost: PackCost


@dataclass(frozen=True)
class Packing:
    """A stage's packing over its rows: the spec and each row's tokens and tiles."""

    spec: PackingSpec
    tokens: np.ndarray = field(compare=False, repr=False)
    """Per row id: tokens, image tokens included (the shards' ``length``)."""
    tiles: np.ndarray = field(compare=False, repr=False)
    """Per row id: tiles and video frames (the shards' ``num_tiles``)."""

    def packs(self, order: np.ndarray, *, seed: Sequence[int]) -> list[np.ndarray]:
        """An epoch's packs over ``order`` (``plan_packs``)."""
        return plan_packs(order, self.tokens, self.tiles, self.spec.budget, window=self.spec.window, seed=seed)

    def cost_of(self, pack: np.ndarray) -> float:
        return self.spec.cost(self.tokens[pack], int(self.tiles[pack].sum()))
