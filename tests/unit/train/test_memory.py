"""The memory planner: DeepSpeed's own estimators where they apply, the parts they leave out, the verdict,
the cheapest fix, and what `--dry-run` prints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from llava_platform.config import load_recipe, memory_plan
from llava_platform.train import memory
from tests.helpers import REPO_ROOT

LM = memory.KNOWN_SHAPES["lmsys/vicuna-7b-v1.5"]
TOWER = memory.KNOWN_SHAPES["openai/clip-vit-large-patch14-336"]


def setup(**changes) -> memory.StageSetup:
    base = dict(lm=LM, tower=TOWER, projector_params=1024 * 4096 + 4096 * 4096,
                tunable=("projector", "language_model", "vision_tower"), lora_rank=None, lora_targets=(),
                zero_stage=2, offload_optimizer=False, precision="bf16", world_size=8, micro_batch_size=4,
                max_length=2048, tiles_per_sample=1, gradient_checkpointing=True, image_tokens=576)
    return memory.StageSetup(**{**base, **changes})


@pytest.mark.parametrize(("name", "billions"), [("lmsys/vicuna-7b-v1.5", 6.74), ("lmsys/vicuna-13b-v1.5", 13.02),
                                                ("mistralai/Mistral-7B-Instruct-v0.2", 7.24),
                                                ("meta-llama/Meta-Llama-3-8B-Instruct", 8.03),
                                                ("NousResearch/Nous-Hermes-2-Yi-34B", 34.39),
                                                ("Qwen/Qwen1.5-72B-Chat", 72.3), ("Qwen/Qwen1.5-110B-Chat", 111.2),
                                                ("openai/clip-vit-large-patch14-336", 0.302)])
def test_known_shapes_give_the_published_parameter_counts(name, billions):
    assert memory.KNOWN_SHAPES[name].params / 1e9 == pytest.approx(billions, rel=0.01)


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_all_trainable_model_states_are_deepspeeds_own_estimates(gpus):
    params = LM.params + TOWER.params + 1024 * 4096 + 4096 * 4096
    zero2 = memory.estimate(setup(world_size=gpus))
    assert zero2.model_states == pytest.approx(
        estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=False)[1], rel=1e-6)
    zero3 = memory.estimate(setup(world_size=gpus, zero_stage=3))
    assert zero3.model_states == pytest.approx(estimate_zero3_model_states_mem_needs(
        params, LM.largest_layer_params, num_gpus_per_node=gpus, cpu_offload=False)[1], rel=1e-6)
    offloaded = memory.estimate(setup(world_size=gpus, offload_optimizer=True))
    assert offloaded.model_states == estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus)[1]


def test_frozen_parts_cost_only_their_weights_and_lora_its_adapters():
    full = memory.estimate(setup(tunable=("projector",)))
    assert full.trainable_params == 1024 * 4096 + 4096 * 4096
    assert full.weights == 2 * full.total_params and full.optimizer == 16 * full.trainable_params // 8
    lora = memory.estimate(setup(tunable=("projector", "language_model"), lora_rank=128,
                                 lora_targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    assert lora.trainable_params - full.trainable_params == 32 * 4 * 128 * (4096 + 4096)  # 32 layers x 4 matrices
    assert lora.total_params == full.total_params + lora.trainable_params - full.trainable_params


def test_gradient_checkpointing_keeps_one_input_per_block():
    without = memory.activation_bytes(setup(gradient_checkpointing=False))
    with_ = memory.activation_bytes(setup())
    assert with_ < without / 5
    longer = memory.activation_bytes(setup(max_length=4096))
    assert longer == pytest.approx(2 * with_, rel=0.05)  # linear in tokens: no attention scores kept


def test_a_stage_that_does_not_fit_gets_the_cheapest_change_that_does():
    plan = memory.plan("stage2", setup(gradient_checkpointing=False, micro_batch_size=16), gpu_memory_gb=80)
    assert plan.fits is False and plan.fix[0] == "deepspeed.gradient_checkpointing=true"
    assert plan.fix[1].total <= 80 * memory.GB * memory.USABLE_FRACTION
    fine = memory.plan("stage2", setup(), gpu_memory_gb=80)
    assert fine.fits and fine.fix is None and "fits in 80 GB" in fine.table()
    hopeless = memory.plan("stage2", setup(world_size=1), gpu_memory_gb=8)
    assert hopeless.fits is False and "none of" in hopeless.table()


NEXT_LENGTHS = memory.SampleLengths(max_tokens=8192, p99_tokens=3400, max_tiles=5, p99_tiles=5, rows=779_000)
"""LLaVA-NeXT-like data: up to 2,928 image tokens (5 tiles) beside the conversation, the longest
(multi-turn) conversations at 8K tokens."""


def test_the_72b_card_fits_at_the_lengths_its_data_has():
    """The model card trained stage 2 with exactly these settings on 80 GB GPUs: at the data's lengths it fits;
    every sample as long as model_max_length (32,768) allows does not, and a shorter cap is the fix."""
    recipe = load_recipe("llava_next_72b")
    stage1, stage2 = (memory.plan(name, memory_plan.stage_setup(recipe, stage, NEXT_LENGTHS), 80)
                      for name, stage in recipe.stages().items())
    assert stage1.fits and stage2.fits, stage2.table()
    assert stage2.setup.max_length == 8192 and "the data (779,000 rows" in stage2.table()
    assert "99th percentile: 3,400 tokens" in stage2.table()
    worst = memory.plan("stage2", memory_plan.stage_setup(recipe, recipe.stage2), 80)
    assert worst.setup.max_length == 32768 and worst.setup.image_tokens == 2928  # NeXT's largest image
    assert worst.fits is False and worst.fix[0].startswith("data.model_max_length="), worst.table()


def test_host_memory_is_planned_per_worker():
    recipe = load_recipe("llava_next_72b")
    host = memory.host_memory(memory_plan.stage_setup(recipe, recipe.stage2, NEXT_LENGTHS))
    assert host.load < 3 * memory.GB  # ZeRO-3 reads its 1/64 of 145 GB, never the whole model
    assert host.export == 4 * memory.GB  # one 4 GiB shard of the streamed export (the embedding is 2.5 GB)
    assert host.offload == 0
    whole = memory.host_memory(setup(zero_stage=2, offload_optimizer=True))
    assert whole.load == 2 * whole_params() and whole.offload == 16 * whole_params() // 8


def whole_params() -> int:
    return LM.params + TOWER.params + 1024 * 4096 + 4096 * 4096


def test_the_manifests_lengths_are_what_the_plan_uses(tmp_path):
    lengths = memory.SampleLengths.of(list(range(1, 1001)), [1] * 995 + [5] * 5)
    assert (lengths.max_tokens, lengths.p99_tokens, lengths.max_tiles, lengths.p99_tiles) == (1000, 991, 5, 1)
    recipe = load_recipe("llava_next_34b", [f"stage2.data.preprocessed={tmp_path}"])
    (tmp_path / memory_plan.MANIFEST).write_text(json.dumps({"lengths": lengths.as_dict()}))
    planned = memory_plan.stage_setup(recipe, recipe.stage2)
    assert (planned.max_length, planned.tiles_per_sample, planned.typical) == (1000, 5, lengths)


def test_dry_run_prints_each_stages_estimate():
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--recipe", "llava_next_34b", "--dry-run"],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert "# memory per GPU" in out and "# stage1: ~" in out and "# stage2: ~" in out
    assert out.count("verdict          fits in 80 GB") == 2
    assert "lengths from     model_max_length (every sample as long as allowed: no preprocessing manifest" in out
    assert "host memory      per worker: loading" in out
