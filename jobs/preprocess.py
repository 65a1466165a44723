"""Preprocess a recipe stage's data with Ray Data into Parquet shards + manifest + quarantine.

Tiles and tokens follow the processor of ``--model`` (a checkpoint, e.g. from ``jobs.compose``), so
training on the shards matches what that checkpoint expects. Training can also skip this job and
stream the same pipeline straight into its workers. Stage 3 (DPO) reads preference records into pair
rows and runs ``--model``, its starting policy, once over them for the reference log-probabilities
(``pipelines.reference``); ``jobs.train`` does that itself before the stage when the shards are missing.

    python -m jobs.preprocess --recipe tiny_cpu_demo --stage 2 --model outputs/initial --output outputs/shards
    ray job submit --working-dir . -- python -m jobs.preprocess --recipe llava15_7b --stage 2 \\
        --model s3://bucket/llava15-7b/initial --output /mnt/shards/llava15-7b-stage2
    python -m jobs.preprocess --recipe llava_onevision_qwen2_7b_dpo --stage 3 --model /mnt/models/ov-7b-si \
        --output /mnt/shards/ov7b-dpo
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ray

from jobs.console import PROGRESS_EVERY_S, duration, every, start_ray
from llava_platform.config import Recipe, recipe_argument_parser, recipe_from_args
from llava_platform.config.schema import PreferenceStageConfig, StageConfig
from llava_platform.data.mixture import MixtureError
from pipelines.preprocess import preprocess
from pipelines.quarantine import PreprocessReport
from pipelines.reference import ReferencePass
from pipelines.shards import ManifestError, StageShards, source_table
from pipelines.sources import plan_sources, read_planned


@dataclass(frozen=True)
class PreprocessResult:
    """What a preprocessing run wrote (``manifest.json`` holds the same)."""

    output: Path
    """The folder: ``shards/``, ``manifest.json``, ``quarantine.jsonl``."""
    shards: tuple[str, ...]
    """Parquet file names under ``shards/``, in manifest order."""
    report: PreprocessReport
    """Records read, kept and quarantined (by reason)."""
    fingerprint: str
    """What shaped the rows (``StageShards.fingerprint_of``); training checks it."""


def main(argv: list[str] | None = None) -> PreprocessResult:
    parser = recipe_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["1", "2", "3"], default="2", help="whose data section to preprocess")
    parser.add_argument("--model", help="checkpoint directory whose processor tiles and tokenises (stage 3: the "
                                        "starting policy, also the frozen reference)")
    parser.add_argument("--output", type=Path, help="folder for shards/, manifest.json, quarantine.jsonl")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run in --output")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after options
    recipe = recipe_from_args(parser, args)
    if f"stage{args.stage}" not in recipe.stages():
        parser.exit(2, f"recipe {recipe.name} has no stage{args.stage} section\n")
    if not args.model or not args.output:
        parser.error("--model and --output are required")
    try:
        return run(recipe, stage=f"stage{args.stage}", model=args.model, output=args.output, overwrite=args.overwrite)
    except ManifestError as error:
        parser.exit(2, f"--output: {error}\n")
    except MixtureError as error:
        parser.exit(2, f"{error}\n")


def run(recipe: Recipe, *, stage: str, model: str, output: str | Path, overwrite: bool = False) -> PreprocessResult:
    """Preprocess ``stage``'s data with ``model``'s processor into ``output``.

    Raises:
        ManifestError: ``output`` holds shards of an earlier run and ``overwrite`` is false.
    """
    start_ray()
    config = recipe.stages()[stage]
    data, scoring = config.data, reference_pass(recipe, config, model)
    plans = plan_sources(data.train_files, seed=recipe.seed, s3_endpoint_url=data.s3_endpoint_url)
    total = sum(plan.taken for plan in plans)
    print(f"[preprocess] {stage}: {total:,} records in {len(plans)} file(s) -> {output}", flush=True)
    for plan in plans if any(plan.source.origin for plan in plans) else ():  # a mixture: each source's share
        print(f"[preprocess]   {plan.source.path}: {plan.source.rule}, {plan.taken:,} of {plan.rows:,}", flush=True)
    cpus = recipe.scaling.data_cpus_per_actor
    records = read_planned(plans, data.s3_endpoint_url, cpus_per_task=cpus)
    roots = {p.source.path: p.source.image_root for p in plans if p.source.image_root}
    rows, quarantine = preprocess(records, processor_path=model, spec=data.row_spec(), pairs=scoring is not None,
                                  image_roots=roots, cpus_per_actor=cpus)
    if scoring is not None:
        print(f"[preprocess] {stage}: reference log-probabilities by {model} ({scoring.replicas} replica(s), "
              f"{scoring.dtype})", flush=True)
        rows = scoring.run(rows)
    shards = stage_shards(recipe, stage, model, folder=output)

    def progress(elapsed: float) -> str:
        line = progress_line(ray.get(quarantine.report.remote()), total, elapsed)
        return line + ("; the reference model scores each pair as it comes" if scoring else "")

    with every(PROGRESS_EVERY_S, progress, prefix="preprocess"):
        manifest = shards.write(rows, quarantine, overwrite=overwrite, plans=plans)
    print(f"per source\n{source_table(manifest['sources'])}", flush=True)
    print(f"wrote {len(manifest['shards'])} shard(s) and manifest.json to {output}")
    return PreprocessResult(output=Path(output), shards=tuple(manifest["shards"]),
                            report=PreprocessReport(**manifest["counts"]), fingerprint=shards.fingerprint)


def reference_pass(recipe: Recipe, stage: StageConfig, model: str) -> ReferencePass | None:
    """How stage 3's reference log-probabilities are computed (``None`` for other stages): by its starting
    checkpoint ``model``, in the training precision, one GPU per replica on GPU clusters."""
    if not isinstance(stage, PreferenceStageConfig):
        return None
    settings, scaling = stage.preference, recipe.scaling
    return ReferencePass(model=model, anyres=stage.data.image_mode == "anyres",
                         average=settings.loss_type == "ipo",
                         dtype={"bf16": "bfloat16", "fp16": "float16"}.get(stage.deepspeed.precision, "float32"),
                         replicas=settings.reference_replicas, cpus_per_replica=scaling.data_cpus_per_actor,
                         gpus_per_replica=1.0 if scaling.use_gpu else 0.0,
                         pairs_per_call=settings.reference_pairs_per_call)


def stage_shards(recipe: Recipe, stage: str, model: str, folder: str | Path | None = None) -> StageShards:
    """The preprocessed rows of ``stage`` for starting checkpoint ``model`` (in ``folder``, default the stage's
    ``data.preprocessed``): what they must be fingerprinted with, and their columns."""
    config = recipe.stages()[stage]
    scoring = reference_pass(recipe, config, model)
    return StageShards.of(config.data, model, folder, seed=recipe.seed,
                          reference=scoring.fingerprint() if scoring else None)


def progress_line(report: PreprocessReport, total: int, elapsed_s: float) -> str:
    """``1,200/3,000 records (40%), 3 quarantined, 85 records/s, 21 s left``: the driver's progress line."""
    done, bad = report.read, sum(report.quarantined.values())
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    left = f", {duration((total - done) / rate)} left" if rate > 0 and done < total else ""
    share = f" ({done / total:.0%})" if total else ""
    return f"{done:,}/{total:,} records{share}, {bad:,} quarantined, {rate:.0f} records/s{left}"


if __name__ == "__main__":
    main()
