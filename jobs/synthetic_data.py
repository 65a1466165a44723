"""Write the synthetic LLaVA-format dataset (coloured shapes) used by the demo and the tests.

    python -m jobs.synthetic_data --output outputs/tiny-cpu-demo/data --train 200 --eval 100 --seed 0

A folder that already holds the same dataset (same sizes and seed) is reused, not rewritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_platform.data.synthetic import existing_dataset, write_synthetic_dataset


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--train", type=int, default=200, help="records per training split")
    parser.add_argument("--eval", type=int, default=100, help="held-out records")
    parser.add_argument("--captions", type=int, help="caption records (default: as many as --train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--onevision-frames", type=int,
                        help="OneVision questions (one image, two images, video in turn), videos of this many frames")
    args = parser.parse_args(argv)
    files = run(args.output, train=args.train, eval=args.eval, captions=args.captions, seed=args.seed,
                onevision_frames=args.onevision_frames)
    for name, path in files.items():
        print(f"{name:>7}: {path}")
    return files


def run(output: str | Path, *, train: int, eval: int, seed: int, captions: int | None = None,
        onevision_frames: int | None = None) -> dict[str, Path]:
    """Write the dataset into ``output``, or reuse it there; returns the split files by name."""
    sizes = dict(train=train, eval=eval, captions=captions, onevision_frames=onevision_frames)
    files = existing_dataset(output, seed=seed, **sizes)
    if files:
        print(f"[synthetic_data] reusing {output} (same sizes and seed)", file=sys.stderr, flush=True)
        return files
    print(f"[synthetic_data] writing {output} ({train} questions, {captions or train} captions, {eval} held out)",
          file=sys.stderr, flush=True)
    return write_synthetic_dataset(output, seed=seed, **sizes)


if __name__ == "__main__":
    main()
