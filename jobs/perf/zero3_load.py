"""Performance: per-rank peak memory of building a ZeRO-3 engine, partitioned loading vs loading the whole model.

    python -m jobs.perf.zero3_load [--out /tmp/bench-zero3] [--ranks 2]
    python -m jobs.perf.zero3_load --quick       # a ~30M-parameter model
    python -m jobs.perf.zero3_load --dry-run     # compose and size the model, run no rank (the test suite's)

A random LLaVA of about 0.5B parameters is composed from a config (tiny-recipe towers, scaled up; no
download) and saved. Then, one after the other, ``--ranks`` CPU ranks (gloo, no Ray) build the stage's
ZeRO-3 engine from it two ways:

- ``before``: what ``build_deepspeed_engine`` did until partitioned loading: every rank loads the whole checkpoint
  (``load_pretrained_llava``) and ``deepspeed.initialize`` partitions it;
- ``partitioned``: ``build_deepspeed_engine`` as it is (``llava_platform.train.partitioned``): the model is built
  under ``zero.Init`` and each rank reads only its own slices of the checkpoint.

Each rank's figure is its peak resident memory from just before loading to the built engine, divided
by the whole model's float32 bytes; the worst rank counts. Target at 2 ranks: <= 0.6 (each rank holds
half the weights, plus one module at a time while the model is built).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jobs import compose
from jobs.perf.ranks import EngineTask, rank_memory, spawn_ranks
from llava_platform.config import load_recipe, memory_plan

RECIPE = "tiny_cpu_demo"
MODEL = ("model.tiny.text_hidden_size=1792", "model.tiny.text_layers=16", "model.tiny.text_heads=16",
         "model.tiny.vision_hidden_size=256", "model.tiny.vision_layers=4", "model.tiny.vision_heads=4")
"""About 0.5B parameters, nearly all in the language model."""
QUICK_MODEL = ("model.tiny.text_hidden_size=512", "model.tiny.text_layers=8", "model.tiny.text_heads=8",
               "model.tiny.vision_hidden_size=64", "model.tiny.vision_layers=2", "model.tiny.vision_heads=2")
"""``--quick``: about 30M parameters."""
STAGE = ("stage1.deepspeed.zero_stage=3", "stage1.deepspeed.zero3_param_persistence_threshold=0",
         "stage1.tunable=[projector]")


def build_whole_then_partition(spec):
    """The loading ``build_deepspeed_engine`` did before ``train.partitioned``: the whole checkpoint on every rank."""
    import deepspeed

    from llava_platform.model.compose import load_pretrained_llava
    from llava_platform.model.trainability import parameter_groups, set_trainable

    model, processor = load_pretrained_llava(spec.model_path)
    set_trainable(model, spec.tunable)
    groups = parameter_groups(model.named_parameters(), lr=spec.lr, projector_lr=spec.projector_lr,
                              vision_tower_lr=spec.vision_tower_lr, weight_decay=spec.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=spec.deepspeed_config)
    return engine, processor


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-zero3"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a ~30M-parameter model")
    parser.add_argument("--dry-run", action="store_true", help="compose and size the model; run no rank")
    args = parser.parse_args(argv)

    overrides = (*(QUICK_MODEL if args.quick else MODEL), *STAGE)
    recipe = load_recipe(RECIPE, [*overrides, f"scaling.num_workers={args.ranks}"])
    lm, tower = memory_plan.recipe_shapes(recipe)
    params = lm.params + tower.params
    print(f"model: ~{params / 1e9:.2f}B parameters, {4 * params / 2**30:.2f} GiB in float32; "
          f"{args.ranks} ranks, ZeRO-3, every weight sharded")
    if args.dry_run:
        print("dry run: no checkpoint written, no rank started")
        return {}
    run_dir = args.out / time.strftime("run-%Y%m%d-%H%M%S")
    checkpoint = compose.run(recipe, run_dir / "initial")
    full = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))  # the model's float32 bytes
    task = EngineTask(RECIPE, overrides, "stage1", str(checkpoint), step=False)
    ratios = {}
    for name, build in (("before", build_whole_then_partition), ("partitioned", None)):
        started = time.perf_counter()
        ranks = spawn_ranks(rank_memory, args.ranks, task, build)
        peaks = [(rank.peak_build - rank.before) / full for rank in ranks]
        ratios[name] = max(peaks)
        print(f"{name:<12} per-rank peak / full model: {', '.join(f'{p:.2f}' for p in peaks)} (resident MiB "
              f"before -> peak: {', '.join(f'{r.before >> 20} -> {r.peak_build >> 20}' for r in ranks)}; "
              f"model {full >> 20} MiB; {time.perf_counter() - started:.0f} s)", flush=True)
    print(f"zero3-load per-rank-peak/full-model: {ratios['partitioned']:.2f} (before: {ratios['before']:.2f})")
    return ratios


if __name__ == "__main__":
    main()
