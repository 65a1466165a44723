"""Two-stage training with Ray Train + DeepSpeed on the Ray Data pipeline, tracked in MLflow.

    python -m jobs.train --recipe tiny_cpu_demo --model outputs/initial --output outputs/train --stage all
    ray job submit --working-dir . -- python -m jobs.train --recipe llava15_7b --model /mnt/shared/initial \\
        --output /mnt/shared/train --stage all
    python -m jobs.train ... --resume outputs/train/checkpoints/tiny-cpu-demo-stage2/stage2-step00000400

``--model`` is the composed starting checkpoint (``jobs.compose``). Stage 1 trains the projector and
writes ``<output>/stage1/projector.safetensors``; stage 2 starts from ``--model`` plus that projector
(or ``stage2.init_from``: a path or a ``runs:/<id>/projector.safetensors`` URI) and writes a Hugging
Face export to ``<output>/stage2/export``, registered in MLflow under ``tracking.registered_model``.

Checkpoints (full DeepSpeed state + data position) go to ``checkpoint.storage_path`` every
``checkpoint.every_n_steps`` steps. A dead worker restarts the worker group from the latest one
(``checkpoint.max_failures``); ``--resume <checkpoint>`` continues a stopped run from any kept one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import yaml

from jobs.train_worker import POSITION_FILE, train_loop_per_worker
from llava_platform import tracking
from llava_platform.config import recipe_argument_parser, recipe_from_args
from llava_platform.config.schema import Recipe, StageConfig
from llava_platform.config.schema import ScalingConfig as ScalingSection
from llava_platform.storage import filesystem_for, is_remote
from llava_platform.train.checkpoint import PROJECTOR_FILE
from llava_platform.train.deepspeed_config import build_deepspeed_config
from pipelines.preprocess import ManifestError, finish, preprocess, shard_files, stage_fingerprint
from pipelines.quarantine import PreprocessReport, QuarantineLog
from pipelines.sources import read_records

RUNS_FILE = "mlflow_runs.json"
"""Written into ``--output``: the tracking URI, experiment and MLflow run ids (``parent``, ``stage1``, ``stage2``)."""
KILL_AT_STEP_ENV = "LLAVA_TRAIN_KILL_WORKER_AT_STEP"
"""Fault injection: ``<step>`` or ``<step>:<rank>`` SIGKILLs that worker once, to exercise auto-resume
(``fault_from_env``: also ``:hang`` and ``:checkpoint``; several faults separated by commas)."""
FAULT_MARKER = ".fault-{action}-step{step}-rank{rank}"
"""The file (JSON, in the stage's output folder) a fault writes when it fires: it fires once, and tells
the test what was done."""


def log(message: str) -> None:
    print(f"[train] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = recipe_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all")
    parser.add_argument("--model", help="the composed starting checkpoint (jobs.compose output)")
    parser.add_argument("--output", type=Path, help="folder for stage outputs")
    parser.add_argument("--resume", help="a checkpoint folder (local or s3://) to continue from")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after options
    recipe = recipe_from_args(parser, args)
    resume = read_position(args.resume, recipe.checkpoint.s3_endpoint_url) if args.resume else None
    names = ["stage1", "stage2"] if args.stage == "all" else [f"stage{args.stage}"]
    if resume is not None:  # earlier stages are done; their outputs are already in --output
        names = names[names.index(resume["stage"]):] if resume["stage"] in names else []

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    problems = preflight(recipe, names, args, resume)
    if problems:
        parser.exit(2, "jobs.train cannot start:\n" + "".join(f"  {p}\n" for p in problems))

    uri = tracking.resolve_tracking_uri(recipe.tracking.uri)
    runs = open_parent_run(uri, recipe, args.output, resume)
    outputs: dict[str, Path] = {}
    for name in names:
        stage = recipe.stages()[name]
        resuming = resume is not None and resume["stage"] == name
        if resuming:
            runs[name] = resume["mlflow_run_id"]
            tracking.reopen_run(uri, runs[name])
        else:
            runs[name] = tracking.start_run(uri, runs["experiment"], name, parent_run_id=runs["parent"])
        write_runs_file(args.output, uri, runs)
        try:
            outputs[name] = run_stage(
                recipe, name, stage, model=args.model, output=args.output, tracking_uri=uri, runs=runs,
                projector=None if resuming else starting_projector(stage, runs.get("stage1"), args.output),
                export=name == names[-1], resume_from=args.resume if resuming else None,
            )
        except BaseException:
            tracking.end_run(uri, runs[name], failed=True)
            tracking.end_run(uri, runs["parent"], failed=True)
            raise
        tracking.end_run(uri, runs[name])
    tracking.end_run(uri, runs["parent"])
    return outputs


def open_parent_run(tracking_uri: str, recipe: Recipe, output: Path, resume: dict | None) -> dict[str, str]:
    """The pipeline's parent run (new, or the resumed checkpoint's); returns the run-id map for ``RUNS_FILE``.

    A new parent run gets the resolved recipe as params and as ``recipe.yaml``.
    """
    experiment = recipe.tracking.experiment or recipe.name
    output.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        tracking.reopen_run(tracking_uri, resume["mlflow_parent_run_id"])
        earlier = json.loads((output / RUNS_FILE).read_text())["runs"] if (output / RUNS_FILE).exists() else {}
        return {**earlier, "experiment": experiment, "parent": resume["mlflow_parent_run_id"]}
    resolved = recipe.model_dump(mode="json")
    parent = tracking.start_run(tracking_uri, experiment, recipe.name, params=tracking.flatten(resolved))
    (output / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    tracking.log_artifact(tracking_uri, parent, output / "recipe.yaml")
    log(f"MLflow: {tracking_uri}, experiment {experiment!r}, run {parent}")
    return {"experiment": experiment, "parent": parent}


def write_runs_file(output: Path, tracking_uri: str, runs: dict[str, str]) -> None:
    (output / RUNS_FILE).write_text(json.dumps({"tracking_uri": tracking_uri, "runs": runs}, indent=1))


def read_position(checkpoint: str, s3_endpoint_url: str | None) -> dict[str, Any]:
    """The ``position.json`` that rank 0 wrote into a checkpoint (local path or ``s3://``)."""
    filesystem, path = filesystem_for(checkpoint, s3_endpoint_url)
    try:
        with filesystem.open_input_stream(f"{path.rstrip('/')}/{POSITION_FILE}") as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, OSError) as error:
        raise SystemExit(f"--resume {checkpoint}: no {POSITION_FILE} there ({error}); pass a checkpoint folder "
                         "written by jobs.train, e.g. <storage>/<recipe>-stage2/stage2-step00000400") from error


def preflight(recipe: Recipe, names: list[str], args, resume: dict | None) -> list[str]:
    """Everything that would fail later on a worker, checked before any worker starts (all at once)."""
    problems = []
    if not args.model or not args.output:
        return ["--model and --output are required"]
    if not is_remote(args.model) and not Path(args.model).is_dir():
        problems.append(f"--model: {args.model} is not a folder; create it with `python -m jobs.compose`")
    if resume is not None and not names:
        problems.append(f"--resume: the checkpoint is from {resume['stage']}, which --stage {args.stage} does not run")
    if resume is not None and resume.get("world_size") != recipe.scaling.num_workers:
        problems.append(f"scaling.num_workers: {recipe.scaling.num_workers}, but --resume {args.resume} was "
                        f"written by {resume.get('world_size')} workers (ZeRO state is sharded per worker)")
    for name in names:
        stage = recipe.stages().get(name)
        if stage is None:
            problems.append(f"{name}: the recipe has no such section")
            continue
        resuming = resume is not None and resume["stage"] == name
        problems += stage_problems(recipe, name, stage, args, first=name == names[0], resuming=resuming)
    return problems + gpu_problems(recipe.scaling)


def stage_problems(recipe: Recipe, name: str, stage: StageConfig, args, *, first: bool, resuming: bool) -> list[str]:
    """A stage's inputs exist, and no earlier run's checkpoints would be silently mixed in."""
    problems = []
    for path in stage.data.train_files:
        if not is_remote(path) and not Path(path).exists():
            problems.append(f"{name}.data.train_files: {path} does not exist")
    if stage.data.preprocessed:
        try:
            shard_files(stage.data.preprocessed, recipe_hash=stage_fingerprint(stage.data.model_dump(), args.model))
        except (ManifestError, OSError) as error:
            problems.append(f"{name}.data.preprocessed: {error}")
    init_from = stage.init_from
    if init_from == "stage1" and first and not resuming:
        example = f"{args.output}/stage1/{PROJECTOR_FILE} or runs:/<stage1 run>/{PROJECTOR_FILE}"
        problems.append(f"{name}.init_from: 'stage1' but stage 1 does not run here; give its projector, e.g. "
                        f"{name}.init_from={example}")
    elif init_from and init_from != "stage1" and not is_remote(init_from) and not Path(init_from).exists():
        problems.append(f"{name}.init_from: {init_from} does not exist; point it at a stage-1 {PROJECTOR_FILE}")
    filesystem, root = checkpoint_storage(recipe, args.output)
    run_dir = f"{root}/{recipe.name}-{name}"
    if not resuming and filesystem.get_file_info(run_dir).type != pafs.FileType.NotFound:
        saved = sorted(info.base_name for info in filesystem.get_file_info(pafs.FileSelector(run_dir))
                       if info.base_name.startswith(f"{name}-step"))
        problems.append(f"checkpoint.storage_path: {run_dir} already holds checkpoints of an earlier {name} run; "
                        f"continue it with --resume {run_dir}/{saved[-1] if saved else '<checkpoint>'}, or start "
                        "afresh with another --output or checkpoint.storage_path")
    return problems


def gpu_problems(scaling: ScalingSection) -> list[str]:
    if not (scaling.use_gpu and scaling.gpu_preflight):
        return []
    gpus = ray.cluster_resources().get("GPU", 0)
    needed = scaling.num_workers * scaling.gpus_per_worker
    if gpus < needed:
        return [f"scaling.use_gpu: {scaling.num_workers} workers x {scaling.gpus_per_worker} GPU need {needed:g} "
                f"GPUs; the Ray cluster has {gpus:g}. Use a CPU recipe (use_gpu: false, precision: fp32), or set "
                "scaling.gpu_preflight: false if GPU nodes start on demand"]
    return []


def starting_projector(stage: StageConfig, stage1_run: str | None, output: Path) -> str | None:
    """Stage 2 picks up stage 1's projector through MLflow (reachable from every node), or a given path."""
    if stage.init_from == "stage1":
        return f"runs:/{stage1_run}/{PROJECTOR_FILE}" if stage1_run else str(output / "stage1" / PROJECTOR_FILE)
    if stage.init_from and not is_remote(stage.init_from):
        return str(Path(stage.init_from).resolve())
    return stage.init_from


def rank_record_parts(recipe: Recipe, stage: StageConfig) -> list[ray.data.Dataset]:
    """The stage's raw records, shuffled with the recipe seed, split into one equal part per rank.

    Raw records are small (paths and text), so they are materialised and split here; the split is a
    pure function of the files and the seed, so a restarted rank gets the same records again.
    ``equal=True`` drops at most ``num_workers - 1`` records so that every rank gets the same count.
    """
    data, scaling = stage.data, recipe.scaling
    records = read_records(data.train_files, data.s3_endpoint_url, cpus_per_task=scaling.data_cpus_per_actor)
    return records.random_shuffle(seed=recipe.seed).split(scaling.num_workers, equal=True)


def streamed_rank_datasets(recipe: Recipe, stage: StageConfig, model: str, quarantine) -> tuple[list, list[int]]:
    """One preprocessing pipeline per rank over its part of the records (``rank_record_parts``).

    Images are read and tiled later, streaming, by each rank's own pipeline, in a fixed order, so a
    restarted rank sees the same rows again.

    Returns:
        The per-rank datasets and each rank's number of records.
    """
    data, scaling = stage.data, recipe.scaling
    parts = rank_record_parts(recipe, stage)
    return [preprocess(part, processor_path=model, template=data.template, image_mode=data.image_mode,
                       max_length=data.model_max_length, truncation=data.truncation,
                       max_image_pixels=data.max_image_pixels, image_root=data.image_root,
                       s3_endpoint_url=data.s3_endpoint_url, quarantine=quarantine,
                       cpus_per_actor=scaling.data_cpus_per_actor)[0] for part in parts], [p.count() for p in parts]


def preprocessed_rank_datasets(stage: StageConfig, model: str, num_workers: int) -> tuple[list, dict]:
    """Each rank reads its own share of ``jobs.preprocess``'s Parquet files, in manifest order.

    With fewer files than workers the rows are split instead (that materialises them in the object store).

    Returns:
        The per-rank datasets and the manifest (counts of read, kept and quarantined records).
    """
    files, manifest = shard_files(stage.data.preprocessed,
                                  recipe_hash=stage_fingerprint(stage.data.model_dump(), model))
    if len(files) >= num_workers:
        return [ray.data.read_parquet(files[rank::num_workers]) for rank in range(num_workers)], manifest
    return ray.data.read_parquet(files).split(num_workers, equal=True), manifest


def deepspeed_config_for(stage: StageConfig, scaling: ScalingSection) -> dict[str, Any]:
    """The stage's DeepSpeed config for the recipe's worker count."""
    return build_deepspeed_config(
        global_batch_size=stage.global_batch_size, micro_batch_size=stage.micro_batch_size,
        world_size=scaling.num_workers, zero_stage=stage.deepspeed.zero_stage, precision=stage.deepspeed.precision,
        offload_optimizer=stage.deepspeed.offload_optimizer, max_grad_norm=stage.optim.max_grad_norm,
        weight_decay=stage.optim.weight_decay, lr=stage.optim.lr, use_gpu=scaling.use_gpu,
        param_persistence_threshold=stage.deepspeed.zero3_param_persistence_threshold,
    )


def run_stage(recipe: Recipe, name: str, stage: StageConfig, *, model: str, projector: str | None, output: Path,
              export: bool, tracking_uri: str, runs: dict[str, str], resume_from: str | None) -> Path:
    """Train one stage on streamed (or materialised) rows; return its output folder.

    Args:
        projector: the projector to start from (path or ``runs:/`` URI), or ``None``.
        export: write (and, for stage 2, register) a Hugging Face export at the end.
        runs: MLflow run ids (``parent`` and this stage's).
        resume_from: a checkpoint to start from; the trainer then gets a new run name, so that Ray
            Train does not restore the latest checkpoint of the original run instead.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data, scaling, workers = stage.data, recipe.scaling, recipe.scaling.num_workers
    quarantine, manifest = None, None
    if data.preprocessed:
        parts, manifest = preprocessed_rank_datasets(stage, model, workers)
        records_per_rank = [part.count() for part in parts]  # Parquet metadata, nothing is read
    else:
        quarantine = QuarantineLog.remote()
        parts, records_per_rank = streamed_rank_datasets(recipe, stage, model, quarantine)
    if data.materialize:
        log(f"{name}: reading every worker's rows into the object store (data.materialize)")
        parts = [part.materialize() for part in parts]
    datasets = {f"rank{rank}": part for rank, part in enumerate(parts)}
    steps_per_epoch = max(1, min(records_per_rank) * workers // stage.global_batch_size)  # the shortest rank ends it
    total_steps = min(stage.max_steps or 10**12, stage.epochs * steps_per_epoch)
    deepspeed = deepspeed_config_for(stage, scaling)
    stage_dir = (output / name).resolve()
    stage_dir.mkdir(parents=True, exist_ok=True)
    derived = {"total_steps": total_steps, "gradient_accumulation_steps": deepspeed["gradient_accumulation_steps"],
               "world_size": workers, "records": sum(records_per_rank)}
    run_id = runs[name]
    if resume_from is None:
        tracking.log_params(tracking_uri, run_id, {**tracking.flatten(stage.model_dump(mode="json")),
                                                   **{k: str(v) for k, v in derived.items()}})
    log(f"{name}: {sum(records_per_rank)} records ({records_per_rank[0]} per worker), {derived}, "
        f"ZeRO-{stage.deepspeed.zero_stage}")
    lora = stage.lora.model_dump() if stage.lora else None
    config = {
        "stage": name, "output": str(stage_dir), "export": export, "register": export and name == "stage2",
        "projector": projector,
        "resume_from": resume_from and filesystem_for(resume_from, recipe.checkpoint.s3_endpoint_url),
        "faults": fault_from_env(stage_dir, workers),
        "engine": {
            "model_path": model if is_remote(model) else str(Path(model).resolve()),
            "tunable": list(stage.tunable), "lora": lora, "lr": stage.optim.lr,
            "projector_lr": stage.optim.projector_lr, "vision_tower_lr": stage.optim.vision_tower_lr,
            "weight_decay": stage.optim.weight_decay, "scheduler": stage.optim.scheduler,
            "warmup_ratio": stage.optim.warmup_ratio, "total_steps": total_steps, "deepspeed_config": deepspeed,
            "gradient_checkpointing": stage.deepspeed.gradient_checkpointing,
        },
        "zero_stage": stage.deepspeed.zero_stage, "epochs": stage.epochs, "seed": recipe.seed,
        "micro_batch": stage.micro_batch_size, "group_window": 32 * stage.micro_batch_size,
        "group_by_length": data.group_by_modality_length, "anyres": data.image_mode == "anyres",
        "backend": "nccl" if scaling.use_gpu else "gloo", "checkpoint_every": recipe.checkpoint.every_n_steps,
        "tracking_uri": tracking_uri, "mlflow_run_id": run_id, "mlflow_parent_run_id": runs["parent"],
        "system_metrics_interval_s": recipe.tracking.system_metrics_interval_s if recipe.tracking.system_metrics
        else None,
        "registered_model": recipe.tracking.registered_model or recipe.name,
    }
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same micro-batches, in the same order, after a restart
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    storage, storage_path = checkpoint_storage(recipe, output)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
                                     placement_strategy=scaling.placement_strategy),
        run_config=RunConfig(
            storage_path=storage_path, storage_filesystem=storage,
            name=f"{recipe.name}-{name}" + (time.strftime("-resumed-%Y%m%d-%H%M%S") if resume_from else ""),
            failure_config=FailureConfig(max_failures=recipe.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.checkpoint.num_to_keep),
        ),
    )
    result = trainer.fit()
    if quarantine is not None:
        report = finish(quarantine, stage_dir / "quarantine.jsonl")
        tracking.log_artifact(tracking_uri, run_id, stage_dir / "quarantine.jsonl")
    else:
        report = PreprocessReport(**manifest["counts"])
    tracking.log_metrics(tracking_uri, run_id, report.as_metrics(), step=total_steps)
    log(f"{name}: done; latest checkpoint {result.checkpoint.path if result.checkpoint else None}")
    return stage_dir


def checkpoint_storage(recipe: Recipe, output: Path):
    """``(filesystem, path)`` of the checkpoint storage: ``checkpoint.storage_path`` or ``<output>/checkpoints``."""
    return filesystem_for(recipe.checkpoint.storage_path or str(output / "checkpoints"),
                          recipe.checkpoint.s3_endpoint_url)


def fault_from_env(stage_dir: Path, workers: int) -> list[dict[str, Any]]:
    """``LLAVA_TRAIN_KILL_WORKER_AT_STEP=<step>[:<rank>[:kill|hang|checkpoint]][,...]`` -> the workers'
    fault-injection settings, one per comma-separated fault (each fires once).

    ``kill`` (default) SIGKILLs the worker right after that optimizer step; ``hang`` stops it there
    until something outside kills it (a test that removes the worker's node); ``checkpoint`` kills it
    halfway through writing its part of that step's checkpoint (the step must be a checkpoint step).
    The rank defaults to the last one.
    """
    faults = []
    for spec in filter(None, os.environ.get(KILL_AT_STEP_ENV, "").split(",")):
        step, rank, action = (spec.split(":") + ["", ""])[:3]
        if action not in ("", "kill", "hang", "checkpoint"):
            raise ValueError(f"{KILL_AT_STEP_ENV}={spec}: the action is kill (default), hang or checkpoint")
        fault = {"step": int(step), "rank": int(rank or workers - 1), "action": action or "kill"}
        faults.append({**fault, "marker": str(stage_dir / FAULT_MARKER.format(**fault))})
    return faults


if __name__ == "__main__":
    main()
