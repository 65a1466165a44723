"""What an elastic run trains with at each worker count: accumulation for its size, padding only where the recipe
allows it, and a recipe check that says which worker counts split the global batch exactly."""

from __future__ import annotations

import pytest
import yaml

from llava_platform.config import RecipeError, load_recipe
from llava_platform.config.build import deepspeed_spec

ELASTIC_72B = ["scaling.min_workers=48", "stage2.data.preprocessed=/mnt/shards/stage2",
               "stage1.data.preprocessed=/mnt/shards/stage1"]


@pytest.fixture(scope="module")
def spec():
    """The 72B recipe's stage 2 (global batch 128 = 1 x 2 x 64 workers)."""
    recipe = load_recipe("llava_next_72b")
    return deepspeed_spec(recipe, recipe.stage2, "Qwen/x", total_steps=10)


def test_the_global_batch_holds_where_it_divides(spec):
    assert spec.deepspeed_config["train_batch_size"] == 128 and spec.gradient_accumulation_steps == 2
    for world, accumulation in [(64, 2), (32, 4), (16, 8), (128, 1)]:
        smaller = spec.at_world_size(world, 128)
        assert smaller.gradient_accumulation_steps == accumulation
        assert smaller.deepspeed_config["gradient_accumulation_steps"] == accumulation
        assert smaller.deepspeed_config["train_batch_size"] == 128


def test_otherwise_the_slots_cover_the_batch_and_the_rest_is_padding(spec):
    # 56 workers (a 64-GPU run that lost a node of 8): 128 micro-batches in 56 x 3 = 168 slots, 40 of them padding
    assert spec.at_world_size(56, 128).gradient_accumulation_steps == 3
    assert spec.at_world_size(56, 128).deepspeed_config["train_batch_size"] == 168  # DeepSpeed counts slots
    assert spec.at_world_size(40, 128).gradient_accumulation_steps == 4  # 3.2 -> 4, never fewer slots than rows
    assert spec.at_world_size(200, 128).gradient_accumulation_steps == 1  # never below one micro-batch
    assert spec.at_world_size(56, 128).deepspeed_config["train_micro_batch_size_per_gpu"] == 1


def test_an_elastic_range_whose_counts_do_not_split_the_batch_is_refused_unless_padding_is_allowed():
    with pytest.raises(RecipeError) as err:
        load_recipe("llava_next_72b", ELASTIC_72B)
    text = str(err.value)
    assert ("stage2.global_batch_size: 128 rows in micro-batches of 1 do not split evenly among 48, 49, 50" in text
            and "(exact on 64 of 48, 49" in text and "use a multiple of" in text
            and "stage2.pad_micro_batches: true" in text), text
    padded = load_recipe("llava_next_72b", [*ELASTIC_72B, "stage1.pad_micro_batches=true",
                                            "stage2.pad_micro_batches=true"])
    assert padded.scaling.world_sizes() == range(48, 65)
    exact = load_recipe("llava_next_72b", [*ELASTIC_72B, "scaling.min_workers=32", "scaling.num_workers=32"])
    assert exact.stage2.gradient_accumulation_steps(32) == 4


def test_elastic_training_needs_rows_by_id_and_materialize_is_for_streamed_stages():
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny_cpu_demo", ["scaling.min_workers=1", "stage1.data.preprocessed=null",
                                      "stage2.data.materialize=true"])
    text = str(err.value)
    assert "stage1.data.preprocessed: elastic training (scaling.min_workers) reads rows by id" in text
    assert "stage2.data.materialize: preprocessed stages read their rows by id" in text
    assert "stage2.data.preprocessed" not in text


def test_the_dry_run_prints_the_worker_counts_a_batch_splits_on(capsys):
    from jobs import compose

    with pytest.raises(SystemExit):
        compose.main(["--recipe", "tiny_cpu_demo", "--dry-run", "scaling.min_workers=1", "scaling.num_workers=3",
                      "stage1.pad_micro_batches=true", "stage2.pad_micro_batches=true"])
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["scaling"]["min_workers"] == 1  # still a YAML document (the plan is comments)
    assert "# stage2: global batch 32 rows = 2 micro-batches of 16" in out
    assert "# stage2:   1 workers: 2 micro-steps each, exact" in out
    assert "# stage2:   3 workers: 1 micro-steps each, 1 of 3 slots zero-weight padding" in out
    assert "# stage2: rows by id from outputs/tiny-cpu-demo/shards/stage2: every row once per epoch" in out
