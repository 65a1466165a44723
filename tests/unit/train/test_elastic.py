"""What a smaller elastic group trains with: accumulation for its size, and which ranks' data each worker reads."""

from __future__ import annotations

import pytest

from jobs.train import deepspeed_spec
from jobs.train_worker import interleave
from llava_platform.config import load_recipe
from llava_platform.train.plan import LoopSpec


@pytest.fixture(scope="module")
def spec():
    """The 72B recipe's stage 2 (global batch 128 = 1 x 2 x 64 workers)."""
    recipe = load_recipe("llava_next_72b")
    return deepspeed_spec(recipe, recipe.stage2, "Qwen/x", total_steps=10)


def test_the_global_batch_holds_where_it_divides(spec):
    assert spec.deepspeed_config["train_batch_size"] == 128 and spec.gradient_accumulation_steps == 2
    for world, accumulation in [(64, 2), (32, 4), (16, 8), (128, 1)]:
        smaller = spec.at_world_size(world)
        assert smaller.gradient_accumulation_steps == accumulation
        assert smaller.deepspeed_config["gradient_accumulation_steps"] == accumulation
        assert smaller.deepspeed_config["train_batch_size"] == 128


def test_otherwise_accumulation_is_rounded_and_the_batch_is_what_that_gives(spec):
    # 56 workers (a 64-GPU run that lost a node of 8): 128 / 56 = 2.29 -> 2, global batch 112
    assert spec.at_world_size(56).deepspeed_config["train_batch_size"] == 112
    assert spec.at_world_size(40).gradient_accumulation_steps == 3  # 3.2 -> 3, batch 120
    assert spec.at_world_size(200).gradient_accumulation_steps == 1  # never below one micro-batch
    assert spec.at_world_size(56).deepspeed_config["train_micro_batch_size_per_gpu"] == 1


def test_a_smaller_group_reads_every_share_once():
    loop = LoopSpec(epochs=1, micro_batch_size=1, group_window=32, group_by_modality_length=True, seed=0,
                    anyres=False, checkpoint_every=10, shares=8)
    assert loop.shares_of(3, 8) == ["rank3"]
    assert [loop.shares_of(rank, 3) for rank in range(3)] == [["rank0", "rank3", "rank6"], ["rank1", "rank4", "rank7"],
                                                            ["rank2", "rank5"]]
    read = sorted(name for rank in range(5) for name in loop.shares_of(rank, 5))
    assert read == sorted(f"rank{i}" for i in range(8))


def test_shares_are_read_side_by_side_until_all_are_done():
    assert list(interleave([iter("abc"), iter("12"), iter("")])) == ["a", "1", "b", "2", "c"]
    assert list(interleave([])) == []
