"""The memory planner's model-state estimate against what two real DeepSpeed ranks allocate.

Two spawned CPU ranks (gloo, no Ray) build the stage's engine as training does and take one optimizer
step on a model whose trainable weights dominate its memory (~50M parameters, float32); each rank's
resident memory grows by its weights, gradients, optimizer states and DeepSpeed's gradient buckets,
which ``llava_platform.train.memory.estimate`` must predict within 20 % (``MemoryEstimate.engine``).
"""

from __future__ import annotations

import pytest

from jobs import compose
from jobs.perf.ranks import EngineTask, rank_memory, spawn_ranks
from llava_platform.config import load_recipe, memory_plan
from llava_platform.train import memory

RECIPE = "tiny_cpu_demo"
MODEL = ("model.tiny.text_hidden_size=768", "model.tiny.text_layers=8", "model.tiny.text_heads=12",
         "stage2.tunable=[projector,language_model]", "stage2.deepspeed.zero3_param_persistence_threshold=0")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(compose.run(load_recipe(RECIPE, list(MODEL)), tmp_path_factory.mktemp("memory") / "initial"))


@pytest.mark.chaos  # 25-45 s per ZeRO stage; tests/unit/train/test_memory.py checks the arithmetic in make test
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_the_model_state_estimate_is_what_the_ranks_allocate(checkpoint, zero_stage, record_property):
    overrides = (*MODEL, f"stage2.deepspeed.zero_stage={zero_stage}")
    ranks = spawn_ranks(rank_memory, 2, EngineTask(RECIPE, overrides, "stage2", checkpoint))
    recipe = load_recipe(RECIPE, [*overrides, "scaling.num_workers=2"])
    estimate = memory.estimate(memory_plan.stage_setup(recipe, recipe.stage2))
    assert estimate.trainable_params > 40e6  # the states dominate, so the check means something
    grown = [rank.after_step - rank.before for rank in ranks]
    record_property("grown_mb", [round(g / 2**20) for g in grown])
    record_property("estimate_mb", round(estimate.engine / 2**20))
    for rank, allocated in enumerate(grown):
        error = allocated / estimate.engine - 1
        assert abs(error) <= 0.20, (f"rank {rank}: grew {allocated / 2**20:.0f} MB, estimate "
                                    f"{estimate.engine / 2**20:.0f} MB ({error:+.0%})")
