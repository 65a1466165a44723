"""Preprocess a recipe stage's data with Ray Data into Parquet shards + manifest + quarantine.

Tiles and tokens follow the processor of ``--model`` (a checkpoint, e.g. from ``jobs.compose``), so
training on the shards matches what that checkpoint expects. Training can also skip this job and
stream the same pipeline straight into its workers.

    python -m jobs.preprocess --recipe tiny_cpu_demo --stage 2 --model outputs/initial --output outputs/shards
    ray job submit --working-dir . -- python -m jobs.preprocess --recipe llava15_7b --stage 2 \\
        --model s3://bucket/llava15-7b/initial --output /mnt/shards/llava15-7b-stage2
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ray

from jobs.console import PROGRESS_EVERY_S, duration, every, start_ray
from llava_platform.config import Recipe, recipe_argument_parser, recipe_from_args
from llava_platform.data.mixture import MixtureError
from pipelines.preprocess import preprocess
from pipelines.quarantine import PreprocessReport
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
    parser.add_argument("--stage", choices=["1", "2"], default="2", help="whose data section to preprocess")
    parser.add_argument("--model", help="checkpoint directory whose processor tiles and tokenises")
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
    data = recipe.stages()[stage].data
    plans = plan_sources(data.train_files, seed=recipe.seed, s3_endpoint_url=data.s3_endpoint_url)
    total = sum(plan.taken for plan in plans)
    print(f"[preprocess] {stage}: {total:,} records in {len(plans)} file(s) -> {output}", flush=True)
    for plan in plans if any(plan.source.origin for plan in plans) else ():  # a mixture: each source's share
        print(f"[preprocess]   {plan.source.path}: {plan.source.rule}, {plan.taken:,} of {plan.rows:,}", flush=True)
    records = read_planned(plans, data.s3_endpoint_url)
    rows, quarantine = preprocess(records, processor_path=model, spec=data.row_spec(),
                                  image_roots={p.source.path: p.source.image_root for p in plans if p.source.image_root})
    shards = StageShards.of(data, model, folder=output, seed=recipe.seed)

    def progress(elapsed: float) -> str:
        return progress_line(ray.get(quarantine.report.remote()), total, elapsed)

    with every(PROGRESS_EVERY_S, progress, prefix="preprocess"):
        manifest = shards.write(rows, quarantine, overwrite=overwrite, plans=plans)
    print(f"per source\n{source_table(manifest['sources'])}", flush=True)
    print(f"wrote {len(manifest['shards'])} shard(s) and manifest.json to {output}")
    return PreprocessResult(output=Path(output), shards=tuple(manifest["shards"]),
                            report=PreprocessReport(**manifest["counts"]), fingerprint=shards.fingerprint)


def progress_line(report: PreprocessReport, total: int, elapsed_s: float) -> str:
    """``1,200/3,000 records (40%), 3 quarantined, 85 records/s, 21 s left``: the driver's progress line."""
    done, bad = report.read, sum(report.quarantined.values())
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    left = f", {duration((total - done) / rate)} left" if rate > 0 and done < total else ""
    share = f" ({done / total:.0%})" if total else ""
    return f"{done:,}/{total:,} records{share}, {bad:,} quarantined, {rate:.0f} records/s{left}"


if __name__ == "__main__":
    main()
