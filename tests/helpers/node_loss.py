"""Node loss during training, on a simulated three-node cluster (``ray.cluster_utils.Cluster``).

    python -m tests.helpers.node_loss <work dir>                          # prints one JSON line
    python -m tests.helpers.node_loss <work dir> --wait-for-replacement   # tests/chaos/ runs all three
    python -m tests.helpers.node_loss <work dir> --elastic

A head without CPUs and two worker nodes of 2 CPUs each. Stage 1 of the tiny recipe trains on 2
Ray Train workers with a checkpoint every 2 steps; at step 5 the rank-0 worker stops
(``LLAVA_TRAIN_KILL_WORKER_AT_STEP=5:0:hang``) and ``REMOVE_AFTER_S`` later this script removes the
node that hosts it, raylet and all, as a cloud provider does with a lost VM. Ray Train's ``FailureConfig`` restarts
the worker group from the latest registered checkpoint (step 2 or 4: the step-4 one may not be
registered yet when the node goes):

- by default (``scaling.placement_strategy: PACK``: both workers on one node) on the remaining node;
- with ``--wait-for-replacement`` (``STRICT_SPREAD``: one worker per node) the remaining node is not
  enough, so the run waits; the script adds a replacement node after ``REPLACEMENT_AFTER_S`` seconds,
  as an autoscaler would, and the run resumes there;
- with ``--elastic`` (``scaling.min_workers: 1``, and 1.5 of each node's 2 CPUs per worker, as a GPU
  worker takes a node's only GPU) the remaining node holds one worker, no replacement comes, and the run
  goes on with that one worker: same global batch, accumulation doubled. Elastic stages read their rows
  by id, so the stage is preprocessed first (``jobs.preprocess``); the others stream.

The row ledger is armed in every mode: the row ids each step trained, which the test checks once per epoch.

It runs in its own process because a pytest process holds one Ray connection (the suite's head node).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import REPO_ROOT

STEPS = 8
KILL_AT = 5
REMOVE_AFTER_S = 5.0
"""Seconds between the worker hanging and its node going away. Ray Train registers a checkpoint once
its controller has collected every rank's report (it polls the workers); a node removed at once could
take an already-written checkpoint's last report with it, and the run would restart from scratch."""
REPLACEMENT_AFTER_S = 20.0
"""With --wait-for-replacement: seconds between removing the node and adding its replacement."""


SCALING = {
    "pack": ["scaling.placement_strategy=PACK"],
    "replace": ["scaling.placement_strategy=STRICT_SPREAD"],
    "elastic": ["scaling.min_workers=1", "scaling.cpus_per_worker=1.5", "scaling.data_cpus_per_actor=0.25"],
}
"""The recipe's scaling overrides per mode."""


def remove_node_when_hung(cluster, marker: Path, removed: dict, replace: bool, replacements: list) -> None:
    """Wait for the hung worker's marker, then remove the node whose raylet started that worker
    (and with ``replace``, start a new node ``REPLACEMENT_AFTER_S`` seconds later)."""
    import psutil

    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.2)
    if not marker.exists():
        return
    time.sleep(REMOVE_AFTER_S)
    pid = json.loads(marker.read_text())["pid"]
    raylet = psutil.Process(pid).ppid()
    for node in cluster.worker_nodes:
        if node.all_processes["raylet"][0].process.pid == raylet:
            removed.update(node_id=node.node_id, worker_pid=pid, at=time.time())
            cluster.remove_node(node, allow_graceful=False)
            break
    if replace and removed:
        time.sleep(REPLACEMENT_AFTER_S)
        removed["replacement_added_at"] = time.time()
        replacements.append(start_replacement_node(cluster.address))


def start_replacement_node(address: str) -> subprocess.Popen:
    """A new node joining the cluster as a replacement VM's ``ray start`` would (its own process:
    ``Cluster.add_node`` only works from the main thread, which is busy training)."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--address", address, "--num-cpus=2", "--block",
         "--disable-usage-stats"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(root: Path, mode: str) -> dict:
    """``mode``: ``pack`` (default), ``replace`` (``--wait-for-replacement``) or ``elastic``."""
    import mlflow
    import ray
    from ray.cluster_utils import Cluster

    from jobs import compose, faults, preprocess, train
    from llava_platform import tracking
    from llava_platform.config import load_recipe
    from llava_platform.data.synthetic import write_synthetic_dataset

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)

    files = write_synthetic_dataset(root / "data", train=32, eval=1, seed=0)
    initial = compose.main(["--recipe", "tiny_cpu_demo", "--output", str(root / "initial")])
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ[faults.KILL_AT_STEP_ENV] = f"{KILL_AT}:0:hang"
    os.environ[faults.ROW_LEDGER_ENV] = "1"  # the rows each step trained: what the test measures
    removed: dict = {}
    replacements: list[subprocess.Popen] = []
    marker = root / "out" / "stage1" / faults.FAULT_MARKER.format(action="hang", step=KILL_AT, rank=0)
    watcher = threading.Thread(target=remove_node_when_hung, daemon=True,
                               args=(cluster, marker, removed, mode == "replace", replacements))
    watcher.start()
    data = [f"stage1.data.train_files=[{files['stage1']}]", f"stage1.data.image_root={root / 'data'}",
            "stage1.data.preprocessed=null"]
    if mode == "elastic":  # rows by id, so that an elastic group trains each row once on any worker count
        preprocess.run(load_recipe("tiny_cpu_demo", data), stage="stage1", model=str(initial), output=root / "shards")
        data[-1] = f"stage1.data.preprocessed={root / 'shards'}"
    started = time.time()
    out = train.main([
        "--recipe", "tiny_cpu_demo", "--stage", "1", "--model", str(initial), "--output", str(root / "out"), *data,
        "stage1.global_batch_size=4", "stage1.micro_batch_size=2", f"stage1.max_steps={STEPS}",
        "checkpoint.every_n_steps=2", f"tracking.uri={uri}", "tracking.system_metrics=false", *SCALING[mode],
    ])
    run_id = json.loads((out.stage_dirs["stage1"].parent / train.RUNS_FILE).read_text())["runs"]["stage1"]
    client = tracking.client_for(uri)
    result = {
        "removed": removed, "seconds": round(time.time() - started, 1),
        "alive_nodes": sum(n["Alive"] for n in ray.nodes()),
        "loss_steps": sorted(m.step for m in client.get_metric_history(run_id, "loss")),
        "resumed_at_step": [m.value for m in client.get_metric_history(run_id, "resumed_at_step")],
        "resumed_at": [m.timestamp / 1000 for m in client.get_metric_history(run_id, "resumed_at_step")],
        "optimizer_steps": client.get_run(run_id).data.metrics.get("optimizer_steps"),
        "world_sizes": [m.value for m in sorted(client.get_metric_history(run_id, "world_size"),
                                                key=lambda m: m.timestamp)],
        "global_batch_sizes": [m.value for m in client.get_metric_history(run_id, "global_batch_size")],
        "ledger": str(out.stage_dirs["stage1"] / faults.ROW_LEDGER_DIR),
        "rows": [record["id"] for record in json.loads(files["stage1"].read_text())],
        "mlflow_version": mlflow.__version__,
    }
    ray.shutdown()
    for node in replacements:
        node.terminate()
        node.wait(timeout=60)
    cluster.shutdown()
    return result


if __name__ == "__main__":
    options = sys.argv[2:]
    print(json.dumps(main(Path(sys.argv[1]), "replace" if "--wait-for-replacement" in options
                          else "elastic" if "--elastic" in options else "pack")), flush=True)
