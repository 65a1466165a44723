"""Write the synthetic LLaVA-format dataset (coloured shapes) used by the demo and the tests.

    python -m jobs.synthetic_data --output outputs/tiny-cpu-demo/data --train 200 --eval 100 --seed 0
"""

from __future__ import annotations

import argparse

from llava_platform.data.synthetic import write_synthetic_dataset


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--train", type=int, default=200, help="records per training split")
    parser.add_argument("--eval", type=int, default=100, help="held-out records")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    files = write_synthetic_dataset(args.output, train=args.train, eval=args.eval, seed=args.seed)
    for name, path in files.items():
        print(f"{name:>7}: {path}")
    return files


if __name__ == "__main__":
    main()
