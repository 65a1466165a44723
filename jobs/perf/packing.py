"""Performance: useful tokens per second, padded micro-batches grouped by modality and length vs packed rows.

    python -m jobs.perf.packing [--samples 256] [--steps 12]
    python -m jobs.perf.packing --quick        # 64 samples, 4 steps

One model, one set of samples, two real DeepSpeed ranks (gloo, no Ray; ZeRO-2, fp32, sdpa attention), the
training loop's own pieces (``data.position.GlobalBatches``, ``train.batches.collate_rows``,
``normalise_loss``, ``train_step``):

- ``grouped``: global batches of rows, each sorted by modality and length and cut into padded micro-batches
  of 4 rows (``group_by_modality_length``), ranks taking contiguous parts;
- ``packed``: the same samples in packs of at most ``MAX_TOKENS`` tokens (``data.packing``), one pack per
  micro-step, a step's packs given to ranks largest-cost first.

Tokens per optimizer step are held equal: the grouped global batch is the number of rows whose mean tokens
match the packed global batch's (both printed). The samples follow a LLaVA-665K-like histogram, with
LLaVA-1.5's 576-token image tiles (336 px, patch 14): 10 % text-only (50-400 tokens), 60 % one image
(576 tokens) and 30 % 2-5 tiles (1152-2880 image tokens, anyres-sized), each with 30-300 text tokens.
Medians over the steps after the first two. The last line is
``packing useful-tokens/s packed/grouped: <ratio> (padding <a>% -> <b>%)``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

TILE_TOKENS = 576
MAX_TOKENS = 4096
GROUPED_MICRO = 4
PACKED_GLOBAL = 4
"""Packs per optimizer step (2 ranks x 2 micro-steps)."""
MODEL = ["model.image_size=336", "model.tiny.patch_size=14", "model.tiny.vision_hidden_size=32",
         "model.tiny.text_hidden_size=128", "model.tiny.text_layers=2", "model.tiny.text_heads=2",
         "stage2.data.model_max_length=4096", "stage2.tunable=[projector,language_model]",
         "stage2.deepspeed.zero_stage=2"]


def histogram(samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per sample: its kind (0 text, 1 one image, 2 several tiles), tiles, text tokens and total tokens."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=samples, p=[0.1, 0.6, 0.3])
    tiles = np.where(kind == 0, 0, np.where(kind == 1, 1, rng.integers(2, 6, size=samples)))
    text = np.where(kind == 0, rng.integers(50, 400, size=samples), rng.integers(30, 300, size=samples))
    return {"kind": kind, "tiles": tiles, "text": text, "tokens": text + tiles * TILE_TOKENS}


def sample_rows(ids, table: dict[str, np.ndarray], image_token: int, vocab: int) -> dict:
    """Rows as the shards give them (``RowReader.read``), built from the histogram (random tokens and pixels,
    answers: the last third of the text)."""
    rows = {name: [] for name in ("id", "input_ids", "labels", "tiles", "image_size", "length", "modality")}
    for i in ids:
        rng = np.random.default_rng(int(i))
        text, tiles = int(table["text"][i]), int(table["tiles"][i])
        prompt = rng.integers(5, vocab, size=text).astype(np.int32)
        ids_row = np.concatenate([prompt[:3], np.full(tiles * TILE_TOKENS, image_token, np.int32), prompt[3:]])
        labels = np.full(len(ids_row), -100, np.int32)
        labels[-(text // 3):] = ids_row[-(text // 3):]
        rows["id"].append(str(i))
        rows["input_ids"].append(ids_row)
        rows["labels"].append(labels)
        rows["tiles"].append(rng.integers(0, 255, size=(tiles, 3, 336, 336), dtype=np.uint8))
        rows["image_size"].append(np.array([336, 336]))
        rows["length"].append(len(ids_row))
        rows["modality"].append("text" if tiles == 0 else "image")
    rows["length"] = np.asarray(rows["length"])
    return rows


def run_rank(rank: int, world: int, model: str, mode: str, samples: int, steps: int) -> dict:
    """Rank function: ``steps`` optimizer steps of ``mode``; per step the wall time, this rank's compute time,
    and (over the step's real micro-batches) useful tokens, samples and padded token slots."""
    import torch

    from llava_platform.config import load_recipe
    from llava_platform.config.build import deepspeed_spec
    from llava_platform.data.image_settings import ImageSettings
    from llava_platform.data.packing import PackBudget, PackCost, Packing, PackingSpec
    from llava_platform.data.position import GlobalBatches, RowOrder, micro_steps
    from llava_platform.train.batches import collate_rows, normalise_loss
    from llava_platform.train.deepspeed_engine import build_deepspeed_engine, train_step

    torch.set_num_threads(1)
    table = histogram(samples)
    order = RowOrder((samples,), seed=0, window_blocks=1)
    if mode == "packed":
        spec = PackingSpec(PackBudget(MAX_TOKENS), window=samples, cost=PackCost(1.0, 2e-4, 300.0))
        batches = GlobalBatches(order, global_batch=PACKED_GLOBAL, micro_batch=1,
                                packing=Packing(spec, tokens=table["tokens"], tiles=table["tiles"]))
    else:
        batches = GlobalBatches(order, global_batch=grouped_global_batch(table), micro_batch=GROUPED_MICRO,
                                lengths=table["tokens"], modalities=np.where(table["tiles"] > 0, "image", "text"))
    recipe = load_recipe("tiny_cpu_demo", [*MODEL, f"stage2.global_batch_size={batches.global_batch}",
                                           f"stage2.micro_batch_size={batches.micro_batch}"])
    spec = deepspeed_spec(recipe, recipe.stage2, model, total_steps=steps)
    accumulation = micro_steps(batches.global_batch, batches.micro_batch, world)
    engine, processor = build_deepspeed_engine(spec.at_world_size(world, batches.global_batch))
    settings = ImageSettings.from_processor(processor)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    vocab = image_token  # the last id: text tokens are drawn below it
    device = torch.device("cpu")
    measured = []
    for index in range(min(steps, batches.steps_in(0))):
        share = batches.step(0, index).share(rank, world, accumulation)
        rows = []
        for micro_batch in share.micro_batches:
            row = sample_rows(np.concatenate(micro_batch), table, image_token, vocab)
            if mode == "packed":
                row["pack_sizes"] = np.asarray([len(pack) for pack in micro_batch])
            rows.append(row)
        torch.distributed.barrier()
        started = time.perf_counter()
        collated = [collate_rows(row, processor, settings, False, device) for row in rows]
        weights = normalise_loss(collated, share.weights, True, device)
        result = train_step(engine, collated, weights)
        torch.distributed.barrier()
        real = [(row, batch) for row, batch, w in zip(rows, collated, weights, strict=True) if w > 0]
        measured.append({"wall": time.perf_counter() - started, "compute": result.forward_s, "loss": result.loss,
                         "useful": sum(int(row["length"].sum()) for row, _ in real),
                         "samples": sum(len(row["id"]) for row, _ in real),
                         "slots": sum(int(batch["input_ids"].numel()) for _, batch in real),
                         # attention score pairs the dense kernel computes, and those the samples need
                         "pairs": sum(int(batch["input_ids"].shape[0]) * int(batch["input_ids"].shape[1]) ** 2
                                      for _, batch in real),
                         "needed": sum(int((row["length"].astype(np.int64) ** 2).sum()) for row, _ in real)})
    return {"steps": measured, "global_batch": batches.global_batch}


def grouped_global_batch(table: dict[str, np.ndarray]) -> int:
    """Rows per grouped step carrying the packed step's tokens on average (a multiple of 2 ranks x 4 rows)."""
    rows = PACKED_GLOBAL * MAX_TOKENS * 0.95 / table["tokens"].mean()  # packs fill about 95 % (measured below)
    return max(8, int(round(rows / 8)) * 8)


def summary(ranks: list[dict]) -> dict[str, float]:
    steps = list(zip(*[rank["steps"] for rank in ranks], strict=True))[2:]  # warm-up: the first two
    walls = [max(r["wall"] for r in step) for step in steps]
    useful = [sum(r["useful"] for r in step) for step in steps]
    slots = sum(r["slots"] for step in steps for r in step)
    return {"useful_tokens_s": statistics.median(u / w for u, w in zip(useful, walls, strict=True)),
            "samples_s": statistics.median(sum(r["samples"] for r in step) / w for step, w in zip(steps, walls,
                                                                                                 strict=True)),
            "padding": 1 - sum(useful) / slots,
            "straggler": statistics.median(max(r["compute"] for r in step) / statistics.mean(r["compute"] for r in step)
                                           for step in steps),
            "tokens_per_step": statistics.mean(useful),
            "attention_waste": sum(r["pairs"] for step in steps for r in step)
            / sum(r["needed"] for step in steps for r in step)}


def main(argv: list[str] | None = None) -> None:
    from jobs import compose
    from jobs.perf.ranks import spawn_ranks
    from llava_platform.config import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="64 samples, 4 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.steps = 64, 4
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as folder:
        model = str(compose.run(load_recipe("tiny_cpu_demo", MODEL), Path(folder) / "initial"))
        figures = {mode: summary(spawn_ranks(run_rank, 2, model, mode, args.samples, args.steps))
                   for mode in ("grouped", "packed")}
    for mode, f in figures.items():
        print(f"{mode:8} useful tokens/s {f['useful_tokens_s']:8.0f}  samples/s {f['samples_s']:6.2f}  padding "
              f"{f['padding']:6.1%}  straggler ratio {f['straggler']:.2f}  tokens/step {f['tokens_per_step']:.0f}  "
              f"attention pairs computed/needed {f['attention_waste']:.2f}")
    print(f"samples: 10% text-only, 60% one {TILE_TOKENS}-token image, 30% 2-5 tiles; packs of {MAX_TOKENS} tokens; "
          "2 ranks, ZeRO-2, fp32, sdpa on CPU (the mask is dense: a pack's attention costs its whole length squared)")
    grouped, packed = figures["grouped"], figures["packed"]
    print(f"packing useful-tokens/s packed/grouped: {packed['useful_tokens_s'] / grouped['useful_tokens_s']:.2f} "
          f"(padding {grouped['padding']:.0%} -> {packed['padding']:.0%})")


if __name__ == "__main__":
    main()
