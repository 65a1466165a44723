"""Performance: seconds per optimizer step of jobs.train (Ray Train, 1 worker) vs a bare DeepSpeed loop.

    python -m jobs.perf.train [--steps 30] [--out /tmp/bench-train]
    python -m jobs.perf.train --quick       # 6 steps of 4 samples
    python -m jobs.perf.train --dry-run     # set up and check the three loops, run nothing (the test suite's)

One run, the same model, data and engine settings (``build_deepspeed_engine`` + ``train_step``) three ways:

- ``bare``: one process, no Ray; the rows are in memory before the clock starts, and each step
  collates its micro-batch and runs forward/backward/step (the floor).
- ``ray-streamed``: ``jobs.train`` with 1 worker, rows preprocessed by Ray Data while training runs.
- ``ray-materialised``: ``jobs.train`` with 1 worker reading ``jobs.preprocess``'s Parquet shards by id
  (``pipelines.shards.RowReader``, in the stage's global order).

Ray runs are timed from their MLflow metrics (wall time between optimizer steps, logging and data
wait included). Medians skip the first 3 steps (warm-up) and the last. Targets: ray / bare <= 1.15;
data-wait fraction < 5%. The last line is ``train s/step vs bare: streamed <x>, materialised <y>``.

The benchmark owns its inputs: every run writes its data, model, shards, checkpoints and MLflow store
into a new ``<out>/run-<time>`` folder and overrides every recipe path it uses, so it runs the same
on a fresh clone and after ``make demo`` (whose outputs it never reads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import ray
import torch

from jobs import compose, preprocess, train
from jobs.console import quiet_ray_data
from llava_platform import tracking
from llava_platform.config import load_recipe
from llava_platform.config.build import deepspeed_spec
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.synthetic import write_synthetic_dataset
from llava_platform.train.batches import collate_rows
from llava_platform.train.deepspeed_engine import build_deepspeed_engine, init_distributed, train_step
from pipelines.shards import RowReader, shard_files

MODEL = ["model.tiny.text_hidden_size=256", "model.tiny.text_layers=4", "model.tiny.text_heads=4",
         "model.tiny.vision_hidden_size=64", "model.image_size=112"]
"""Bigger than the test model, so a step takes long enough (~0.3 s on 2 cores) for overheads to show."""
THREADS = 2


def stage_overrides(files: dict, data_root: Path, steps: int, batch: int) -> list[str]:
    """Stage 1 on the benchmark's own data, streamed (``loop_overrides`` adds the shards for the materialised loop)."""
    return [f"stage1.data.train_files=[{files['stage1']}]", f"stage1.data.image_root={data_root}",
            "stage1.data.preprocessed=null", f"stage1.global_batch_size={batch}", f"stage1.micro_batch_size={batch}",
            f"stage1.max_steps={steps}", "scaling.num_workers=1", f"scaling.cpus_per_worker={THREADS}",
            "tracking.system_metrics=false", "stage1.data.group_by_modality_length=false"]


def loop_overrides(overrides: list[str], shards: Path) -> dict[str, list[str]]:
    """The recipe overrides of the two Ray loops."""
    return {"ray-streamed": overrides, "ray-materialised": [*overrides, f"stage1.data.preprocessed={shards}"]}


def dry_run(initial: Path, run_dir: Path, loops: dict[str, list[str]]) -> None:
    """Resolve both Ray loops' recipes and run jobs.train's preflight on the streamed one (the materialised
    one's shards are written by the run itself); exit 2 with the problems, as jobs.train would."""
    for name, overrides in loops.items():
        recipe = load_recipe("tiny_cpu_demo", overrides)
        if recipe.stage1.data.preprocessed:
            continue
        problems = train.preflight(recipe, ["stage1"], model=str(initial), output=run_dir / name, stage="1")
        if problems:
            raise SystemExit(f"perf_train {name}: " + "; ".join(problems))
    print(f"dry run: inputs in {run_dir}; loops {', '.join(['bare', *loops])} resolve and pass preflight")


def bare_seconds_per_step(initial: Path, shards: Path, overrides: list[str], steps: int) -> list[float]:
    """The same engine in this process (world size 1, gloo), on rows loaded into memory beforehand."""
    recipe = load_recipe("tiny_cpu_demo", overrides)
    stage = recipe.stage1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    init_distributed("gloo")
    engine, processor = build_deepspeed_engine(deepspeed_spec(recipe, stage, str(initial), total_steps=steps))
    settings = ImageSettings.from_processor(processor)
    reader, micro = RowReader(shard_files(shards)[0]), stage.micro_batch_size
    micro_batches = [reader.read(range(step * micro, (step + 1) * micro)) for step in range(steps)]
    times = []
    for rows in micro_batches:
        started = time.perf_counter()
        batch = collate_rows(rows, processor, settings, False, torch.device("cpu"))
        train_step(engine, [batch])
        times.append(time.perf_counter() - started)
    torch.distributed.destroy_process_group()
    return times


def ray_seconds_per_step(initial: Path, out: Path, overrides: list[str], batch: int) -> tuple[list, list]:
    """jobs.train's own per-step metrics: seconds per step and data-wait fraction."""
    tracking_uri = f"sqlite:///{out.parent / 'mlflow.db'}"
    recipe = load_recipe("tiny_cpu_demo", [*overrides, f"tracking.uri={tracking_uri}"])
    run_id = train.run(recipe, model=str(initial), output=out, stage="1").runs["stage1"]
    client = tracking.client_for(tracking_uri)
    rate = sorted(client.get_metric_history(run_id, "samples_per_s"), key=lambda m: m.step)
    wait = sorted(client.get_metric_history(run_id, "data_wait_fraction"), key=lambda m: m.step)
    return [batch / m.value for m in rate], [m.value for m in wait]


def steady(values: list[float]) -> list[float]:
    return values[3:-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-train"), help="a run-<time> folder goes here")
    parser.add_argument("--quick", action="store_true", help="6 steps of 4 samples")
    parser.add_argument("--dry-run", action="store_true", help="set up and check the loops, then exit")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch = 6, 4
    run_dir = args.out / time.strftime("run-%Y%m%d-%H%M%S")
    torch.set_num_threads(THREADS)
    data = write_synthetic_dataset(run_dir / "data", train=args.steps * args.batch, eval=1, seed=0)
    initial = compose.run(load_recipe("tiny_cpu_demo", MODEL), run_dir / "initial")
    overrides = MODEL + stage_overrides(data, run_dir / "data", args.steps, args.batch)
    shards = run_dir / "shards"
    loops = loop_overrides(overrides, shards)
    if args.dry_run:
        dry_run(initial, run_dir, loops)
        return
    # The figures are this script's output: workers' logs and progress bars stay in Ray's log folder.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(THREADS)}})
    quiet_ray_data()
    preprocess.run(load_recipe("tiny_cpu_demo", overrides), stage="stage1", model=str(initial), output=shards)

    bare = bare_seconds_per_step(initial, shards, overrides, args.steps)
    streamed, streamed_wait = ray_seconds_per_step(initial, run_dir / "streamed", loops["ray-streamed"], args.batch)
    materialised, materialised_wait = ray_seconds_per_step(initial, run_dir / "materialised",
                                                           loops["ray-materialised"], args.batch)

    ray.shutdown()  # nothing of Ray's prints after the figures: the last line is the README's
    base = statistics.median(steady(bare))
    print(f"\n{args.steps} optimizer steps of {args.batch} samples, {THREADS} torch threads, "
          "medians without the first 3 steps and the last")
    print(f"{'loop':<18}{'s/step':>8}{'vs bare':>9}{'data wait':>11}")
    print(f"{'bare DeepSpeed':<18}{base:>8.3f}{1.0:>9.2f}{'-':>11}")
    ratios = {}
    for name, times, wait in (("ray-streamed", streamed, streamed_wait),
                              ("ray-materialised", materialised, materialised_wait)):
        median = statistics.median(steady(times))
        ratios[name] = median / base
        print(f"{name:<18}{median:>8.3f}{median / base:>9.2f}{statistics.median(steady(wait)):>10.1%}")
    print(f"train s/step vs bare: streamed {ratios['ray-streamed']:.2f}, materialised {ratios['ray-materialised']:.2f}")


if __name__ == "__main__":
    main()
