"""Stage 3's training step on real DeepSpeed ranks (gloo, no Ray): the DPO objective (``PreferenceObjective``)
on preference rows built as preprocessing builds them, with the reference log-probabilities of the starting
model.

- ZeRO-3 on two ranks, every weight sharded, with pairs on an image on one rank and text-only pairs on the
  other (``II,IT,TI``): every step finishes on both ranks with ZeRO-3's module trace intact (no hang).
- LoRA-DPO: the reference is the starting model, which under LoRA is the base with its adapters disabled
  (they start at zero): the first step's policy equals it exactly (rewards 0, loss ln 2), training moves the
  margin, and the base's language-model weights never change, so no second copy is ever needed.
"""

from __future__ import annotations

import faulthandler
import math

import pytest
import torch

from jobs import compose
from jobs.perf.ranks import spawn_ranks
from llava_platform.config import load_recipe
from tests.helpers.rows import preference_rows

RECIPE = "tiny_dpo_cpu"
STAGE = ["stage3.global_batch_size=2", "stage3.micro_batch_size=1", "stage3.optim.lr=0.01",
         "stage3.optim.warmup_ratio=0.0", "stage3.preference.beta=0.5"]
ZERO3 = ["stage3.deepspeed.zero_stage=3", "stage3.deepspeed.zero3_param_persistence_threshold=0",
         "scaling.num_workers=2", "stage3.global_batch_size=2"]
LORA = ["stage3.tunable=[projector]", "stage3.lora={r: 4, alpha: 8, dropout: 0.0}", "scaling.num_workers=1",
        "stage3.global_batch_size=1"]
HANG_AFTER_S = 120


def train_pairs(rank: int, world_size: int, overrides: list[str], model: str, schedule: str) -> dict:
    """Rank function: one optimizer step per schedule entry (``I``: a pair on an image on this rank, ``T``: a
    text-only pair), each pair's reference log-probabilities from the starting model (this engine before its
    first step). Returns the steps' metrics, ZeRO-3's trace flags and, under LoRA, the base weights' change."""
    from llava_platform.config.build import deepspeed_spec
    from llava_platform.data.image_settings import ImageSettings
    from llava_platform.model.compose import load_pretrained_llava
    from llava_platform.train.batches import collate_preference
    from llava_platform.train.deepspeed_engine import build_deepspeed_engine, train_step
    from llava_platform.train.preference import REFERENCE_COLUMNS, PreferenceObjective, model_inputs, sequence_logps

    faulthandler.dump_traceback_later(HANG_AFTER_S, exit=True)  # a hang fails the test with every stack
    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = load_recipe(RECIPE, overrides)
    stage = recipe.stage3
    engine, processor = build_deepspeed_engine(deepspeed_spec(recipe, stage, model, total_steps=len(schedule)))
    settings = ImageSettings.from_processor(processor)
    objective = PreferenceObjective(stage.preference.build())
    base = {name: p.detach().clone() for name, p in engine.module.named_parameters()
            if "language_model" in name and "lora_" not in name} if stage.lora else {}
    reference = load_pretrained_llava(model)[0].eval()  # the starting checkpoint, as pipelines.reference loads it
    batches = []
    for step, kinds in enumerate(schedule.split(",")):
        rows = preference_rows(processor, recipe, kinds[rank], seed=10 * step + rank)
        batch = collate_preference({**rows, REFERENCE_COLUMNS[0]: [0.0], REFERENCE_COLUMNS[1]: [0.0]}, processor,
                                   settings, anyres=False, device="cpu")
        with torch.no_grad():
            logps = sequence_logps(reference(**model_inputs(batch)).logits, batch["labels"])
        batch["reference_chosen"], batch["reference_rejected"] = logps[:1], logps[1:]
        batches.append(batch)
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator() if stage.deepspeed.zero_stage == 3 \
        else None
    steps = []
    for batch in batches:
        result = train_step(engine, [batch], objective=objective)
        steps.append({"loss": result.loss, **result.metrics,
                      "trace_complete": coordinator.is_complete_trace() if coordinator else True})
    moved = max((float((p.detach() - base[name]).abs().max()) for name, p in engine.module.named_parameters()
                 if name in base), default=None)
    faulthandler.cancel_dump_traceback_later()
    return {"steps": steps, "base_moved": moved, "lora": sum("lora_" in n for n, _ in engine.module.named_parameters())}


def test_dpo_ranks_with_image_and_text_pairs_stay_in_step_under_zero3(tmp_path):
    overrides = [*STAGE, *ZERO3]
    model = str(compose.run(load_recipe(RECIPE, overrides), tmp_path / "initial"))
    schedule = "II,IT,TI"
    ranks = spawn_ranks(train_pairs, 2, overrides, model, schedule, timeout_s=HANG_AFTER_S + 120)
    for rank, result in enumerate(ranks):
        steps = result["steps"]
        assert len(steps) == 3 and all(math.isfinite(s["loss"]) for s in steps)
        assert all(s["trace_complete"] for s in steps[1:]), f"rank {rank}: ZeRO-3's module trace was dropped"
        # the first step's policy is the reference: zero rewards, a DPO loss of ln 2
        assert steps[0]["losses/dpo"] == pytest.approx(math.log(2), abs=1e-5)
        assert steps[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
        assert steps[0]["rewards/rejected"] == pytest.approx(0, abs=1e-5)
        # later steps are scored against the reference, not against themselves: rewards move off zero
        assert any(abs(s["rewards/margins"]) > 1e-4 for s in steps[1:])


def test_lora_dpo_keeps_the_base_as_its_reference(tmp_path):
    overrides = [*STAGE, *LORA]
    model = str(compose.run(load_recipe(RECIPE, overrides), tmp_path / "initial"))
    (result,) = spawn_ranks(train_pairs, 1, overrides, model, "I,I,I,I,I,I", timeout_s=HANG_AFTER_S + 120)
    steps = result["steps"]
    assert result["lora"] > 0, "no adapters were added"
    assert steps[0]["losses/dpo"] == pytest.approx(math.log(2), abs=1e-5)  # zero adapters: the reference exactly
    assert steps[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    # each step a new image pair ("Red." over "Blue."), scored against the starting model: the margin grows
    assert steps[-1]["rewards/margins"] > 0 and steps[-1]["losses/dpo"] < math.log(2)
    assert result["base_moved"] == 0.0, "the language model's base weights changed under LoRA"
