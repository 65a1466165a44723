"""Length grouping: every row once, one modality per batch, less padding; and the padding arithmetic."""

import numpy as np
import pytest

from llava_platform.data.grouping import group_indices, padding_fraction, regroup


def test_padding_fraction_arithmetic():
    assert padding_fraction([[4, 2], [3]]) == pytest.approx(1 - 9 / 11)
    assert padding_fraction([[5, 5]]) == 0.0
    assert padding_fraction([]) == 0.0


def test_group_indices_partition_by_modality_and_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, size=103)
    modalities = np.where(rng.random(103) < 0.3, "text", "image")
    batches = group_indices(lengths, modalities, 8, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(103))
    for batch in batches:
        assert len(set(modalities[batch])) == 1 and len(batch) <= 8
        assert list(lengths[batch]) == sorted(lengths[batch])
    grouped = padding_fraction(lengths[b] for b in batches)
    plain = padding_fraction(lengths[i : i + 8] for i in range(0, 103, 8))
    assert grouped < plain / 3


def test_regroup_keeps_every_column_aligned():
    window = {
        "id": np.array([f"r{i}" for i in range(10)]),
        "length": np.array([9, 1, 8, 2, 7, 3, 6, 4, 5, 0]),
        "modality": np.array(["image"] * 10),
        "tiles": np.array([np.full((i % 3, 2), i) for i in range(10)], dtype=object),
    }
    batches = list(regroup([window], batch_size=4, seed=0))
    assert [len(b["id"]) for b in batches] and sum(len(b["id"]) for b in batches) == 10
    for batch in batches:
        for row_id, length, tiles in zip(batch["id"], batch["length"], batch["tiles"], strict=True):
            i = int(row_id[1:])
            assert length == window["length"][i] and np.array_equal(tiles, window["tiles"][i])
    plain = list(regroup([window], batch_size=4, group=False))
    assert [list(b["id"]) for b in plain] == [["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"], ["r8", "r9"]]
