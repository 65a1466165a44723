"""Performance: our anyres preprocessing vs transformers' LlavaNextImageProcessor vs the Pillow floor.

Prints, from one run on the same JPEGs (mixed sizes, 336 px tiles, the default LLaVA-NeXT
pinpoints):
  1. images/s on one core (single process, interleaved repetitions, medians) for
     - ours:   decode_image (EXIF, RGB, pixel limit) + tile_anyres -> uint8 tiles
     - transformers: PIL decode + LlavaNextImageProcessor (PIL backend) -> float32 pixel_values
     - floor:  PIL decode + one resize to the chosen grid resolution
  2. bytes per sample: our uint8 tiles vs float32 pixel_values
  3. the Ray Data pipeline on 2k and 10x as many records: wall time and peak resident memory of the
     driver plus all Ray workers (streaming: time grows with the data, memory does not)

    python -m jobs.perf.preprocess                    # 200 images, 2k vs 20k records
    python -m jobs.perf.preprocess --images 200 --records 500   # quicker
    python -m jobs.perf.preprocess --quick            # 8 images, 16 vs 160 records
    python -m jobs.perf.preprocess --dry-run          # 2 images, one pass of part 1 (the test suite's)

The last line is ``preprocess ours/transformers images/s: <x>, bytes uint8/float32: <y>, peak memory at 10x
records: x<z>`` (without the pipeline part, the memory figure reads ``-``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from jobs.perf.memory import PeakMemory  # noqa: E402
from llava_platform.data.geometry import best_anyres_resolution, fit_within  # noqa: E402
from llava_platform.data.image_settings import ImageSettings  # noqa: E402
from llava_platform.data.images import decode_image  # noqa: E402

PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth gradients + noise) from 200 px to 1600 px a side, mixed aspect ratios."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = (int(x) for x in rng.integers(200, 1600, size=2))
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def time_per_image(fn, blobs: list[bytes]) -> float:
    started = time.perf_counter()
    for blob in blobs:
        fn(blob)
    return (time.perf_counter() - started) / len(blobs)


def single_core(blobs: list[bytes], repeats: int) -> dict[str, float]:
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    settings = ImageSettings(336, 14, CLIP_MEAN, CLIP_STD, tuple(PINPOINTS))
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )

    def ours(blob):
        return settings.tile(decode_image(blob, 100_000_000), "anyres")

    def transformers(blob):
        return processor(images=Image.open(io.BytesIO(blob)).convert("RGB"), return_tensors="np")["pixel_values"]

    def floor(blob):
        image = Image.open(io.BytesIO(blob)).convert("RGB")
        size = (image.height, image.width)
        height, width = fit_within(size, best_anyres_resolution(size, PINPOINTS))
        return image.resize((width, height), Image.Resampling.BICUBIC)

    paths = {"ours": ours, "transformers": transformers, "floor": floor}
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):  # interleaved, so drift on a noisy machine hits all three alike
        for name, fn in paths.items():
            samples[name].append(time_per_image(fn, blobs))
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    ours_bytes = statistics.mean(ours(b).nbytes for b in blobs[:50])
    hf_bytes = statistics.mean(transformers(b).nbytes for b in blobs[:50])
    return {"seconds": seconds, "ours_bytes": ours_bytes, "hf_bytes": hf_bytes}


def pipeline_run(root: Path, images: list[Path], records: int, checkpoint: str) -> tuple[float, int, int]:
    import ray

    from llava_platform.config.schema import DataConfig
    from pipelines.preprocess import preprocess
    from pipelines.sources import read_records

    data = root / f"records_{records}.jsonl"
    with data.open("w") as f:
        for i in range(records):
            f.write(json.dumps({"id": str(i), "image": images[i % len(images)].name, "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A gradient."}]})
                    + "\n")
    spec = DataConfig(train_files=["bench"], template="plain", image_mode="anyres", model_max_length=4096,
                      image_root=str(images[0].parent)).row_spec()
    rows, _ = preprocess(read_records([str(data)]), processor_path=checkpoint, spec=spec, num_actors=(1, 2),
                         records_per_call=8)
    seen = 0
    with PeakMemory(ray_workers=True, interval=0.2) as memory:
        started = time.perf_counter()
        for batch in rows.iter_batches(batch_size=32, batch_format="numpy"):
            seen += len(batch["id"])
        seconds = time.perf_counter() - started
    ray.get(_.report.remote())  # drain the quarantine actor's queue
    return seconds, memory.peak, seen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--records", type=int, default=2000, help="small pipeline run; the large one is 10x")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--quick", action="store_true", help="8 images, one repeat, 16 vs 160 records")
    parser.add_argument("--dry-run", action="store_true", help="2 images, one repeat, no Ray Data part")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.records = 8, 1, 16
    if args.dry_run:
        args.images, args.repeats, args.skip_pipeline = 2, 1, True
    root = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    images = make_jpegs(root / "images", args.images)
    blobs = [p.read_bytes() for p in images]
    print(f"{len(blobs)} JPEGs, {np.mean([len(b) for b in blobs]) / 1e3:.0f} kB mean, in {root}")

    result = single_core(blobs, args.repeats)
    per_second = {name: 1.0 / s for name, s in result["seconds"].items()}
    print("\n1. single core, images/s (median of", args.repeats, "interleaved runs)")
    for name, rate in per_second.items():
        print(f"   {name:<13} {rate:8.1f}")
    print(f"   ours / transformers = {per_second['ours'] / per_second['transformers']:.2f}x   (target >= 3x)")
    print(f"   ours / floor        = {per_second['ours'] / per_second['floor']:.2f}x   (target >= 0.7x)")
    ratio = result["ours_bytes"] / result["hf_bytes"]
    print("\n2. bytes per sample")
    print(f"   ours uint8 tiles      {result['ours_bytes'] / 1e6:6.2f} MB")
    print(f"   transformers float32  {result['hf_bytes'] / 1e6:6.2f} MB   ratio {ratio:.2f}   (target <= 0.25)")
    speed = per_second["ours"] / per_second["transformers"]
    if args.skip_pipeline:
        print(f"preprocess ours/transformers images/s: {speed:.2f}, bytes uint8/float32: {ratio:.2f}, "
              "peak memory at 10x records: -")
        return

    import ray

    from llava_platform.model.compose import compose_llava, save_llava
    from llava_platform.model.tiny import save_tiny_language_model, save_tiny_vision_tower

    ray.init(include_dashboard=False, log_to_driver=False)  # the figures are the output; logs: Ray's folder
    checkpoint = str(root / "checkpoint")
    save_llava(*compose_llava(
        str(save_tiny_vision_tower(root / "clip", image_size=336, patch_size=14)),
        str(save_tiny_language_model(root / "llama")),
        arch="llava_next", projector="mlp2x_gelu", vision_feature_layer=-2, image_size=336, image_mode="anyres",
        template="plain", pinpoints=PINPOINTS), checkpoint)
    print(f"\n3. Ray Data pipeline (anyres, 336 px), {int(ray.cluster_resources()['CPU'])} CPUs")
    runs = {}
    for records in (args.records, 10 * args.records):
        seconds, peak, seen = pipeline_run(root, images, records, checkpoint)
        runs[records] = (seconds, peak)
        print(f"   {records:>7,} records: {seconds:7.1f} s, {seen / seconds:6.1f} records/s, "
              f"peak RSS (driver + workers) {peak / 2**30:5.2f} GiB")
    ray.shutdown()  # nothing of Ray's prints after the figures: the last line is the README's
    (small_s, small_peak), (large_s, large_peak) = runs.values()
    print(f"   10x the records: time x{large_s / small_s:.1f}, peak memory x{large_peak / small_peak:.2f}")
    print(f"preprocess ours/transformers images/s: {speed:.2f}, bytes uint8/float32: {ratio:.2f}, "
          f"peak memory at 10x records: x{large_peak / small_peak:.2f}")


if __name__ == "__main__":
    main()
