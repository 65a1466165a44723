"""Performance: what a 1.2 GB checkpoint costs the training loop, uploaded in the background vs waited for.

    python -m jobs.perf.checkpoint_upload [--delay-ms 150] [--steps 60] [--every 20] [--out /tmp/bench-ckpt]
    python -m jobs.perf.checkpoint_upload --quick       # the same measurement on the recipe's tiny model, 6 steps
    python -m jobs.perf.checkpoint_upload --dry-run     # resolve both recipes

One run (~11 min on 2 cores): moto's S3 server behind a loopback proxy that holds every request for
``--delay-ms`` (a distant object store), and the same stage 2 (a 75M-parameter model, its language
model trained in full; 2 Ray Train workers, ZeRO-2, fp32, a checkpoint every ``--every`` steps to
``s3://``) trained twice, ``checkpoint.upload=sync`` and ``async``. A checkpoint is the whole
DeepSpeed state, weights and both ranks' optimizer partitions (fp32 master copy, Adam moments): its
bytes in the bucket are printed (1.20 GB).

Per mode, the median step time (wall time between optimizer steps, from ``samples_per_s``) of three
kinds of step: clear (no checkpoint, no upload; the first two are warm-up, left out), the step that
takes a checkpoint (it holds the stall: local save + ``ray.train.report``, ``checkpoint_stall_s``), and
the steps that start while its upload still runs (the slowdown: the upload shares the CPU). An upload
runs while a checkpoint's local copy exists (Ray Train deletes it when done); the workers' temp folder
is polled. ``lost/ckpt``: seconds per checkpoint that its step and its upload's steps took beyond
clear steps. Last line: median ``checkpoint_stall_s`` async / sync (target <= 0.2). On 2 cores the
upload (pyarrow, the proxy and moto, all on the same cores) slows the steps it overlaps about as much
as sync waits for it: async moves the cost, it does not remove it, where uploads need the training CPU.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import boto3
import ray

from jobs import compose, train
from jobs.console import quiet_ray_data
from llava_platform import tracking
from llava_platform.config import load_recipe
from llava_platform.data.synthetic import write_synthetic_dataset
from llava_platform.testing.flaky_s3 import FlakyS3Proxy
from llava_platform.testing.local_servers import S3_TEST_ENV, MotoServer

BUCKET = "bench-checkpoints"
MODEL = ["model.tiny.text_hidden_size=1536", "model.tiny.text_layers=3", "model.tiny.text_heads=12"]
"""A 74M-parameter language model (vocabulary 1024; 75M with the tiny towers): trained in full under ZeRO-2
in fp32, its checkpoint holds ~16 bytes per parameter (weights, master copy, two Adam moments): 1.2 GB."""
WARMUP_STEPS = 2
LOCAL_CHECKPOINT = "llava-ckpt-"
"""Prefix of the folder each rank saves a checkpoint into (``jobs.train_worker.report_checkpoint``)."""


def recipe_overrides(data: dict, data_root: Path, steps: int, every: int, mode: str, endpoint: str,
                     tracking_uri: str) -> list[str]:
    """Stage 2 on the benchmark's own data (streamed), starting from the composed model's projector."""
    return [f"stage2.data.train_files=[{data['stage2']}]", f"stage2.data.image_root={data_root}",
            "stage2.data.preprocessed=null", "stage2.init_from=null", "stage2.global_batch_size=8",
            "stage2.micro_batch_size=4", f"stage2.max_steps={steps}", "stage2.epochs=1", "stage2.optim.lr=1.0e-4",
            "scaling.num_workers=2", "scaling.cpus_per_worker=1", "tracking.system_metrics=false",
            f"checkpoint.upload={mode}", f"checkpoint.every_n_steps={every}", "checkpoint.num_to_keep=1",
            f"checkpoint.storage_path=s3://{BUCKET}/{mode}", f"checkpoint.s3_endpoint_url={endpoint}",
            f"tracking.uri={tracking_uri}"]


class UploadWindows:
    """Polls the workers' temp folder: a checkpoint's local copy is there from its save until its upload
    has finished (Ray Train deletes it then), so the spans with any copy present are the uploads."""

    def __init__(self, folder: Path, interval_s: float = 0.1):
        self.folder, self.interval_s, self.spans = folder, interval_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        since = None
        while not self._stop.wait(self.interval_s):
            present = any(self.folder.glob(f"{LOCAL_CHECKPOINT}*"))
            if present and since is None:
                since = time.time()
            elif not present and since is not None:
                self.spans.append((since, time.time()))
                since = None

    def close(self) -> list[tuple[float, float]]:
        """Stop polling; returns the (start, end) wall times of the spans seen."""
        self._stop.set()
        self._thread.join()
        return self.spans


def step_kinds(seconds: dict[int, float], stalls: dict[int, tuple[float, float]],
               uploads: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Sort the step times (by step) into clear, checkpoint and during-upload steps.

    A step's time runs from the end of the previous step's compute to the end of its own, so the step
    after a checkpointed one holds the stall. ``stalls`` maps a checkpointed step to (stall seconds, the
    wall time the stall ended, as MLflow stamped it); the steps after it are placed on the wall clock
    from there, and the ones that start before its upload span ends are during-upload steps.
    """
    kinds: dict[str, list[float]] = {"clear": [], "checkpoint": [], "upload": []}
    end, upload_end = None, 0.0
    for step in sorted(seconds):
        if step - 1 in stalls:
            stall, stall_end = stalls[step - 1]
            upload_end = max((last for first, last in uploads if first <= stall_end), default=stall_end)
            end = stall_end + seconds[step] - stall
            kinds["checkpoint"].append(seconds[step])
            continue
        start, end = end, None if end is None else end + seconds[step]
        if start is not None and start < upload_end:
            kinds["upload"].append(seconds[step])
        elif step > WARMUP_STEPS:
            kinds["clear"].append(seconds[step])
    return kinds


def lost_per_checkpoint(kinds: dict[str, list[float]]) -> float | None:
    """Seconds a checkpoint adds to training: its step and the steps during its upload, beyond clear steps."""
    if not kinds["checkpoint"] or not kinds["clear"]:
        return None
    slow = kinds["checkpoint"] + kinds["upload"]
    return (sum(slow) - len(slow) * statistics.median(kinds["clear"])) / len(kinds["checkpoint"])


def measure(recipe, initial: Path, out: Path, workers_tmp: Path) -> tuple[list[float], dict[str, list[float]]]:
    """Train the stage; returns the stall per checkpoint and the step times by kind."""
    windows = UploadWindows(workers_tmp)
    try:
        run_id = train.run(recipe, model=str(initial), output=out, stage="2").runs["stage2"]
    finally:
        uploads = windows.close()
    client = tracking.client_for(recipe.tracking.uri)
    stall_history = sorted(client.get_metric_history(run_id, "checkpoint_stall_s"), key=lambda m: m.step)
    batch = recipe.stage2.global_batch_size
    seconds = {m.step: batch / m.value for m in client.get_metric_history(run_id, "samples_per_s")}
    stalls = {m.step: (m.value, m.timestamp / 1000) for m in stall_history}
    return [m.value for m in stall_history], step_kinds(seconds, stalls, uploads)


def checkpoint_bytes(s3, prefix: str) -> tuple[str, int, int]:
    """The last checkpoint under ``prefix`` in the bucket: its folder name, file count and total bytes."""
    sizes: dict[str, list[int]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            folder = next((part for part in item["Key"].split("/") if part.startswith("stage2-step")), None)
            if folder:
                sizes.setdefault(folder, []).append(item["Size"])
    last = max(sizes)
    return last, len(sizes[last]), sum(sizes[last])


def empty_bucket(s3, prefix: str) -> None:
    """Delete a mode's checkpoints (moto keeps them in temp files: the disk holds one mode's at a time)."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=item["Key"])


def median(values: list[float]) -> str:
    """``median (count)`` for the table, ``-`` when there are none."""
    return f"{statistics.median(values):.2f} ({len(values)})" if values else "-"


def print_table(stalls: dict[str, list[float]], kinds: dict[str, dict[str, list[float]]]) -> None:
    """Per mode: median step seconds (count) by kind, the stall metric, and the seconds lost per checkpoint."""
    print(f"{'s/step, median (n)':<19}{'clear':>11}{'checkpoint':>13}{'during upload':>15}{'stall':>12}"
          f"{'lost/ckpt':>11}")
    for mode, by_kind in kinds.items():
        lost = lost_per_checkpoint(by_kind)
        print(f"{mode:<19}{median(by_kind['clear']):>11}{median(by_kind['checkpoint']):>13}"
              f"{median(by_kind['upload']):>15}{median(stalls[mode]):>12}{'-' if lost is None else f'{lost:.1f}':>11}")


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay-ms", type=float, default=150)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20, help="steps between checkpoints")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-ckpt"))
    parser.add_argument("--quick", action="store_true",
                        help="the recipe's tiny model, 6 steps (a checkpoint every 3), 50 ms per request")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    model = [] if args.quick else MODEL
    if args.quick:
        args.steps, args.every, args.delay_ms = 6, 3, 50
    run_dir = args.out / time.strftime("run-%Y%m%d-%H%M%S")
    data = write_synthetic_dataset(run_dir / "data", train=8 * args.steps, eval=1, seed=0)
    tracking_uri = f"sqlite:///{run_dir / 'mlflow.db'}"

    def recipe(mode: str, endpoint: str):
        overrides = recipe_overrides(data, run_dir / "data", args.steps, args.every, mode, endpoint, tracking_uri)
        return load_recipe("tiny_cpu_demo", [*model, *overrides])

    if args.dry_run:
        for mode in ("sync", "async"):
            assert recipe(mode, "http://127.0.0.1:9").checkpoint.upload == mode
        print(f"dry run: inputs in {run_dir}; the sync and async recipes resolve ({' '.join(model) or 'tiny model'})")
        return None
    initial = compose.run(recipe("sync", "http://127.0.0.1:9"), run_dir / "initial")

    moto = MotoServer()
    endpoint = moto.start()
    proxy = FlakyS3Proxy(endpoint, delay_s=args.delay_ms / 1000)
    workers_tmp = run_dir / "workers-tmp"  # the workers' TMPDIR: where each rank saves before uploading
    workers_tmp.mkdir()
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"],
                      **{k.lower(): v for k, v in S3_TEST_ENV.items() if k != "AWS_DEFAULT_REGION"})
    stalls, kinds, sizes = {}, {}, {}
    try:
        s3.create_bucket(Bucket=BUCKET)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {**S3_TEST_ENV, "TMPDIR": str(workers_tmp)}})
        quiet_ray_data()
        for mode in ("sync", "async"):
            stalls[mode], kinds[mode] = measure(recipe(mode, proxy.url), initial, run_dir / mode, workers_tmp)
            sizes[mode] = checkpoint_bytes(s3, f"{mode}/")
            empty_bucket(s3, f"{mode}/")
            print(f"{mode:<6} stall per checkpoint: median {statistics.median(stalls[mode]):.3f} s over "
                  f"{len(stalls[mode])} checkpoints ({', '.join(f'{s:.2f}' for s in stalls[mode])})", flush=True)
    finally:
        ray.shutdown()  # nothing of Ray's prints after the figures: the last line is the README's
        proxy.close()
        moto.stop()
    folder, files, size = sizes["async"]
    print_table(stalls, kinds)
    print(f"checkpoint {folder}: {size / 1e9:.2f} GB in {files} files (weights + optimizer states, 2 ranks)")
    print(f"S3 behind a proxy holding each request {args.delay_ms:.0f} ms; 2 workers, ZeRO-2, fp32, "
          f"{' '.join(m.split('.')[-1] for m in model) or 'tiny model'}; a checkpoint every {args.every} steps")
    ratio = statistics.median(stalls["async"]) / statistics.median(stalls["sync"])
    print(f"checkpoint-stall async/sync: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
