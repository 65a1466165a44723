"""Resume on another number of workers: 2 -> 1 and 1 -> 2, under ZeRO-2 and ZeRO-3.

Real DeepSpeed ranks (gloo, no Ray) train stage 2 on fixed global batches of 4 rows (each rank takes
its share, gradient accumulation the rest). One run on 1 worker trains 4 steps and saves after step 2;
another on 2 workers trains 2 steps and saves. Each checkpoint is then resumed on the other worker count
(``load_training_state`` converts it to DeepSpeed's universal format): the step count, the optimizer
state and the global batch carry over, so steps 3 and 4 give the uninterrupted run's losses: under
ZeRO-2 equal up to the order of floating-point sums (1e-4 relative); under ZeRO-3 step 3 (the weights)
as closely, and step 4 within 2 % (DeepSpeed's ZeRO-3 universal loader restores the Adam state not
exactly as a same-count resume does: 0.8 % off here; not root-caused). A fresh Adam (weights restored,
optimizer state not) is 6.3 % off at step 4, so the 2 % bound still tells restored state from lost.
"""

from __future__ import annotations

import pytest
import torch

from jobs import compose
from jobs.perf.ranks import spawn_ranks
from llava_platform.config import load_recipe
from tests.helpers.rows import micro_batch

RECIPE = "tiny_cpu_demo"
GLOBAL_BATCH = 4
STAGE = [f"stage2.global_batch_size={GLOBAL_BATCH}", "stage2.micro_batch_size=1", "stage2.optim.lr=0.01",
         "stage2.optim.warmup_ratio=0.0", "stage2.tunable=[projector,language_model]",
         "stage2.deepspeed.zero3_param_persistence_threshold=0"]


def train(rank: int, world: int, overrides: list[str], model: str, steps: range, save: str | None,
          resume: str | None) -> dict:
    """Rank function: optimizer steps ``steps`` (1-based) on fixed global batches; save after the last one
    (``save``), or first resume from ``resume``. Returns the global loss per step and the engine's step."""
    import torch.distributed as dist

    from jobs.train import deepspeed_spec
    from llava_platform.train.deepspeed_engine import (
        build_deepspeed_engine,
        load_training_state,
        save_training_state,
        saved_world_size,
        train_step,
    )
    from llava_platform.train.plan import TrainingPosition

    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = load_recipe(RECIPE, overrides)
    spec = deepspeed_spec(recipe, recipe.stage2, model, total_steps=4).at_world_size(world)
    universal = bool(resume) and saved_world_size(resume) != world
    engine, processor = build_deepspeed_engine(spec, universal_checkpoint=universal)
    position = TrainingPosition("stage2")
    if resume:
        position = load_training_state(engine, resume)
    resumed_at = engine.global_steps
    losses = {}
    for step in steps:
        rows = range((step - 1) * GLOBAL_BATCH, step * GLOBAL_BATCH)
        mine = [micro_batch(processor, recipe, seed % 2 == 0, seed) for seed in rows[rank::world]]
        loss = torch.tensor(train_step(engine, mine).loss)
        dist.all_reduce(loss)
        losses[step] = loss.item() / world
        position = position.after_step(0)
        if save and step == 2:
            save_training_state(engine, save, position)
    return {"losses": losses, "resumed_at": resumed_at, "position": position.step,
            "accumulation": spec.gradient_accumulation_steps}


# Both run in `make chaos` (47-58 s each): make test keeps the resume on another worker count through Ray Train,
# from the end-to-end job's checkpoint (test_train_job.py::test_resume_on_one_worker_from_a_two_worker_checkpoint)
@pytest.mark.chaos
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_checkpoint_resumes_on_another_worker_count(zero_stage, tmp_path):
    overrides = [*STAGE, f"stage2.deepspeed.zero_stage={zero_stage}"]
    model = str(compose.run(load_recipe(RECIPE, overrides), tmp_path / "initial"))
    one, two = str(tmp_path / "by-one"), str(tmp_path / "by-two")
    reference = spawn_ranks(train, 1, overrides, model, range(1, 5), one, None)[0]
    first_two = spawn_ranks(train, 2, overrides, model, range(1, 3), two, None)[0]
    assert (reference["accumulation"], first_two["accumulation"]) == (4, 2), "the global batch holds"
    assert first_two["losses"] == pytest.approx({s: reference["losses"][s] for s in (1, 2)}, rel=1e-4)

    two_to_one = spawn_ranks(train, 1, overrides, model, range(3, 5), None, two)[0]
    one_to_two = spawn_ranks(train, 2, overrides, model, range(3, 5), None, one)[0]
    after_update = 1e-4 if zero_stage == 2 else 2e-2
    for resumed in (two_to_one, one_to_two):
        assert resumed["resumed_at"] == 2 and resumed["position"] == 4
        assert resumed["losses"][3] == pytest.approx(reference["losses"][3], rel=1e-4)  # the weights
        # the optimizer's state came along (a fresh Adam's first update is 6 % off: see the docstring)
        assert resumed["losses"][4] == pytest.approx(reference["losses"][4], rel=after_update)
