"""GPU smoke benchmark: a stage-2 step loop of a ~0.5B LLaVA on one GPU in bf16, padded vs packed rows.

    make gpu-smoke                              # on the GPU machine: the carried wheels, then this script
    python -m jobs.perf.gpu_smoke --steps 20
    python -m jobs.perf.gpu_smoke --dry-run     # any machine: the plan, and one padded and one packed batch
                                                # built and run through a tiny model on the CPU

Built for the GPU machine that is sometimes lent: no package registry, its own Python with torch,
transformers, peft and accelerate, about 15 minutes in all. So it imports nothing of Ray, MLflow, vLLM
or pyarrow: the training loop's own pieces (``config.build.deepspeed_spec``, ``build_deepspeed_engine``,
``train.batches``, ``data.packing``) in one process, DeepSpeed ZeRO-2, bf16 + TF32, on synthetic samples
drawn from the packing benchmark's LLaVA-665K-like histogram (``jobs.perf.packing``: 576-token tiles, up to
five per sample) and a random model composed from a config (LM hidden 1792 x 16 layers, ~0.52B
parameters; a 4-layer tower at 336 px). ``make gpu-wheels`` gathers what that Python lacks (DeepSpeed
built as a pure-Python wheel, pydantic, ...; under 64 MiB).

Runs: ``padded`` (grouped micro-batches of ``--batch`` rows) and ``packed`` (packs of ``MAX_TOKENS``), each
with sdpa and, where ``flash_attn`` imports, flash-attention 2 (varlen for packs). Per run: samples/s,
useful tokens/s and MFU (6 x parameters x useful tokens/s over the GPU's dense bf16 peak; attention FLOPs
left out). Medians over the steps after ``WARMUP``. About 4 minutes on an H100.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from jobs.perf.packing import histogram, sample_rows

MAX_TOKENS = 8192
DRY_MAX_TOKENS = 3200
"""``--dry-run``'s packs: just above the longest sample (5 tiles and 300 text tokens)."""
WARMUP = 3
MODEL = ["model.tiny.text_hidden_size=1792", "model.tiny.text_layers=16", "model.tiny.text_heads=16",
         "model.tiny.vision_hidden_size=256", "model.tiny.vision_layers=4", "model.tiny.vision_heads=4",
         "model.image_size=336", "model.tiny.patch_size=14"]
DRY_MODEL = ["model.image_size=336", "model.tiny.patch_size=14"]
"""``--dry-run``: the demo's tiny towers at the same tile size."""
STAGE = ["stage2.tunable=[projector,language_model]", "stage2.deepspeed.zero_stage=2",
         "stage2.data.model_max_length=8192", "scaling.num_workers=1"]
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}
"""Dense bf16 tensor-core peaks (vendor data sheets), by a name part of ``torch.cuda.get_device_name``."""


def stage_overrides(batch: int, packed: bool, gpu: bool, attention: str) -> list[str]:
    global_batch = 4 if packed else batch * 4  # 4 micro-steps of one pack, or of `batch` rows
    return [*STAGE, f"stage2.global_batch_size={global_batch}", f"stage2.micro_batch_size={1 if packed else batch}",
            f"model.attn_implementation={attention}",
            *(["scaling.use_gpu=true", "stage2.deepspeed.precision=bf16", "stage2.deepspeed.tf32=true"] if gpu
              else ["stage2.deepspeed.precision=fp32"])]


def step_batches(samples: int, packed: bool, batch: int, max_tokens: int):
    """The run's global batches over the histogram's samples (``data.position``)."""
    from llava_platform.data.packing import PackBudget, PackCost, Packing, PackingSpec
    from llava_platform.data.position import GlobalBatches, RowOrder

    table = histogram(samples)
    order = RowOrder((samples,), seed=0, window_blocks=1)
    if packed:
        spec = PackingSpec(PackBudget(max_tokens), window=samples, cost=PackCost(1.0, 0.0, 0.0))
        return table, GlobalBatches(order, global_batch=4, micro_batch=1,
                                    packing=Packing(spec, tokens=table["tokens"], tiles=table["tiles"]))
    return table, GlobalBatches(order, global_batch=batch * 4, micro_batch=batch, lengths=table["tokens"],
                                modalities=np.where(table["tiles"] > 0, "image", "text"))


def run(model: str, overrides: list[str], packed: bool, batch: int, steps: int, device, *, warmup: int = WARMUP,
        max_tokens: int = MAX_TOKENS) -> dict[str, float]:
    """``warmup`` + ``steps`` optimizer steps; medians of samples/s and useful tokens/s after the warm-up."""
    import torch

    from llava_platform.config import load_recipe
    from llava_platform.config.build import deepspeed_spec
    from llava_platform.data.image_settings import ImageSettings
    from llava_platform.train.batches import collate_rows, normalise_loss
    from llava_platform.train.deepspeed_engine import build_deepspeed_engine, train_step

    recipe = load_recipe("tiny_cpu_demo", overrides)
    samples_needed = (steps + warmup) * (40 if packed else batch * 4)
    table, batches = step_batches(samples_needed, packed, batch, max_tokens)
    engine, processor = build_deepspeed_engine(deepspeed_spec(recipe, recipe.stage2, model, total_steps=steps + warmup))
    settings = ImageSettings.from_processor(processor)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    varlen = recipe.model.attn_implementation.startswith("flash")
    rates = []
    for index in range(min(steps + warmup, batches.steps_in(0))):
        share = batches.step(0, index).share(0, 1, 4)
        rows = []
        for micro_batch in share.micro_batches:
            row = sample_rows(np.concatenate(micro_batch), table, image_token, image_token)
            if packed:
                row["pack_sizes"] = np.asarray([len(pack) for pack in micro_batch])
            rows.append(row)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        collated = [collate_rows(row, processor, settings, False, device, varlen=varlen) for row in rows]
        train_step(engine, collated, normalise_loss(collated, share.weights, True, device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        real = [row for row, w in zip(rows, share.weights, strict=True) if w > 0]
        rates.append((sum(len(r["id"]) for r in real) / seconds, sum(int(r["length"].sum()) for r in real) / seconds))
    measured = rates[warmup:] or rates
    params = sum(p.numel() for p in engine.module.parameters())
    del engine
    return {"samples_s": statistics.median(r[0] for r in measured),
            "tokens_s": statistics.median(r[1] for r in measured), "params": params}


def start_process_group(backend: str) -> None:
    from llava_platform.train.deepspeed_engine import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29541"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    init_distributed(backend)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    import torch

    from jobs import compose
    from llava_platform.config import load_recipe
    from llava_platform.config.memory_plan import recipe_shapes

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="rows per padded micro-batch")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan; build one padded and one packed batch and run them on a tiny CPU model")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    lm, tower = recipe_shapes(load_recipe("tiny_cpu_demo", MODEL))
    attentions = ["sdpa"] + (["flash_attention_2"] if gpu and importlib.util.find_spec("flash_attn") else [])
    print(f"gpu-smoke plan: {(lm.params + tower.params) / 1e9:.2f}B parameters, {args.steps} steps + {WARMUP} warm-up "
          f"per run; padded (micro-batches of {args.batch} rows) and packed (packs of {MAX_TOKENS} tokens), "
          f"4 micro-steps per step, {', '.join(attentions)}, bf16 + tf32, ZeRO-2, 1 GPU", flush=True)
    steps, warmup, max_tokens = (1, 0, DRY_MAX_TOKENS) if args.dry_run else (args.steps, WARMUP, MAX_TOKENS)
    if args.dry_run:
        args.batch = 1
    start_process_group("nccl" if gpu else "gloo")
    device = torch.device("cuda" if gpu else "cpu")
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as folder:
        model = str(compose.run(load_recipe("tiny_cpu_demo", DRY_MODEL if args.dry_run else MODEL),
                                Path(folder) / "initial"))
        name, peak = (torch.cuda.get_device_name(0), next((p for part, p in PEAK_BF16_FLOPS.items()
                                                           if part in torch.cuda.get_device_name(0)), None)) \
            if gpu else ("cpu", None)
        for attention in attentions:
            for packed in (False, True):
                label = f"{'packed' if packed else 'padded'}/{attention}"
                overrides = [*(DRY_MODEL if args.dry_run else MODEL),
                             *stage_overrides(args.batch, packed, gpu, attention)]
                result = run(model, overrides, packed, args.batch, steps, device, warmup=warmup, max_tokens=max_tokens)
                mfu = 6 * result["params"] * result["tokens_s"] / peak if peak else None
                figures[label] = {**result, "mfu": mfu}
                print(f"{label:26} {result['samples_s']:8.1f} samples/s {result['tokens_s']:10,.0f} tokens/s  MFU "
                      f"{f'{mfu:.1%}' if mfu is not None else 'n/a'}", flush=True)
    padded, packed_run = figures["padded/sdpa"], figures["packed/sdpa"]
    print(f"gpu-smoke on {name}: packed/padded tokens/s {packed_run['tokens_s'] / padded['tokens_s']:.2f}"
          + (" (dry run: a tiny model on the CPU, one step each)" if args.dry_run else ""))
    return figures


if __name__ == "__main__":
    main()
