"""Node loss during training on a simulated three-node cluster (``make chaos``; too slow for ``make test``).

Each scenario runs ``tests.helpers.node_loss`` in its own process (a pytest process holds one Ray
connection) and checks what every node-loss scenario promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.losses import Loss, record_loss, rows_loss, steps_loss


def lose_a_node(work_dir: Path, *options: str) -> tuple[dict, Loss, Loss]:
    """Run the node-loss scenario and check what every one promises; return its result and what the final
    model lost: optimizer steps in MLflow's history, rows in the row ledger (one epoch: 32 rows, 8 steps of 4)."""
    completed = subprocess.run([sys.executable, "-m", "tests.helpers.node_loss", str(work_dir), *options],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["removed"], "no node was removed: the fault was not injected"
    # one restart, from a checkpoint taken before the fault (step 2 or 4: Ray Train registers a checkpoint
    # once every rank's upload is done, and the step-4 one may not be when the node goes)
    assert len(result["resumed_at_step"]) == 1 and result["resumed_at_step"][0] in (2.0, 4.0), result
    steps = steps_loss(result["loss_steps"], range(1, 9))
    assert not steps.count, f"not one continuous history: {steps}"
    assert result["optimizer_steps"] == 8
    return result, steps, rows_loss(result["ledger"], result["rows"], global_batch=4, steps=8)


@pytest.mark.chaos
@pytest.mark.fault("training: the node hosting the training workers removed mid-run (3-node Cluster)")
def test_losing_a_node_restarts_training_on_the_rest_with_one_continuous_history(tmp_path, record_property):
    result, steps, rows = lose_a_node(tmp_path)
    record_loss(record_property, steps, rows)
    assert result["alive_nodes"] == 2
    assert not rows.count, rows


@pytest.mark.chaos
@pytest.mark.fault("training: a node lost under STRICT_SPREAD; the run waits for its replacement")
def test_with_one_worker_per_node_training_waits_for_a_replacement_node(tmp_path, record_property):
    result, steps, rows = lose_a_node(tmp_path, "--wait-for-replacement")
    record_loss(record_property, steps, rows)
    assert result["alive_nodes"] == 3 and "replacement_added_at" in result["removed"], result
    assert result["resumed_at"][0] > result["removed"]["replacement_added_at"], \
        "training resumed before the replacement node joined: it did not wait"
    assert not rows.count, rows


@pytest.mark.chaos
@pytest.mark.fault("training: a node lost with no replacement; the elastic run goes on with the workers left")
def test_an_elastic_run_that_loses_a_node_finishes_on_the_remaining_worker(tmp_path, record_property):
    result, steps, rows = lose_a_node(tmp_path, "--elastic")
    record_loss(record_property, steps, rows)
    # rows by id in one global order: across the 2 -> 1 shrink every row trained once in the epoch
    assert not rows.count, rows
    assert result["alive_nodes"] == 2 and "replacement_added_at" not in result["removed"], result
    # two workers, then one (scaling.min_workers: 1); the global batch holds (accumulation 1 -> 2)
    assert result["world_sizes"] == [2.0, 1.0], result
    assert result["global_batch_sizes"] == [4.0, 4.0], result
