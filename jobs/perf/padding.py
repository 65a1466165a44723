"""Padding waste with and without length grouping, on the synthetic set through the real pipeline.

Preprocesses the synthetic stage-1 and stage-2 splits (anyres at 336 px, so image token counts
vary with the aspect ratio, plus a share of text-only records), then cuts the rows into
micro-batches in arrival order and grouped by modality and length, and prints the share of
padded token slots for each.

    python -m jobs.perf.padding
    python -m jobs.perf.padding --records 400 --batch-size 8 --window 512
    python -m jobs.perf.padding --quick       # 24 records per split, window 64
    python -m jobs.perf.padding --dry-run     # write the inputs and build the checkpoint, no Ray

The last line is ``padding fraction arrival -> grouped: <a>% -> <b>%``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray

from llava_platform.config.schema import DataConfig
from llava_platform.data.grouping import padding_fraction, regroup
from llava_platform.data.synthetic import write_synthetic_dataset
from llava_platform.model.compose import compose_llava, save_llava
from llava_platform.model.tiny import save_tiny_language_model, save_tiny_vision_tower
from pipelines.preprocess import finish, preprocess
from pipelines.sources import read_records

PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=400, help="synthetic records per training split")
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch size")
    parser.add_argument("--window", type=int, default=512, help="rows grouped together (streaming window)")
    parser.add_argument("--quick", action="store_true", help="24 records per split, window 64")
    parser.add_argument("--dry-run", action="store_true", help="write the inputs and the checkpoint, then exit")
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.window = 24, 64
    root = Path(tempfile.mkdtemp(prefix="bench_padding_"))
    files = write_synthetic_dataset(root / "data", train=args.records, eval=1, seed=0)
    text_only = root / "data" / "text.jsonl"  # LLaVA's mix has text-only conversations too
    text_only.write_text("".join(json.dumps({"id": f"t{i}", "conversations": [
        {"from": "human", "value": "Name a colour. " * (1 + i % 5)}, {"from": "gpt", "value": "Red."}]}) + "\n"
        for i in range(args.records // 4)))
    checkpoint = str(root / "checkpoint")
    save_llava(*compose_llava(
        str(save_tiny_vision_tower(root / "clip", image_size=336, patch_size=14)),
        str(save_tiny_language_model(root / "llama")),
        arch="llava_next", projector="mlp2x_gelu", vision_feature_layer=-2, image_size=336, image_mode="anyres",
        template="vicuna_v1", pinpoints=PINPOINTS), checkpoint)
    if args.dry_run:
        print(f"dry run: {args.records} records per split and a checkpoint in {root}")
        return

    ray.init(include_dashboard=False, log_to_driver=False)  # the figures are the output; logs: Ray's folder
    records = read_records([str(files["stage1"]), str(files["stage2"]), str(text_only)])
    spec = DataConfig(train_files=["bench"], template="vicuna_v1", image_mode="anyres", model_max_length=4096,
                      image_root=str(root / "data")).row_spec()
    rows, quarantine = preprocess(records, processor_path=checkpoint, spec=spec)
    windows = list(rows.select_columns(["length", "modality"]).iter_batches(
        batch_size=args.window, batch_format="numpy"))
    finish(quarantine)
    ray.shutdown()  # nothing of Ray's prints after the figures: the last line is the README's
    lengths = [int(x) for w in windows for x in w["length"]]
    plain = padding_fraction(b["length"] for b in regroup(windows, args.batch_size, group=False))
    grouped = padding_fraction(b["length"] for b in regroup(windows, args.batch_size, group=True))
    print(f"\n{len(lengths)} rows, lengths {min(lengths)}-{max(lengths)} tokens, micro-batch {args.batch_size}, "
          f"window {args.window}")
    print(f"padding fraction, arrival order:           {plain:.1%}")
    print(f"padding fraction, grouped (modality+length): {grouped:.1%}")
    print(f"padded token slots cut by {1 - grouped / plain:.0%}")
    print(f"padding fraction arrival -> grouped: {plain:.1%} -> {grouped:.1%}")


if __name__ == "__main__":
    main()
