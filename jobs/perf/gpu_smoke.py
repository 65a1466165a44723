"""GPU smoke benchmark: stage 1 + stage 2 of a ~0.5B LLaVA on one GPU, samples/s, tokens/s and MFU.

    make gpu-smoke                                   # = python -m jobs.perf.gpu_smoke
    python -m jobs.perf.gpu_smoke --steps 40 --out /tmp/gpu-smoke
    python -m jobs.perf.gpu_smoke --dry-run    # resolve the recipe, print the plan (any machine)

The real training path (``jobs.train`` on Ray Train, 1 worker with 1 GPU, DeepSpeed ZeRO-2, bf16 +
TF32, SDPA attention) on synthetic data and a random model composed from a config (no download):
LM hidden 1792 x 16 layers (~0.52B parameters), a small vision tower. Figures come from the run's
MLflow metrics (median over the steps after the first 3). MFU = model FLOPs per second / the GPU's
dense bf16 peak, with model FLOPs per token = 6 x parameters in stage 2 (everything trains) and
4 x parameters in stage 1 (a frozen LM still back-propagates to the projector); attention FLOPs are
left out (short sequences). CI never runs it; README "Scale benchmarks" has the latest GPU figures.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ray

from jobs import compose, train
from jobs.console import quiet_ray_data
from llava_platform import tracking
from llava_platform.config import load_recipe, memory_plan
from llava_platform.data.synthetic import write_synthetic_dataset

MODEL = ["model.tiny.text_hidden_size=1792", "model.tiny.text_layers=16", "model.tiny.text_heads=16",
         "model.tiny.vision_hidden_size=256", "model.tiny.vision_layers=4", "model.tiny.vision_heads=4"]
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}
"""Dense bf16 tensor-core peaks (vendor data sheets), by a name part of ``torch.cuda.get_device_name``."""


def overrides(data_root: Path, files: dict, steps: int, batch: int, tracking_uri: str) -> list[str]:
    per_stage = []
    for stage, split in (("stage1", "stage1"), ("stage2", "stage2")):
        per_stage += [f"{stage}.data.train_files=[{files[split]}]", f"{stage}.data.image_root={data_root}",
                      f"{stage}.data.preprocessed=null", f"{stage}.max_steps={steps}",
                      f"{stage}.global_batch_size={batch}", f"{stage}.micro_batch_size={batch}",
                      f"{stage}.deepspeed.precision=bf16", f"{stage}.deepspeed.tf32=true",
                      f"{stage}.data.group_by_modality_length=false"]
    return [*MODEL, *per_stage, "stage2.data.materialize=false", "stage2.tunable=[projector,language_model]",
            "scaling.num_workers=1", "scaling.use_gpu=true", "scaling.gpus_per_worker=1", "scaling.cpus_per_worker=4",
            f"checkpoint.every_n_steps={steps}", f"tracking.uri={tracking_uri}", "evaluation=null", "synthetic=null"]


def peak_flops() -> tuple[str, float | None]:
    import torch

    name = torch.cuda.get_device_name(0)
    return name, next((peak for part, peak in PEAK_BF16_FLOPS.items() if part in name), None)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-smoke"))
    parser.add_argument("--dry-run", action="store_true", help="resolve the recipe and print the plan")
    args = parser.parse_args(argv)
    run_dir = args.out / time.strftime("run-%Y%m%d-%H%M%S")
    tracking_uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    if args.dry_run:
        files = {"stage1": run_dir / "data" / "stage1.json", "stage2": run_dir / "data" / "stage2.jsonl"}
        recipe = load_recipe("tiny_cpu_demo", overrides(run_dir / "data", files, args.steps, args.batch, tracking_uri))
        lm, tower = memory_plan.recipe_shapes(recipe)
        print(f"dry run: {(lm.params + tower.params) / 1e9:.2f}B parameters, stage 1 + stage 2 x {args.steps} steps "
              f"of {args.batch} on 1 GPU, {recipe.stage1.deepspeed.precision} + tf32")
        return {}
    data = write_synthetic_dataset(run_dir / "data", train=args.steps * args.batch, eval=1, seed=0)
    recipe = load_recipe("tiny_cpu_demo", overrides(run_dir / "data", data, args.steps, args.batch, tracking_uri))
    initial = compose.run(recipe, run_dir / "initial")
    ray.init(include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    result = train.run(recipe, model=str(initial), output=run_dir / "train", stage="all")
    lm, tower = memory_plan.recipe_shapes(recipe)
    params = lm.params + tower.params
    device, peak = peak_flops()
    client = tracking.client_for(tracking_uri)
    figures = {}
    def median(run_id: str, metric: str) -> float:
        history = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)
        return statistics.median(m.value for m in history[3:] or history)

    for stage, flops_per_param in (("stage1", 4), ("stage2", 6)):
        samples, tokens = median(result.runs[stage], "samples_per_s"), median(result.runs[stage], "tokens_per_s")
        mfu = flops_per_param * params * tokens / peak if peak else None
        figures[stage] = {"samples_per_s": samples, "tokens_per_s": tokens, "mfu": mfu}
        print(f"{stage}: {samples:.1f} samples/s, {tokens:,.0f} tokens/s, MFU "
              f"{f'{mfu:.1%}' if mfu is not None else 'n/a (unknown peak)'}", flush=True)
    print(f"gpu-smoke on {device}: {params / 1e9:.2f}B parameters, batch {args.batch}, bf16 + tf32, ZeRO-2, 1 GPU")
    return figures


if __name__ == "__main__":
    main()
