"""What ``--dry-run`` prints about each stage's data: how a global batch splits on every worker count the run
may have, and what is guaranteed about its rows.

    print(plan_batches(recipe))
"""

from __future__ import annotations

from llava_platform.config.schema import Recipe, ScalingConfig, StageConfig
from llava_platform.data.position import micro_steps


def plan_batches(recipe: Recipe) -> str:
    """One block of ``#`` lines per stage."""
    lines = ["# global batches and rows (llava_platform.data.position)"]
    for name, stage in recipe.stages().items():
        lines += [f"# {name}: {line}" for line in stage_lines(stage, recipe.scaling)]
    return "\n".join(lines)


def stage_lines(stage: StageConfig, scaling: ScalingConfig) -> list[str]:
    batch, micro = stage.global_batch_size, stage.micro_batch_size
    micro_batches = -(-batch // micro)
    lines = [f"global batch {batch} rows = {micro_batches} micro-batches of {micro}"]
    for world in scaling.world_sizes():
        steps = micro_steps(batch, micro, world)
        padding = steps * world - micro_batches
        lines.append(f"  {world} workers: {steps} micro-steps each, " + (
            "exact" if not padding else f"{padding} of {steps * world} slots zero-weight padding"))
    if stage.data.preprocessed:
        lines.append(f"rows by id from {stage.data.preprocessed}: every row once per epoch (the last step takes the "
                     "rest), in one seeded order and the same global batches on any worker count, across resizes "
                     "and resumes")
    else:
        lines.append(f"streamed: every record once per epoch on {scaling.num_workers} workers, each its own part "
                     f"(up to {scaling.num_workers - 1} records left out so that the parts are equal); a resume "
                     f"needs {scaling.num_workers} workers (set data.preprocessed for any count)")
    return lines
