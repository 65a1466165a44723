"""Performance: how long training stands still per checkpoint, uploads in the background vs waited for.

    python -m jobs.perf.checkpoint_upload [--delay-ms 150] [--steps 12] [--out /tmp/bench-ckpt]
    python -m jobs.perf.checkpoint_upload --quick       # the same measurement, 3 steps, 1 checkpoint each
    python -m jobs.perf.checkpoint_upload --dry-run     # resolve both recipes and pass preflight

One run: moto's S3 server behind a loopback proxy that holds every request for ``--delay-ms`` (a
distant object store), and the same stage 1 (tiny model, 2 Ray Train workers, ZeRO-2, a checkpoint
every 3 steps to ``s3://``) trained twice, ``checkpoint.upload=sync`` and ``async``. Each run's
``checkpoint_stall_s`` metric (rank 0: saving the DeepSpeed state locally plus ``ray.train.report``)
is the training stall per checkpoint; the medians are compared. Target: async / sync <= 0.2.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import boto3
import ray

from jobs import compose, train
from jobs.console import quiet_ray_data
from jobs.perf.train import stage_overrides
from llava_platform import tracking
from llava_platform.config import load_recipe
from llava_platform.data.synthetic import write_synthetic_dataset
from llava_platform.testing.flaky_s3 import FlakyS3Proxy
from llava_platform.testing.local_servers import S3_TEST_ENV, MotoServer

BUCKET = "bench-checkpoints"


def recipe_overrides(data: dict, data_root: Path, steps: int, mode: str, endpoint: str, tracking_uri: str) -> list[str]:
    overrides = stage_overrides(data, data_root, steps, batch=4)
    return [*overrides, "scaling.num_workers=2", "scaling.cpus_per_worker=1", "stage1.global_batch_size=8",
            f"checkpoint.upload={mode}", "checkpoint.every_n_steps=3", f"checkpoint.storage_path=s3://{BUCKET}/{mode}",
            f"checkpoint.s3_endpoint_url={endpoint}", f"tracking.uri={tracking_uri}"]


def stalls(recipe, initial: Path, out: Path) -> list[float]:
    run_id = train.run(recipe, model=str(initial), output=out, stage="1").runs["stage1"]
    history = tracking.client_for(recipe.tracking.uri).get_metric_history(run_id, "checkpoint_stall_s")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay-ms", type=float, default=150)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-ckpt"))
    parser.add_argument("--quick", action="store_true", help="3 steps (one checkpoint per mode), 50 ms per request")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.delay_ms = 3, 50
    run_dir = args.out / time.strftime("run-%Y%m%d-%H%M%S")
    data = write_synthetic_dataset(run_dir / "data", train=8 * args.steps, eval=1, seed=0)
    initial = compose.run(load_recipe("tiny_cpu_demo"), run_dir / "initial")
    tracking_uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    if args.dry_run:
        for mode in ("sync", "async"):
            recipe = load_recipe("tiny_cpu_demo", recipe_overrides(data, run_dir / "data", args.steps, mode,
                                                                   "http://127.0.0.1:9", tracking_uri))
            assert recipe.checkpoint.upload == mode
        print(f"dry run: inputs in {run_dir}; the sync and async recipes resolve")
        return None

    moto = MotoServer()
    endpoint = moto.start()
    proxy = FlakyS3Proxy(endpoint, delay_s=args.delay_ms / 1000)
    try:
        boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_TEST_ENV.items()
                                                     if k != "AWS_DEFAULT_REGION"},
                     region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=BUCKET)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": S3_TEST_ENV})
        quiet_ray_data()
        medians = {}
        for mode in ("sync", "async"):
            recipe = load_recipe("tiny_cpu_demo", recipe_overrides(data, run_dir / "data", args.steps, mode,
                                                                   proxy.url, tracking_uri))
            seconds = stalls(recipe, initial, run_dir / mode)
            medians[mode] = statistics.median(seconds)
            print(f"{mode:<6} stall per checkpoint: median {medians[mode]:.3f} s over {len(seconds)} checkpoints "
                  f"({', '.join(f'{s:.2f}' for s in seconds)})", flush=True)
    finally:
        ray.shutdown()  # nothing of Ray's prints after the figures: the last line is the README's
        proxy.close()
        moto.stop()
    ratio = medians["async"] / medians["sync"]
    print(f"S3 behind a proxy holding each request {args.delay_ms:.0f} ms; 2 workers, ZeRO-2, tiny model")
    print(f"checkpoint-stall async/sync: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
