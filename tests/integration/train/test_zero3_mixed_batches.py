"""The ZeRO-3 hang that was: one rank's micro-batch with an image, the other's text-only.

Two real ranks (gloo, no Ray) train stage 2 under ZeRO-3 with LoRA and gradient checkpointing,
every weight sharded, on schedules that mix image and text-only micro-batches across ranks
(``II,IT,TI``: step 0 records ZeRO-3's module trace with images on both ranks, later steps give one
rank text only). The text-only path used to run the tower and projector from a hook on the outer
model, before the inner modules: another module order, so the ranks' parameter gathers and gradient
reduce-scatters went out of step (LLaVA-NeXT failed at once on ``image_newline``). Each rank must
finish every step with ZeRO-3's recorded trace intact.
"""

from __future__ import annotations

import faulthandler
import math

import pytest
import torch

from jobs import compose
from jobs.perf.ranks import spawn_ranks
from llava_platform.config import load_recipe
from tests.helpers.recipes import NEXT_MODEL
from tests.helpers.rows import micro_batch, onevision_micro_batch, packed_micro_batch

RECIPE = "tiny_cpu_demo"
STAGE = ["stage2.global_batch_size=2", "stage2.micro_batch_size=1", "stage2.optim.lr=0.01",
         "stage2.deepspeed.zero_stage=3", "stage2.deepspeed.zero3_param_persistence_threshold=0",
         "stage2.tunable=[projector]", "stage2.lora={r: 4, alpha: 8, dropout: 0.0}",
         "stage2.deepspeed.gradient_checkpointing=true", "stage2.data.group_by_modality_length=false"]
HANG_AFTER_S = 120


def train_schedule(rank: int, world_size: int, overrides: list[str], model: str, schedule: str,
                   recipe_name: str = RECIPE) -> list[tuple]:
    """Rank function: one optimizer step per schedule entry (``I``: an image row on that rank, ``T``: text;
    ``P``: a packed row of two image samples, ``Q``: a packed row of two text samples; OneVision also ``M``:
    two images, ``V``: a video)."""
    from llava_platform.config.build import deepspeed_spec
    from llava_platform.train.deepspeed_engine import build_deepspeed_engine, train_step

    faulthandler.dump_traceback_later(HANG_AFTER_S, exit=True)  # a hang fails the test with every stack
    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = load_recipe(recipe_name, overrides)
    engine, processor = build_deepspeed_engine(deepspeed_spec(recipe, recipe.stage2, model, total_steps=4))
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    steps = []
    for step, kinds in enumerate(schedule.split(",")):
        kind, seed = kinds[rank], 2 * step + rank
        if recipe.model.arch == "llava_onevision":
            batch = onevision_micro_batch(processor, recipe, kind, seed)
        elif kind in "PQ":
            batch = packed_micro_batch(processor, recipe, [(kind == "P", seed, None), (kind == "P", seed + 50, None)])
        else:
            batch = micro_batch(processor, recipe, kind == "I", seed)
        result = train_step(engine, [batch])
        steps.append((kinds[rank], result.loss, coordinator.is_complete_trace()))
    faulthandler.cancel_dump_traceback_later()
    return steps


@pytest.mark.parametrize(("arch", "schedule"), [
    ("llava", "II,IT,TI"),
    ("llava", "PP,PQ,QP"),  # packed rows; a rank whose pack is text only still runs the blank image
    pytest.param("llava_next", "IT,TI", marks=pytest.mark.chaos),  # make test: the OneVision schedules below
])
def test_ranks_with_and_without_images_stay_in_step_under_zero3(arch, schedule, tmp_path):
    overrides = [*STAGE, *(NEXT_MODEL if arch == "llava_next" else [])]
    model = str(compose.run(load_recipe(RECIPE, overrides), tmp_path / "initial"))
    ranks = spawn_ranks(train_schedule, 2, overrides, model, schedule, timeout_s=HANG_AFTER_S + 120)
    for rank, steps in enumerate(ranks):
        assert [kind for kind, _, _ in steps] == [kinds[rank] for kinds in schedule.split(",")]
        assert all(math.isfinite(loss) for _, loss, _ in steps)
        assert all(complete for _, _, complete in steps[1:]), f"rank {rank}: ZeRO-3's module trace was dropped"


def test_onevision_ranks_with_images_videos_and_text_stay_in_step_under_zero3(tmp_path):
    """OneVision under ZeRO-3 (as the 7B recipe trains): one image, two images, a video or text on either
    rank, in every pairing. Before ``onevision_inputs_embeds`` a video step against an image or text step
    broke the ranks' collectives (transformers' embedding-comparison placeholder masks call the token
    embedding once more on the paths that run)."""
    recipe, schedule = "tiny_onevision_cpu", "II,VI,MT,TV"
    overrides = [*STAGE, "stage2.data.preprocessed=null"]
    model = str(compose.run(load_recipe(recipe, overrides), tmp_path / "initial"))
    ranks = spawn_ranks(train_schedule, 2, overrides, model, schedule, recipe, timeout_s=HANG_AFTER_S + 120)
    for rank, steps in enumerate(ranks):
        assert [kind for kind, _, _ in steps] == [kinds[rank] for kinds in schedule.split(",")]
        assert all(math.isfinite(loss) for _, loss, _ in steps)
        assert all(complete for _, _, complete in steps[1:]), f"rank {rank}: ZeRO-3's module trace was dropped"
