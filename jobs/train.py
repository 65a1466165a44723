"""Two-stage training with Ray Train + DeepSpeed on the Ray Data pipeline's streamed rows.

    python -m jobs.train --recipe tiny_cpu_demo --model outputs/initial --output outputs/train --stage all
    ray job submit --working-dir . -- python -m jobs.train --recipe llava15_7b --model s3://.../initial \\
        --output s3://.../train --stage all

``--model`` is the composed starting checkpoint (``jobs.compose``). Stage 1 trains the projector and
writes ``<output>/stage1/projector.safetensors``; stage 2 starts from ``--model`` plus that projector
(or the recipe's ``stage2.init_from`` path) and writes a Hugging Face export to ``<output>/stage2/export``.

Status: the loop, both stages, ZeRO-2/3 and the export work; periodic checkpoints with resume,
MLflow tracking and LoRA wiring are not built yet (see the README's status table).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ray

from llava_platform.config import recipe_argument_parser, recipe_from_args
from llava_platform.config.schema import Recipe, StageConfig
from llava_platform.train.checkpoint import PROJECTOR_FILE
from llava_platform.train.deepspeed_config import build_deepspeed_config
from pipelines.preprocess import finish, preprocess
from pipelines.sources import read_records


def log(message: str) -> None:
    print(f"[train] {message}", file=sys.stderr, flush=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine, then forward / backward / step over its data shard."""
    import deepspeed
    import ray.train

    from llava_platform.data.collate import collate
    from llava_platform.data.grouping import regroup
    from llava_platform.data.image_settings import ImageSettings
    from llava_platform.model.compose import load_pretrained_llava
    from llava_platform.model.trainability import parameter_groups, set_trainable
    from llava_platform.train.checkpoint import full_state_dict, load_projector, save_projector
    from llava_platform.train.deepspeed_config import build_lr_scheduler

    deepspeed.init_distributed(dist_backend=config["backend"])  # reuses Ray Train's process group
    model, processor = load_pretrained_llava(config["model"])
    if config["projector"]:
        load_projector(model, config["projector"])
    set_trainable(model, config["tunable"])
    groups = parameter_groups(model.named_parameters(), lr=config["lr"], projector_lr=config["projector_lr"],
                              vision_tower_lr=config["vision_tower_lr"], weight_decay=config["weight_decay"])
    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    schedule = build_lr_scheduler(config["scheduler"], warmup_ratio=config["warmup_ratio"],
                                  total_steps=config["total_steps"])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config["deepspeed"],
                                      lr_scheduler=schedule)
    settings = ImageSettings.from_processor(processor)
    device = ray.train.torch.get_device()
    accumulation = config["deepspeed"]["gradient_accumulation_steps"]
    micro_batch = config["deepspeed"]["train_micro_batch_size_per_gpu"]

    def micro_batches(epoch: int):
        windows = ray.train.get_dataset_shard("train").iter_batches(
            batch_size=config["group_window"], batch_format="numpy")
        for batch in regroup(windows, micro_batch, group=config["group_by_length"], seed=config["seed"] + epoch):
            yield collate(batch["input_ids"], batch["labels"], list(batch["tiles"]), list(batch["image_size"]),
                          pad_token_id=processor.tokenizer.pad_token_id, anyres=config["anyres"],
                          image_mean=settings.image_mean, image_std=settings.image_std, device=device)

    step = 0
    for epoch in range(config["epochs"]):
        batches = micro_batches(epoch)
        while step < config["total_steps"]:
            step_batches = [b for _, b in zip(range(accumulation), batches, strict=False)]
            if not all_ranks_have(len(step_batches) == accumulation, device):
                break  # some rank ran out of data: everyone ends the epoch together (no hung collectives)
            losses = []
            for batch in step_batches:
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            step += 1
            ray.train.report({"stage": config["stage"], "step": step, "epoch": epoch,
                              "loss": sum(losses) / len(losses), "lr": engine.get_lr()[0]})

    state = full_state_dict(engine, config["deepspeed"]["zero_optimization"]["stage"])
    if ray.train.get_context().get_world_rank() == 0:
        out = Path(config["output"])
        save_projector(state, out)
        if config["export"]:
            engine.module.save_pretrained(out / "export", state_dict=state)
            processor.save_pretrained(out / "export")


def all_ranks_have(flag: bool, device) -> bool:
    """Whether every rank's flag is true (a one-integer all-reduce)."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def run_stage(recipe: Recipe, name: str, stage: StageConfig, *, model: str, projector: str | None,
              output: Path, export: bool) -> Path:
    """Preprocess (streamed) and train one stage; return its output folder."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data, scaling = stage.data, recipe.scaling
    records = read_records(data.train_files, data.s3_endpoint_url, cpus_per_task=scaling.data_cpus_per_actor)
    estimated_records = records.count()
    rows, quarantine = preprocess(
        records, processor_path=model, template=data.template, image_mode=data.image_mode,
        max_length=data.model_max_length, truncation=data.truncation, max_image_pixels=data.max_image_pixels,
        image_root=data.image_root, s3_endpoint_url=data.s3_endpoint_url, cpus_per_actor=scaling.data_cpus_per_actor,
    )
    steps_per_epoch = max(1, estimated_records // stage.global_batch_size)
    total_steps = min(stage.max_steps or 10**12, stage.epochs * steps_per_epoch)
    deepspeed = build_deepspeed_config(
        global_batch_size=stage.global_batch_size, micro_batch_size=stage.micro_batch_size,
        world_size=scaling.num_workers, zero_stage=stage.deepspeed.zero_stage, precision=stage.deepspeed.precision,
        offload_optimizer=stage.deepspeed.offload_optimizer, max_grad_norm=stage.optim.max_grad_norm,
        weight_decay=stage.optim.weight_decay, lr=stage.optim.lr, use_gpu=scaling.use_gpu,
    )
    stage_dir = output / name
    log(f"{name}: {estimated_records} records, {total_steps} optimizer steps, {scaling.num_workers} workers, "
        f"ZeRO-{stage.deepspeed.zero_stage}, accumulation {deepspeed['gradient_accumulation_steps']}")
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "stage": name, "model": model, "projector": projector, "tunable": list(stage.tunable),
            "lr": stage.optim.lr, "projector_lr": stage.optim.projector_lr,
            "vision_tower_lr": stage.optim.vision_tower_lr, "weight_decay": stage.optim.weight_decay,
            "deepspeed": deepspeed, "epochs": stage.epochs, "total_steps": total_steps, "seed": recipe.seed,
            "scheduler": stage.optim.scheduler, "warmup_ratio": stage.optim.warmup_ratio,
            "gradient_checkpointing": stage.deepspeed.gradient_checkpointing,
            "group_by_length": data.group_by_modality_length, "group_window": 32 * stage.micro_batch_size,
            "anyres": data.image_mode == "anyres", "backend": "nccl" if scaling.use_gpu else "gloo",
            "output": str(stage_dir.resolve()), "export": export,
        },
        datasets={"train": rows},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(storage_path=str((output / "ray_train").resolve()), name=f"{recipe.name}-{name}"),
    )
    result = trainer.fit()
    finish(quarantine, stage_dir / "quarantine.jsonl")
    log(f"{name}: done, last metrics {result.metrics}")
    return stage_dir


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = recipe_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all")
    parser.add_argument("--model", help="the composed starting checkpoint (jobs.compose output)")
    parser.add_argument("--output", type=Path, help="folder for stage outputs")
    args = parser.parse_args(argv)
    recipe = recipe_from_args(parser, args)
    names = ["stage1", "stage2"] if args.stage == "all" else [f"stage{args.stage}"]
    missing = [n for n in names if recipe.stages().get(n) is None]
    if missing or not args.model or not args.output:
        parser.exit(2, f"need --model, --output and recipe sections {names} (missing: {missing})\n")
    lora = [n for n in names if recipe.stages()[n].lora is not None]
    if lora:  # never train silently without the adapters the recipe asks for
        parser.exit(2, f"{', '.join(lora)}.lora: LoRA training is not wired into jobs.train yet; remove the "
                       "lora section or wait for it (see the README's status table)\n")
    stage2 = recipe.stage2
    if "stage2" in names and "stage1" not in names and stage2.init_from == "stage1":
        parser.exit(2, "stage2.init_from is 'stage1' but --stage 2 runs alone: set stage2.init_from to a "
                       f"projector path (e.g. {args.output}/stage1/{PROJECTOR_FILE})\n")

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    outputs: dict[str, Path] = {}
    for name in names:
        stage = recipe.stages()[name]
        projector = None
        if stage.init_from == "stage1":
            projector = str(outputs["stage1"] / PROJECTOR_FILE)
        elif stage.init_from:
            projector = stage.init_from
        outputs[name] = run_stage(recipe, name, stage, model=args.model, projector=projector, output=args.output,
                                  export=name == names[-1])
    return outputs


if __name__ == "__main__":
    main()

