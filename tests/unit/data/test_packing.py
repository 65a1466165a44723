"""Pack planning (``llava_platform.data.packing``): every row once, within the budgets, seeded, and a step's packs
balanced over ranks by cost."""

from __future__ import annotations

import numpy as np
import pytest

from llava_platform.data.packing import PackBudget, PackCost, Packing, PackingError, PackingSpec, balance, plan_packs
from llava_platform.data.position import GlobalBatches, RowOrder, micro_steps


def lengths_like_llava_665k(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token and tile counts: 10 % text-only (50-400 tokens), 60 % one 576-token image + 30-300 text tokens,
    30 % anyres images of 1 + 2..4 tiles (up to 2928 image tokens) + 30-300 text tokens."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=rows, p=[0.1, 0.6, 0.3])
    text = rng.integers(30, 300, size=rows)
    grid = rng.integers(2, 5, size=rows)
    tokens = np.where(kind == 0, rng.integers(50, 400, size=rows), np.where(kind == 1, 576 + text,
                                                                            (1 + grid) * 576 + text))
    tiles = np.where(kind == 0, 0, np.where(kind == 1, 1, 1 + grid))
    return tokens.astype(np.int64), tiles.astype(np.int64)


def test_every_row_is_in_exactly_one_pack_within_the_budgets():
    tokens, tiles = lengths_like_llava_665k(3000)
    budget = PackBudget(max_tokens=4096, max_tiles=8)
    order = np.random.default_rng(1).permutation(3000)
    packs = plan_packs(order, tokens, tiles, budget, window=512, seed=[0, 0])
    assert sorted(np.concatenate(packs)) == list(range(3000))
    assert all(tokens[p].sum() <= 4096 and tiles[p].sum() <= 8 for p in packs)
    fill = tokens.sum() / (len(packs) * 4096)
    assert fill > 0.9, f"best-fit decreasing filled only {fill:.1%} of the packs"
    again = plan_packs(order, tokens, tiles, budget, window=512, seed=[0, 0])
    assert all(np.array_equal(a, b) for a, b in zip(packs, again, strict=True)), "not reproducible"
    other = plan_packs(order, tokens, tiles, budget, window=512, seed=[0, 1])
    assert [list(p) for p in other] != [list(p) for p in packs] and sorted(map(len, other)) == sorted(map(len, packs))


def test_a_row_no_pack_can_hold_is_an_error_naming_it():
    tokens, tiles = np.array([100, 5000, 20]), np.array([1, 1, 9])
    with pytest.raises(PackingError, match="row 1 has 5000 tokens, more than data.packing.max_tokens 4096"):
        plan_packs(np.arange(3), tokens, tiles, PackBudget(4096), window=8, seed=[0])
    with pytest.raises(PackingError, match="row 2 has 9 tiles, more than data.packing.max_tiles 8"):
        plan_packs(np.arange(3), np.array([1, 2, 3]), tiles, PackBudget(4096, 8), window=8, seed=[0])


def test_balance_gives_the_largest_first_to_the_least_loaded_rank():
    costs = [10.0, 1.0, 1.0, 1.0, 9.0, 2.0, 2.0, 2.0]
    ranks = balance(costs, world_size=2, slots=4)
    assert sorted(i for r in ranks for i in r) == list(range(8)) and all(len(r) <= 4 for r in ranks)
    loads = [sum(costs[i] for i in r) for r in ranks]
    assert max(loads) / (sum(loads) / 2) < 1.05  # contiguous halves would give 13 and 15
    assert ranks == balance(costs, world_size=2, slots=4), "not deterministic"
    with pytest.raises(ValueError, match="do not fit"):
        balance(costs, world_size=2, slots=3)


def test_the_cost_counts_tokens_attention_and_tiles():
    cost = PackCost.of(lm_params=1e9, lm_layers=32, lm_hidden=4096, tower_params=3e8, tokens_per_tile=577,
                       tower_trains=False)
    one_long, two_short = cost([4000], 0), cost([2000, 2000], 0)
    assert one_long > two_short  # attention is quadratic in each sample's length only
    assert cost([1000], 5) - cost([1000], 0) == pytest.approx(5 * 2 * 3e8 * 577)


def test_packed_global_batches_take_every_row_once_per_epoch_at_any_worker_count():
    tokens, tiles = lengths_like_llava_665k(600, seed=3)
    spec = PackingSpec(PackBudget(4096, 8), window=200, cost=PackCost(1.0, 1e-3, 500.0))
    batches = GlobalBatches(RowOrder((16,) * 37 + (8,), seed=5, window_blocks=4), global_batch=8, micro_batch=1,
                            packing=Packing(spec, tokens=tokens, tiles=tiles))
    for epoch in (0, 1):
        for world in (4, 2):
            trained = []
            for index in range(batches.steps_in(epoch)):
                step = batches.step(epoch, index)
                shares = [step.share(r, world, micro_steps(8, 1, world)) for r in range(world)]
                trained += [i for share in shares for i in share.trained]
            assert sorted(trained) == list(range(600)), (epoch, world)
    assert batches.steps_in(0) == -(-len(batches.units(0)) // 8)
