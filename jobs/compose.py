"""Compose a LLaVA model from a recipe and save it as a Hugging Face directory.

The result is the starting checkpoint of stage 1: towers loaded, projector initialised, tokenizer
with the image token, and a processor that tiles and templates like the recipe's last stage.

    python -m jobs.compose --recipe tiny_cpu_demo --output outputs/tiny/initial
    python -m jobs.compose --recipe llava15_7b --output /mnt/ckpt/llava15-7b-initial
    python -m jobs.compose --recipe llava15_7b --dry-run stage2.optim.lr=1e-5
"""

from __future__ import annotations

import sys
from pathlib import Path

from llava_platform.config import Recipe, recipe_argument_parser, recipe_from_args, recipe_to_yaml
from llava_platform.config.build import write_model


def main(argv: list[str] | None = None) -> Path:
    parser = recipe_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="directory to save the composed checkpoint to")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after options
    recipe = recipe_from_args(parser, args)
    if args.output is None:
        parser.error("--output is required")
    return run(recipe, args.output)


def run(recipe: Recipe, output: Path) -> Path:
    """Compose the recipe's model, save it (with the resolved recipe) to ``output``; returns ``output``.

    The checkpoint is written one shard at a time, never the whole model in memory (``model.streamed``).
    """
    final_stage = list(recipe.stages().values())[-1]
    name, params = write_model(
        recipe.model,
        output,
        image_mode=final_stage.data.image_mode,
        template=final_stage.data.template,
        work_dir=output.parent / f"{output.name}_towers",
    )
    (output / "llava_platform_recipe.yaml").write_text(recipe_to_yaml(recipe))
    print(f"saved {name} ({params:,} parameters) to {output}", file=sys.stderr)
    return output


if __name__ == "__main__":
    main()
