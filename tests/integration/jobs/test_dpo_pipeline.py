"""Stage 1 -> stage 2 -> stage 3 (DPO) end to end on the tiny recipe (``dpo_run``): the preference pairs with
their quarantine and reference log-probabilities, the per-step DPO metrics in MLflow, the export of each stage
and its registered versions, the evaluation before and after, and a resumed stage 3 that continues exactly."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from llava_platform import registry, tracking
from llava_platform.data.image_settings import ImageSettings
from llava_platform.model.compose import load_pretrained_llava
from llava_platform.train.batches import collate_preference
from llava_platform.train.preference import METRICS, REFERENCE_COLUMNS, model_inputs, sequence_logps
from tests.helpers.recipes import DPO_RECIPE, DPO_STEPS, dpo_pipeline_overrides


def test_stage3_starts_from_stage2s_export_and_registers_its_own(dpo_run, mlflow_server):
    result, root, _ = dpo_run
    train = root / "out" / "train"
    assert set(result.runs) >= {"parent", "stage1", "stage2", "stage3"}
    before, after = (load_file(train / stage / "export" / "model.safetensors") for stage in ("stage2", "stage3"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before), "stage 3 changed no weight"
    versions = {stage: registry.registered_version(result.tracking_uri, result.runs[stage]) for stage in
                ("stage2", "stage3")}
    assert versions["stage2"] and versions["stage3"]
    assert versions["stage2"][0] == versions["stage3"][0] == "tiny-dpo-cpu"
    assert int(versions["stage3"][1]) == int(versions["stage2"][1]) + 1
    assert result.model_uri == f"models:/tiny-dpo-cpu/{versions['stage3'][1]}"  # what is evaluated and served


def test_bad_pairs_are_quarantined_and_kept_pairs_carry_the_starting_models_log_probabilities(dpo_run):
    _, root, counts = dpo_run
    manifest = json.loads((root / "shards3" / "manifest.json").read_text())
    assert manifest["counts"]["read"] == counts["image"] + counts["text"] + counts["bad"]
    assert manifest["counts"]["kept"] == counts["image"] + counts["text"]
    assert manifest["counts"]["quarantined"] == {"identical_answers": 1, "missing_field": 1, "too_long": 1}
    reasons = {json.loads(line)["reason"] for line in (root / "shards3" / "quarantine.jsonl").read_text().splitlines()}
    assert reasons == {"identical_answers", "missing_field", "too_long"}
    assert set(REFERENCE_COLUMNS) <= set(manifest["schema"])
    rows = pq.read_table(root / "shards3" / "shards").to_pydict()
    modalities = set(rows["modality"])
    assert modalities == {"image", "text"}, modalities  # both kinds reached the two ZeRO-3 ranks' batches
    # the reference: stage 2's export (where stage 3 started) run on each pair now, after stage 3 trained
    model, processor = load_pretrained_llava(str(root / "out" / "train" / "stage2" / "export"))
    settings = ImageSettings.from_processor(processor)
    for i in range(0, len(rows["id"]), 9):
        row = {name: [values[i]] for name, values in rows.items()}
        batch = collate_preference(row, processor, settings, anyres=False, device="cpu")
        with torch.no_grad():
            chosen, rejected = sequence_logps(model(**model_inputs(batch)).logits, batch["labels"]).tolist()
        assert chosen == pytest.approx(rows[REFERENCE_COLUMNS[0]][i], abs=1e-3)
        assert rejected == pytest.approx(rows[REFERENCE_COLUMNS[1]][i], abs=1e-3)


def test_mlflow_holds_the_dpo_metrics_of_every_step(dpo_run, mlflow_server):
    result, _, _ = dpo_run
    client = tracking.client_for(mlflow_server)
    run = result.runs["stage3"]
    for name in ("loss", *METRICS):
        history = {m.step: m.value for m in client.get_metric_history(run, name)}
        assert sorted(history) == list(range(1, DPO_STEPS + 1)), f"{name}: {history}"
        assert all(math.isfinite(v) for v in history.values())
    first = {name: client.get_metric_history(run, name)[0].value for name in ("losses/dpo", "rewards/margins")}
    assert first["losses/dpo"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as its reference
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-4)
    for step in range(1, DPO_STEPS + 1):  # the recipe's dpo_alpha 1 and gamma 1: loss = DPO term + SFT term
        value = {name: next(m.value for m in client.get_metric_history(run, name) if m.step == step)
                 for name in ("loss", "losses/total", "losses/dpo", "losses/sft")}
        assert value["loss"] == pytest.approx(value["losses/total"], abs=1e-5)
        assert value["losses/total"] == pytest.approx(value["losses/dpo"] + value["losses/sft"], abs=1e-5)
        assert value["losses/sft"] > 0
    margins = [m.value for m in client.get_metric_history(run, "rewards/margins")]
    assert any(abs(m) > 1e-5 for m in margins[1:]), "the rewards never moved off the reference"
    metrics = client.get_run(run).data.metrics
    assert metrics["data/kept"] == metrics["data/read"] - 3
    assert 0.0 <= metrics["preference/accuracy"] <= 1.0 and metrics["preference/pairs"] == 4
    assert "eval/accuracy" in client.get_run(result.runs["stage2"]).data.metrics  # before stage 3
    assert "eval/accuracy" in metrics  # after
    assert {"stage2", "stage3"} <= set(result.scores)


@pytest.mark.chaos
def test_a_resumed_stage3_continues_with_the_same_losses(dpo_run, mlflow_server):
    """``--resume`` from stage 3's step-2 checkpoint: the pairs and their reference log-probabilities are reused
    (same fingerprint), step 3 trains the same rows again from the saved state, and the export is the first
    run's and registered again."""
    from jobs import train
    from llava_platform.config import load_recipe

    result, root, _ = dpo_run
    recipe = load_recipe(DPO_RECIPE, dpo_pipeline_overrides(root, mlflow_server))
    first = root / "out" / "train"
    checkpoint = first / "checkpoints" / "tiny-dpo-cpu-stage3" / "stage3-step00000002"
    resumed_output = root / "resumed"
    resumed_output.mkdir()
    (resumed_output / "stage2").symlink_to(first / "stage2")  # where stage 3 starts from (stage3.init_from)
    shards = (root / "shards3" / "manifest.json").stat().st_mtime_ns
    again = train.run(recipe, model=str(root / "out" / "initial"), output=resumed_output, resume=str(checkpoint))
    assert list(again.stage_dirs) == ["stage3"] and again.runs["stage3"] == result.runs["stage3"]
    assert (root / "shards3" / "manifest.json").stat().st_mtime_ns == shards, "the pairs were preprocessed again"
    client = tracking.client_for(mlflow_server)
    assert [m.value for m in client.get_metric_history(result.runs["stage3"], "resumed_at_step")] == [2]
    history = client.get_metric_history(result.runs["stage3"], "losses/dpo")
    assert sorted(m.step for m in history) == list(range(1, DPO_STEPS + 1))  # no step logged twice
    original, resumed = (load_file(out / "stage3" / "export" / "model.safetensors") for out in (first, resumed_output))
    for name, weight in original.items():
        torch.testing.assert_close(resumed[name], weight, atol=1e-5, rtol=0)
