"""Staged training with Ray Train + DeepSpeed on the Ray Data pipeline, tracked in MLflow.

    python -m jobs.train --recipe tiny_cpu_demo --model outputs/initial --output outputs/train --stage all
    ray job submit --working-dir . -- python -m jobs.train --recipe llava15_7b --model /mnt/shared/initial \\
        --output /mnt/shared/train --stage all
    python -m jobs.train ... --resume outputs/train/checkpoints/tiny-cpu-demo-stage2/stage2-step00000400

``--model`` is the composed starting checkpoint (``jobs.compose``). Stage 1 trains the projector and
writes ``<output>/stage1/projector.safetensors``; stage 2 starts from ``--model`` plus that projector
(or ``stage2.init_from``: a path or a ``runs:/<id>/projector.safetensors`` URI) and writes a Hugging
Face export to ``<output>/stage2/export``, registered in MLflow under ``tracking.registered_model``.
Stage 3 (DPO, when the recipe has it) starts from that export (``stage3.init_from``), first preprocesses
its preference pairs with their reference log-probabilities into ``stage3.data.preprocessed`` (reused
when they match), and exports and registers the aligned model instead.

Checkpoints (full DeepSpeed state + data position) go to ``checkpoint.storage_path`` every
``checkpoint.every_n_steps`` steps. A dead worker restarts the worker group from the latest one
(``checkpoint.max_failures``); ``--resume <checkpoint>`` continues a stopped run from any kept one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyarrow.fs as pafs
import ray
import yaml

from jobs.console import LineRelay, PreflightError, job_log, job_log_file, start_ray
from jobs.faults import Faults
from jobs.preprocess import run as preprocess_stage
from jobs.preprocess import stage_shards
from jobs.train_steps import shard_batches
from jobs.train_worker import POSITION_FILE, train_loop_per_worker
from llava_platform import tracking
from llava_platform.config import recipe_argument_parser, recipe_from_args
from llava_platform.config.build import deepspeed_spec, pack_cost
from llava_platform.config.schema import PreferenceStageConfig, Recipe, StageConfig
from llava_platform.config.schema import ScalingConfig as ScalingSection
from llava_platform.data.mixture import MixtureError
from llava_platform.data.position import STREAMED_ORDER, DataPosition
from llava_platform.storage import filesystem_for, is_remote
from llava_platform.train.checkpoint import EXPORT_DIR, PROJECTOR_FILE
from llava_platform.train.plan import LoopSpec, ResumePoint, ShardRows, StagePlan, TrackingSpec
from pipelines.preprocess import finish, preprocess
from pipelines.quarantine import PreprocessReport, start_quarantine_log
from pipelines.shards import ManifestError, RowReader, StageShards, shard_layout, source_metrics
from pipelines.sources import describe_mixture, plan_sources, read_planned, source_image_roots

GROUP_WINDOW_MICRO_BATCHES = 32
"""Streamed stages: micro-batches' worth of rows regrouped at a time (``LoopSpec.group_window``)."""
RUNS_FILE = "mlflow_runs.json"
"""Written into ``--output`` for users and scripts: the tracking URI, experiment and MLflow run ids
(``parent``, ``stage1``, ``stage2``); ``run`` returns the same in its ``TrainResult``."""


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    stage_dirs: dict[str, Path]
    """Output folder per stage that ran (``projector.safetensors``, ``export/`` for the last)."""
    tracking_uri: str
    runs: dict[str, str]
    """MLflow ids: ``experiment`` (its name), ``parent``, and one run per stage."""


log = job_log("train")
"""This job's lines on standard error (``jobs.console.say``)."""


def main(argv: list[str] | None = None) -> TrainResult:
    parser = recipe_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["1", "2", "3", "all"], default="all")
    parser.add_argument("--model", help="the composed starting checkpoint (jobs.compose output)")
    parser.add_argument("--output", type=Path, help="folder for stage outputs")
    parser.add_argument("--resume", help="a checkpoint folder (local or s3://) to continue from")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after options
    recipe = recipe_from_args(parser, args)
    if not args.model or not args.output:
        parser.exit(2, "jobs.train cannot start:\n  --model and --output are required\n")
    try:
        return run(recipe, model=args.model, output=args.output, stage=args.stage, resume=args.resume)
    except PreflightError as error:
        parser.exit(2, str(error))


def run(recipe: Recipe, *, model: str, output: Path, stage: str = "all", resume: str | None = None) -> TrainResult:
    """Train the recipe's stages (``stage``: ``1``, ``2``, ``3`` or ``all``) from ``model`` into ``output``.

    Args:
        model: the composed starting checkpoint (``jobs.compose``).
        resume: a checkpoint folder (local or ``s3://``) to continue from; earlier stages are taken as done.

    Raises:
        PreflightError: what would fail later on a worker, found before any worker starts.
    """
    output = Path(output)
    point = read_resume_point(resume, recipe.checkpoint.s3_endpoint_url) if resume else None
    names = list(recipe.stages()) if stage == "all" else [f"stage{stage}"]
    if point is not None:  # earlier stages are done; their outputs are already in output
        names = names[names.index(point.position.stage):] if point.position.stage in names else []

    job_log_file(output / "job.log")
    start_ray()
    problems = preflight(recipe, names, model=model, output=output, stage=stage, resume=point, resume_from=resume)
    if problems:
        raise PreflightError("train", problems)

    uri = tracking.resolve_tracking_uri(recipe.tracking.uri)
    runs = open_parent_run(uri, recipe, output, point)
    stage_dirs: dict[str, Path] = {}
    for name in names:
        stage_config = recipe.stages()[name]
        resuming = point is not None and point.position.stage == name
        if resuming:
            runs[name] = point.mlflow_run_id
            tracking.reopen_run(uri, runs[name])
        else:
            runs[name] = tracking.start_run(uri, runs["experiment"], name, parent_run_id=runs["parent"])
        write_runs_file(output, uri, runs)
        try:
            start = stage_model(stage_config, model, output)
            if isinstance(stage_config, PreferenceStageConfig):
                prepare_pairs(recipe, name, start)
            stage_dirs[name] = run_stage(
                recipe, name, stage_config, model=start, output=output, tracking_uri=uri, runs=runs,
                projector=None if resuming else starting_projector(stage_config, runs.get("stage1"), output),
                export=name == names[-1] or starts_stage3(recipe, name, names),
                resume_from=resume if resuming else None,
            )
        except BaseException:
            tracking.end_run(uri, runs[name], failed=True)
            tracking.end_run(uri, runs["parent"], failed=True)
            raise
        tracking.end_run(uri, runs[name])
    tracking.end_run(uri, runs["parent"])
    return TrainResult(stage_dirs=stage_dirs, tracking_uri=uri, runs=dict(runs))


def stage_model(stage: StageConfig, model: str, output: Path) -> str:
    """The checkpoint a stage starts from: ``model`` (``--model``) and a projector for stages 1 and 2; for stage 3
    the whole model named by ``init_from`` (``stage2``: this run's stage-2 export), else ``model``."""
    if not isinstance(stage, PreferenceStageConfig) or stage.init_from is None:
        return model
    if stage.init_from == "stage2":
        return str(output / "stage2" / EXPORT_DIR)
    return stage.init_from


def starts_stage3(recipe: Recipe, name: str, names: list[str]) -> bool:
    """Whether stage ``name``'s export is where this run's stage 3 starts (so it exports, not only the last)."""
    stage3 = recipe.stage3
    return name == "stage2" and "stage3" in names and stage3 is not None and stage3.init_from == "stage2"


def prepare_pairs(recipe: Recipe, name: str, model: str) -> None:
    """Stage 3's preference rows with their reference log-probabilities by ``model`` in ``data.preprocessed``:
    reused when their manifest matches (the same data, settings and reference weights), written otherwise."""
    folder = recipe.stages()[name].data.preprocessed
    try:
        stage_shards(recipe, name, model).files()
        log(f"{name}: reusing the preference shards and reference log-probabilities in {folder}")
    except ManifestError:
        log(f"{name}: preprocessing the preference pairs and their reference log-probabilities -> {folder}")
        preprocess_stage(recipe, stage=name, model=model, output=folder, overwrite=True)


def open_parent_run(tracking_uri: str, recipe: Recipe, output: Path, resume: ResumePoint | None) -> dict[str, str]:
    """The pipeline's parent run (new, or the resumed checkpoint's); returns the run-id map for ``RUNS_FILE``.

    A new parent run gets the resolved recipe as params and as ``recipe.yaml``.
    """
    experiment = recipe.tracking.experiment or recipe.name
    output.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        tracking.reopen_run(tracking_uri, resume.mlflow_parent_run_id)
        earlier = json.loads((output / RUNS_FILE).read_text())["runs"] if (output / RUNS_FILE).exists() else {}
        return {**earlier, "experiment": experiment, "parent": resume.mlflow_parent_run_id}
    resolved = recipe.model_dump(mode="json")
    parent = tracking.start_run(tracking_uri, experiment, recipe.name, params=tracking.flatten(resolved))
    (output / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    tracking.log_artifact(tracking_uri, parent, output / "recipe.yaml")
    log(f"MLflow: {tracking_uri}, experiment {experiment!r}, run {parent}")
    return {"experiment": experiment, "parent": parent}


def write_runs_file(output: Path, tracking_uri: str, runs: dict[str, str]) -> None:
    (output / RUNS_FILE).write_text(json.dumps({"tracking_uri": tracking_uri, "runs": runs}, indent=1))


def read_resume_point(checkpoint: str, s3_endpoint_url: str | None) -> ResumePoint:
    """The ``position.json`` that rank 0 wrote into a checkpoint (local path or ``s3://``).

    Raises:
        PreflightError: no such file there.
    """
    filesystem, path = filesystem_for(checkpoint, s3_endpoint_url)
    try:
        with filesystem.open_input_stream(f"{path.rstrip('/')}/{POSITION_FILE}") as stream:
            return ResumePoint.from_dict(json.loads(stream.read()))
    except (FileNotFoundError, OSError) as error:
        raise PreflightError("train", [f"--resume {checkpoint}: no {POSITION_FILE} there ({error}); pass a checkpoint "
                              "folder written by jobs.train, e.g. <storage>/<recipe>-stage2/stage2-step00000400"]
                             ) from error
    except ValueError as error:
        raise PreflightError("train", [f"--resume {checkpoint}: {error}"]) from error


def preflight(recipe: Recipe, names: list[str], *, model: str, output: Path, stage: str = "all",
              resume: ResumePoint | None = None, resume_from: str | None = None) -> list[str]:
    """Everything that would fail later on a worker, checked before any worker starts (all at once)."""
    problems = []
    if not is_remote(model) and not Path(model).is_dir():
        problems.append(f"--model: {model} is not a folder; create it with `python -m jobs.compose`")
    if resume is not None and not names:
        problems.append(f"--resume: the checkpoint is from {resume.position.stage}, which --stage {stage} does not run")
    for name in names:
        stage_config = recipe.stages().get(name)
        if stage_config is None:
            problems.append(f"{name}: the recipe has no such section")
            continue
        resuming = resume is not None and resume.position.stage == name
        problems += stage_problems(recipe, name, stage_config, model=model, output=output, first=name == names[0],
                                   resuming=resuming)
        if resuming:
            problems += resume_problems(recipe, name, stage_config, stage_model(stage_config, model, output), resume)
    return problems + gpu_problems(recipe.scaling)


def resume_problems(recipe: Recipe, name: str, stage: StageConfig, model: str, resume: ResumePoint) -> list[str]:
    """The checkpoint continues this stage's rows: the same data, order and batches, and for a streamed stage
    the same worker count (each worker streams its own part of the records)."""
    try:
        planned = stage_data(recipe, name, stage, model)[0]
    except (ManifestError, OSError):
        return []  # stage_problems reports the shards
    saved = resume.position.data
    problems = [f"--resume: the checkpoint's data differs from {name}'s: {', '.join(changed)}; resume with the "
                "recipe (and shards) it was written with, or start the stage afresh"
                for changed in [saved.differences(planned)] if changed]
    workers = recipe.scaling.num_workers
    if saved.order_version == STREAMED_ORDER and resume.world_size not in (None, workers):
        problems.append(f"--resume: {name} streams its rows, each of {resume.world_size} workers its own part, and "
                        f"this run has {workers}: set scaling.num_workers={resume.world_size}, or preprocess the stage "
                        f"({name}.data.preprocessed) to resume on any worker count")
    return problems


def stage_problems(recipe: Recipe, name: str, stage: StageConfig, *, model: str, output: Path, first: bool,
                   resuming: bool) -> list[str]:
    """A stage's inputs exist, and no earlier run's checkpoints would be silently mixed in."""
    problems = []
    for path in stage.data.train_files:
        if not is_remote(path) and not Path(path).exists():
            problems.append(f"{name}.data.train_files: {path} does not exist")
    if isinstance(stage, PreferenceStageConfig):  # its rows are written before it starts (prepare_pairs)
        problems += preference_problems(name, stage, output=output, first=first, resuming=resuming)
    elif stage.data.preprocessed:
        try:
            StageShards.of(stage.data, model, seed=recipe.seed).files()
        except (ManifestError, MixtureError, OSError) as error:
            problems.append(f"{name}.data.preprocessed: {error}")
    init_from = None if isinstance(stage, PreferenceStageConfig) else stage.init_from  # stage 3's: above
    if init_from == "stage1" and first and not resuming:
        example = f"{output}/stage1/{PROJECTOR_FILE} or runs:/<stage1 run>/{PROJECTOR_FILE}"
        problems.append(f"{name}.init_from: 'stage1' but stage 1 does not run here; give its projector, e.g. "
                        f"{name}.init_from={example}")
    elif init_from and init_from != "stage1" and not is_remote(init_from) and not Path(init_from).exists():
        problems.append(f"{name}.init_from: {init_from} does not exist; point it at a stage-1 {PROJECTOR_FILE}")
    filesystem, root = checkpoint_storage(recipe, output)
    run_dir = f"{root}/{recipe.name}-{name}"
    if not resuming and filesystem.get_file_info(run_dir).type != pafs.FileType.NotFound:
        saved = sorted(info.base_name for info in filesystem.get_file_info(pafs.FileSelector(run_dir))
                       if info.base_name.startswith(f"{name}-step"))
        problems.append(f"checkpoint.storage_path: {run_dir} already holds checkpoints of an earlier {name} run; "
                        f"continue it with --resume {run_dir}/{saved[-1] if saved else '<checkpoint>'}, or start "
                        "afresh with another --output or checkpoint.storage_path")
    return problems


def preference_problems(name: str, stage: PreferenceStageConfig, *, output: Path, first: bool,
                        resuming: bool) -> list[str]:
    """Stage 3's starting model exists, or an earlier stage of this run writes it."""
    init_from = stage.init_from
    if init_from == "stage2" and first and not resuming and not (output / "stage2" / EXPORT_DIR).is_dir():
        return [f"{name}.init_from: 'stage2' but stage 2 does not run here and {output / 'stage2' / EXPORT_DIR} does "
                f"not exist; run --stage all, or set {name}.init_from to an export folder"]
    if init_from not in (None, "stage2") and not is_remote(init_from) and not Path(init_from).is_dir():
        return [f"{name}.init_from: {init_from} is not a folder; point it at a Hugging Face export (e.g. "
                f"<output>/stage2/{EXPORT_DIR})"]
    return []


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
    """Stage 2 picks up stage 1's projector through MLflow (reachable from every node), or a given path; stage 3
    starts from a whole model (``stage_model``), no projector."""
    if isinstance(stage, PreferenceStageConfig):
        return None
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
    plans = plan_sources(data.train_files, seed=recipe.seed, s3_endpoint_url=data.s3_endpoint_url)
    records = read_planned(plans, data.s3_endpoint_url, cpus_per_task=scaling.data_cpus_per_actor)
    return in_order(records).random_shuffle(seed=recipe.seed).split(scaling.num_workers, equal=True)


def in_order(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """``dataset`` set to keep its blocks in order whenever it is executed (``materialize``, ``split``, a
    shuffle's input): Ray Data otherwise hands a multi-file read's blocks on as they finish, so the rows'
    order, and with it every step's micro-batch, would change from run to run."""
    dataset.context.execution_options.preserve_order = True
    return dataset


def streamed_rank_datasets(recipe: Recipe, stage: StageConfig, model: str, quarantine) -> tuple[list, list[int]]:
    """One preprocessing pipeline per rank over its part of the records (``rank_record_parts``).

    Images are read and tiled later, streaming, by each rank's own pipeline, in a fixed order, so a
    restarted rank sees the same rows again.

    Returns:
        The per-rank datasets and each rank's number of records.
    """
    parts = rank_record_parts(recipe, stage)
    spec, roots = stage.data.row_spec(), source_image_roots(stage.data.train_files, stage.data.s3_endpoint_url)
    return [preprocess(part, processor_path=model, spec=spec, quarantine=quarantine, image_roots=roots,
                       cpus_per_actor=recipe.scaling.data_cpus_per_actor)[0] for part in parts], \
        [part.count() for part in parts]


def stage_data(recipe: Recipe, name: str, stage: StageConfig,
               model: str) -> tuple[DataPosition, ShardRows | None, dict | None]:
    """What the stage's order is drawn over, at its start (``TrainingPosition.data``), and for a preprocessed
    stage its shards, read by id, and their manifest (``None`` for a streamed stage).

    Raises:
        ManifestError: the preprocessed shards do not match the stage (``preflight`` reports it first).
    """
    data = stage.data
    start = dict(seed=recipe.seed, global_batch=stage.global_batch_size, micro_batch=stage.micro_batch_size)
    if not data.preprocessed:
        mixture = describe_mixture(data.train_files, seed=recipe.seed, s3_endpoint_url=data.s3_endpoint_url)
        return DataPosition(fingerprint=StageShards.fingerprint_of(data, model, mixture), order_version=STREAMED_ORDER,
                            **start), None, None
    files, manifest = stage_shards(recipe, name, model).files()
    layout = shard_layout(files, manifest)
    packing = data.packing.build(pack_cost(recipe, stage)) if data.packing else None
    shards = ShardRows(files=layout.files, block_sizes=layout.block_sizes, window_blocks=data.shuffle_row_groups,
                       packing=packing)
    return DataPosition(fingerprint=layout.fingerprint, order_version=data.order_version(), **start), shards, manifest


@dataclass(frozen=True)
class EpochSteps:
    """Optimizer steps per epoch of a stage (and the units they take: rows, or packs)."""

    per_epoch: list[int]
    units: int = 0


def shard_steps(recipe: Recipe, stage: StageConfig, shards: ShardRows) -> EpochSteps:
    """The steps of every epoch of a preprocessed stage, from its global batches (packed: the packs of every
    epoch are planned here, as the workers will plan them)."""
    loop = stage_loop(recipe, stage, shards)
    batches = shard_batches(loop, RowReader(shards.files, cache_blocks=1))
    return EpochSteps([batches.steps_in(epoch) for epoch in range(stage.epochs)],
                      units=sum(len(batches.units(epoch)) for epoch in range(stage.epochs)))


def stage_loop(recipe: Recipe, stage: StageConfig, shards: ShardRows | None) -> LoopSpec:
    """How the stage's workers walk through its rows."""
    return LoopSpec(epochs=stage.epochs, micro_batch_size=stage.micro_batch_size,
                    global_batch_size=stage.global_batch_size,
                    group_by_modality_length=stage.data.group_by_modality_length,
                    token_mean_loss=stage.loss == "token_mean", seed=recipe.seed,
                    anyres=stage.data.image_mode == "anyres", checkpoint_every=recipe.checkpoint.every_n_steps,
                    shards=shards, group_window=GROUP_WINDOW_MICRO_BATCHES * stage.micro_batch_size,
                    async_upload=recipe.checkpoint.upload == "async")


def stage_plan(recipe: Recipe, name: str, stage: StageConfig, *, model: str, projector: str | None, output: Path,
               export: bool, total_steps: int, tracking_uri: str, runs: dict[str, str],
               resume_from: str | None, data: DataPosition, shards: ShardRows | None) -> StagePlan:
    """Resolve one stage for the workers: every setting they read, and every derived value, computed here."""
    scaling = recipe.scaling
    deepspeed = deepspeed_spec(recipe, stage, model, total_steps)
    loop = stage_loop(recipe, stage, shards)
    settings = recipe.tracking
    track = TrackingSpec(
        uri=tracking_uri, run_id=runs[name], parent_run_id=runs["parent"],
        system_metrics_interval_s=settings.system_metrics_interval_s if settings.system_metrics else None,
        registered_model=(settings.registered_model or recipe.name) if export and name != "stage1" else None,
    )
    preference = stage.preference.build() if isinstance(stage, PreferenceStageConfig) else None
    return StagePlan(stage=name, output=str((output / name).resolve()), deepspeed=deepspeed, loop=loop, data=data,
                     tracking=track, projector=projector, export=export, preference=preference,
                     export_shard_bytes=recipe.checkpoint.export_shard_mb * 2**20, resume_from=resume_from,
                     storage_endpoint_url=recipe.checkpoint.s3_endpoint_url,
                     backend="nccl" if scaling.use_gpu else "gloo")


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
    start, shards, manifest = stage_data(recipe, name, stage, model)
    quarantine, datasets = None, {}
    if shards is not None:  # rows by id: every worker reads the shards itself, no Ray dataset
        records = sum(shards.block_sizes)
        steps = shard_steps(recipe, stage, shards)  # per epoch; the last step of each takes the rest
        described = f"{records} rows by id from {len(shards.files)} shard(s)" + (
            f", packed ({steps.units} packs over {stage.epochs} epoch(s))" if shards.packing else "")
    else:
        quarantine = start_quarantine_log()
        parts, records_per_rank = streamed_rank_datasets(recipe, stage, model, quarantine)
        if data.materialize:
            log(f"{name}: reading every worker's rows into the object store (data.materialize)")
            parts = [in_order(part).materialize() for part in parts]
        datasets = {f"rank{rank}": part for rank, part in enumerate(parts)}
        records = sum(records_per_rank)
        steps = EpochSteps([max(1, min(records_per_rank) * workers // stage.global_batch_size)] * stage.epochs)
        described = f"{records} records streamed ({records_per_rank[0]} per worker)"  # the shortest rank ends an epoch
    total_steps = min(stage.max_steps or 10**12, sum(steps.per_epoch))
    plan = stage_plan(recipe, name, stage, model=model, projector=projector, output=output, export=export,
                      total_steps=total_steps, tracking_uri=tracking_uri, runs=runs, resume_from=resume_from,
                      data=start, shards=shards)
    stage_dir = Path(plan.output)
    stage_dir.mkdir(parents=True, exist_ok=True)
    derived = {"total_steps": total_steps, "gradient_accumulation_steps": plan.deepspeed.gradient_accumulation_steps,
               "world_size": workers, "records": records}
    run_id = runs[name]
    if resume_from is None:
        tracking.log_params(tracking_uri, run_id, {**tracking.flatten(stage.model_dump(mode="json")),
                                                   **{k: str(v) for k, v in derived.items()}})
    log(f"{name}: {described}, {derived}, ZeRO-{stage.deepspeed.zero_stage}")
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same micro-batches, in the same order, after a restart
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    storage, storage_path = checkpoint_storage(recipe, output)
    relay = LineRelay()
    trainer = TorchTrainer(
        partial(train_loop_per_worker, plan, Faults.from_env(stage_dir, workers), relay),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
        scaling_config=ScalingConfig(num_workers=(scaling.min_workers, workers) if scaling.min_workers else workers,
                                     use_gpu=scaling.use_gpu, resources_per_worker=resources,
                                     placement_strategy=scaling.placement_strategy,
                                     elastic_resize_monitor_interval_s=scaling.elastic_resize_interval_s),
        run_config=RunConfig(
            storage_path=storage_path, storage_filesystem=storage,
            name=f"{recipe.name}-{name}" + (time.strftime("-resumed-%Y%m%d-%H%M%S") if resume_from else ""),
            failure_config=FailureConfig(max_failures=recipe.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.checkpoint.num_to_keep),
        ),
    )
    with relay.relaying():  # rank 0's lines (progress, resume, export) on this console
        result = trainer.fit()
    if quarantine is not None:
        report = finish(quarantine, stage_dir / "quarantine.jsonl")
        tracking.log_artifact(tracking_uri, run_id, stage_dir / "quarantine.jsonl")
    else:
        report = PreprocessReport(**manifest["counts"])
        tracking.log_metrics(tracking_uri, run_id, source_metrics(manifest.get("sources", [])), step=total_steps)
    tracking.log_metrics(tracking_uri, run_id, report.as_metrics(), step=total_steps)
    log(f"{name}: done; latest checkpoint {result.checkpoint.path if result.checkpoint else None}")
    return stage_dir


def checkpoint_storage(recipe: Recipe, output: Path):
    """``(filesystem, path)`` of the checkpoint storage: ``checkpoint.storage_path`` or ``<output>/checkpoints``."""
    return filesystem_for(recipe.checkpoint.storage_path or str(output / "checkpoints"),
                          recipe.checkpoint.s3_endpoint_url)


if __name__ == "__main__":
    main()
