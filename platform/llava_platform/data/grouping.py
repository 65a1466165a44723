"""Group samples of one modality and similar length into batches, so padding waste falls.

LLaVA's ``group_by_modality_length`` sorts whole mega-batches of a shuffled index; a streamed
dataset has no global index, so this works on a window of rows as they arrive: split the window
by modality, sort each part by length, cut it into batches, and shuffle the order of the batches.
Every row of the window ends up in exactly one batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def group_indices(
    lengths: Sequence[int], modalities: Sequence[str], batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Batches of row indices: same modality, similar length, in shuffled order.

    Args:
        lengths: token count of each row.
        modalities: ``image`` or ``text`` for each row.
        batch_size: rows per batch (the last batch of each modality may be smaller).
        rng: for the batch order.
    """
    lengths, modalities = np.asarray(lengths), np.asarray(modalities)
    batches = []
    for modality in np.unique(modalities):
        members = np.flatnonzero(modalities == modality)
        ordered = members[np.argsort(lengths[members], kind="stable")]
        batches += [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sequential_indices(count: int, batch_size: int) -> list[np.ndarray]:
    """Batches in arrival order (no grouping)."""
    return [np.arange(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]


def regroup(
    windows: Iterable[dict[str, np.ndarray]], batch_size: int, *, group: bool = True, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Re-cut windows of rows (dicts of column arrays) into batches, grouped by modality and length.

    Args:
        windows: column batches of many rows each (e.g. ``iter_batches(batch_size=64 * batch_size)``),
            with ``length`` and ``modality`` columns.
        batch_size: rows per output batch.
        group: ``False`` keeps arrival order (the baseline).
        seed: batch order inside each window.
    """
    rng = np.random.default_rng(seed)
    for window in windows:
        count = len(window["length"])
        cuts = group_indices(window["length"], window["modality"], batch_size, rng) if group else (
            sequential_indices(count, batch_size))
        for indices in cuts:
            yield {name: _take(column, indices) for name, column in window.items()}


def _take(column, indices: np.ndarray):
    if isinstance(column, np.ndarray) and column.dtype != object:
        return column[indices]
    return [column[i] for i in indices]


def padding_fraction(lengths_per_batch: Iterable[Sequence[int]]) -> float:
    """Share of token slots that are padding when each batch pads to its longest row."""
    padded = real = 0
    for lengths in lengths_per_batch:
        padded += max(lengths) * len(lengths)
        real += sum(lengths)
    return 1.0 - real / padded if padded else 0.0
