"""The global data order (``llava_platform.data.position``): every row once per epoch and the same global batches
at any worker count, across resizes (pure Python ranks, no Ray, seconds).

The resize test trains a float64 linear model in canonical order: every slot's weighted micro-batch gradient
(weight x gradient, as ``train_step`` weights the loss), gathered in rank order, summed in that order and
divided by the slot count (DeepSpeed's accumulation and data-parallel average); a checkpoint keeps the weights
and the ``DataPosition``. Gathered in rank order is the canonical order only if every rank's part is its
contiguous piece of the same global batch, so bitwise-equal weights prove the rows and their order.
Run A trains two epochs on 4 workers; run B is killed after a checkpoint, resumes on 3, is
killed again and resumes on 2. ``old_share_scheme`` replays what ``jobs.train_worker`` did before (a smaller
group's rank ``r`` read the full group's shares ``r, r + world, ...`` side by side, the epoch ending when a
rank ran out, the resume skipping ``steps x accumulation`` of its own micro-batches): the same checks find
its lost and repeated rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import zip_longest

import numpy as np
import pytest

from llava_platform.data.position import (
    DataPosition,
    GlobalBatches,
    RowOrder,
    exact_world_sizes,
    micro_steps,
)

GLOBAL_BATCH, EPOCHS, CHECKPOINT_EVERY, LR = 12, 2, 5, 0.05


def batches_of(rows: int, micro: int = 1, window_blocks: int = 4, **grouping) -> GlobalBatches:
    """``rows`` rows stored in row groups of 16 (the last shorter), seed 7."""
    sizes = tuple([16] * (rows // 16) + ([rows % 16] if rows % 16 else []))
    return GlobalBatches(RowOrder(sizes, seed=7, window_blocks=window_blocks), global_batch=GLOBAL_BATCH,
                         micro_batch=micro, **grouping)


def test_an_epoch_order_is_every_id_once_and_changes_with_the_epoch_and_seed():
    order = RowOrder((16,) * 15, seed=7, window_blocks=4)
    first, second = order.epoch(0), order.epoch(1)
    assert sorted(first) == list(range(240)) and sorted(second) == list(range(240))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, RowOrder((16,) * 15, seed=8, window_blocks=4).epoch(0))
    assert np.array_equal(first, RowOrder((16,) * 15, seed=7, window_blocks=4).epoch(0)), "not seeded"
    # block shuffle: any 64 consecutive rows come from at most two windows of 4 row groups (8 groups of 16)
    assert all(len(set(first[i:i + 64] // 16)) <= 8 for i in range(0, 240, 64))


@pytest.mark.parametrize("rows", [240, 245])
def test_rank_parts_are_contiguous_disjoint_and_cover_the_global_batch_at_every_worker_count(rows):
    batches = batches_of(rows)
    for index in range(batches.steps_in(0)):
        step = batches.step(0, index)
        canonical = [int(i) for batch in step.micro_batches for row in batch for i in row]
        for world in (4, 3, 2, 1):
            accumulation = micro_steps(GLOBAL_BATCH, 1, world)
            shares = [step.share(rank, world, accumulation) for rank in range(world)]
            assert [i for share in shares for i in share.trained] == canonical, (index, world)
            assert sum(w for share in shares for w in share.weights) == pytest.approx(accumulation * world)
    assert batches.steps_in(0) == batches.steps_in(1) == -(-rows // GLOBAL_BATCH)
    assert batches.step(0, batches.steps_in(0) - 1).units == (rows % GLOBAL_BATCH or GLOBAL_BATCH)


def test_padding_slots_carry_a_filler_with_weight_zero():
    step = batches_of(240, micro=2).step(0, 0)  # 6 micro-batches of 2
    shares = [step.share(rank, 4, micro_steps(GLOBAL_BATCH, 2, 4)) for rank in range(4)]  # 4 x 2 = 8 slots
    assert [share.weights for share in shares] == [(8 / 6, 8 / 6)] * 3 + [(0.0, 0.0)]
    assert shares[3].trained == [] and shares[3].micro_batches[0] == step.micro_batches[0]
    with pytest.raises(ValueError, match="cannot hold"):
        step.share(0, 2, 2)


def test_grouping_sorts_a_global_batch_by_modality_and_length_into_whole_micro_batches():
    lengths = np.arange(240)[::-1] % 50
    modalities = np.array(["image", "text"] * 120, dtype=object)
    batches = batches_of(240, micro=3, lengths=lengths, modalities=modalities)
    step = batches.step(1, 2)
    batches_ids = [np.concatenate(batch) for batch in step.micro_batches]
    assert sorted(i for ids in batches_ids for i in ids) == sorted(batches.order.epoch(1)[24:36])
    for ids in batches_ids:  # each micro-batch is a run of the (modality, length) order
        assert len(ids) == 3 and list(lengths[ids]) == sorted(lengths[ids]) or len(set(modalities[ids])) == 2


def test_the_worker_counts_a_batch_splits_exactly_on():
    assert exact_world_sizes(12, 1, range(1, 7)) == [1, 2, 3, 4, 6]
    assert micro_steps(12, 1, 5) == 3 and micro_steps(12, 2, 4) == 2 and micro_steps(4, 4, 8) == 1


def test_a_data_position_round_trips_and_names_what_changed():
    position = DataPosition("abc", 7, "block-shuffle-v1/window4", 12, 1, epoch=1, consumed=36)
    assert DataPosition.from_dict(position.as_dict()) == position and position.steps_in_epoch == 3
    assert position.after_step(5).steps_in_epoch == 4  # an epoch's shorter last step counts as one
    assert position.differences(DataPosition("abd", 7, "block-shuffle-v1/window4", 24, 1)) == [
        "fingerprint 'abc' -> 'abd'", "global_batch 12 -> 24"]


# --- the resize test -------------------------------------------------------------------------------------------

@dataclass
class Run:
    """A training run's state: weights, position, and per step the row ids each rank trained (the ledger)."""

    weights: np.ndarray
    position: DataPosition
    step: int = 0
    ledger: dict[int, tuple[int, list[list[int]]]] = field(default_factory=dict)
    batches: dict[int, list[int]] = field(default_factory=dict)
    """Per step, the global batch in gathered (rank) order."""

    def checkpoint(self) -> Run:
        return Run(self.weights.copy(), self.position, self.step, dict(self.ledger), dict(self.batches))


def dataset(rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(rows, 5))
    return features, features @ np.array([1.0, -2.0, 0.5, 3.0, -1.0]) + rng.normal(scale=0.1, size=rows)


def train(run: Run, batches: GlobalBatches, data, world: int, stop_at: int | None) -> tuple[Run, Run]:
    """Train from ``run`` on ``world`` workers until the end of the epochs or step ``stop_at`` (a kill);
    return the final state and the latest checkpoint (every ``CHECKPOINT_EVERY`` steps)."""
    features, targets = data
    accumulation = micro_steps(GLOBAL_BATCH, batches.micro_batch, world)
    saved = run.checkpoint()
    while run.position.epoch < EPOCHS:
        for index in range(run.position.steps_in_epoch, batches.steps_in(run.position.epoch)):
            step = batches.step(run.position.epoch, index)
            shares = [step.share(rank, world, accumulation) for rank in range(world)]
            slots = []  # every rank's weighted micro-batch gradients, gathered in rank order: the canonical order
            for share in shares:
                for batch, weight in zip(share.micro_batches, share.weights, strict=True):
                    ids = np.concatenate(batch)
                    error = features[ids] @ run.weights - targets[ids]
                    slots.append(weight * (2 * features[ids].T @ error / len(ids)))
            gradient = np.zeros_like(run.weights)
            for part in slots:  # summed in that order (a real all-reduce sums per rank first: equal up to rounding)
                gradient = gradient + part
            run.weights = run.weights - LR * gradient / (accumulation * world)
            run.step += 1
            run.position = run.position.after_step(step.units)
            run.ledger[run.step] = (run.position.epoch, [share.trained for share in shares])
            run.batches[run.step] = [i for share in shares for i in share.trained]
            if run.step % CHECKPOINT_EVERY == 0:
                saved = run.checkpoint()
            if run.step == stop_at:
                return run, saved
        run.position = run.position.next_epoch()
    return run, saved


def fresh(batches: GlobalBatches) -> Run:
    return Run(np.zeros(5), DataPosition("shards", 7, "block-shuffle-v1/window4", GLOBAL_BATCH, batches.micro_batch))


def rows_per_epoch(ledger: dict[int, tuple[int, list[list[int]]]]) -> dict[int, Counter]:
    epochs: dict[int, Counter] = {}
    for epoch, ranks in ledger.values():
        epochs.setdefault(epoch, Counter()).update(i for rank in ranks for i in rank)
    return epochs


def assert_each_row_once_per_epoch(ledger: dict, rows: int) -> None:
    epochs = rows_per_epoch(ledger)
    assert sorted(epochs) == list(range(EPOCHS))
    for epoch, trained in epochs.items():
        twice = sorted(i for i, n in trained.items() if n > 1)
        never = sorted(set(range(rows)) - set(trained))
        assert not twice and not never, f"epoch {epoch}: {len(twice)} rows twice, {len(never)} never"


@pytest.mark.parametrize("rows", [240, 245], ids=["whole", "tail"])
def test_a_run_resized_4_to_3_to_2_trains_every_row_once_in_the_same_batches_to_the_same_weights(rows):
    batches, data = batches_of(rows), dataset(rows)
    reference, _ = train(fresh(batches), batches, data, world=4, stop_at=None)
    assert_each_row_once_per_epoch(reference.ledger, rows)

    _, saved = train(fresh(batches), batches, data, world=4, stop_at=13)  # killed after step 13: back to 10
    assert saved.step == 10
    _, saved = train(saved, batches, data, world=3, stop_at=27)  # resumed on 3, killed: back to 25
    assert saved.step == 25 and saved.position.epoch == 1
    resized, _ = train(saved, batches, data, world=2, stop_at=None)  # resumed on 2, to the end

    assert resized.step == reference.step == EPOCHS * batches.steps_in(0)
    assert_each_row_once_per_epoch(resized.ledger, rows)
    assert resized.batches == reference.batches, "a global batch differs from the 4-worker run's"
    assert np.array_equal(resized.weights, reference.weights), "the weights are not bitwise those of the 4-worker run"


def old_share_scheme(rows: int, plan: list[tuple[int, int | None]], micro: int = 1, window: int = 32) -> dict:
    """What the training loop did before the global order: 4 shares (the records split in 4 equal parts), a
    group of ``world`` reading shares ``r, r + world, ...`` side by side per window, the epoch ending when any rank
    runs out, a resume skipping ``steps_in_epoch x accumulation`` micro-batches of each rank's stream. ``plan``:
    ``(world, killed after step or None)`` per attempt, resuming from the latest checkpoint. Returns the ledger."""
    order = np.random.default_rng(7).permutation(rows)
    shares = np.array_split(order[: rows - rows % 4], 4)
    ledger, saved = {}, (0, 0, 0)  # checkpointed (step, epoch, steps in epoch)
    for world, stop_at in plan:
        step, epoch, in_epoch = saved
        ledger = {s: line for s, line in ledger.items() if s <= step}
        accumulation = GLOBAL_BATCH // (micro * world)
        while epoch < EPOCHS:
            streams = []
            for rank in range(world):
                per_share = [[shares[s][i:i + window] for i in range(0, len(shares[s]), window)]
                             for s in range(rank, 4, world)]
                side_by_side = [w for windows in zip_longest(*per_share) for w in windows if w is not None]
                micro_batches = [w[i:i + micro] for w in side_by_side for i in range(0, len(w), micro)]
                streams.append(micro_batches[in_epoch * accumulation:])
            steps = min(len(s) for s in streams) // accumulation
            stopped = False
            for k in range(steps):
                step += 1
                in_epoch += 1
                ledger[step] = (epoch, [[int(i) for mb in s[k * accumulation:(k + 1) * accumulation] for i in mb]
                                        for s in streams])
                if step % CHECKPOINT_EVERY == 0:
                    saved = (step, epoch, in_epoch)
                if step == stop_at:
                    stopped = True
                    break
            if stopped:
                break
            epoch, in_epoch = epoch + 1, 0
    return ledger


def test_the_old_share_scheme_loses_and_repeats_rows_on_a_resize():
    """The regression the global order fixes: the same checks fail on the old scheme (4 -> 3 -> 2)."""
    assert_each_row_once_per_epoch(old_share_scheme(240, [(4, None)]), 240)  # unresized, it was exact
    with pytest.raises(AssertionError, match="rows twice|never"):
        assert_each_row_once_per_epoch(old_share_scheme(240, [(4, 13), (3, 27), (2, None)]), 240)
