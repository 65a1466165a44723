"""The main job: the platform end to end on one recipe (``make demo`` runs it on ``tiny_cpu_demo``).

Today it runs the parts that exist, in the order the finished pipeline will run them:
compose the model from its towers -> decode, tile and tokenise samples with the core library ->
a few optimizer steps on the recipe's last stage -> save a Hugging Face checkpoint -> reload it with
plain transformers and answer a question about an image through the checkpoint's own processor.
The Ray Data pipeline, Ray Train + DeepSpeed stages, MLflow tracking and the Ray Serve endpoint
replace the in-process steps as they land (see the README's status table).

    python -m jobs.pipeline --recipe tiny_cpu_demo
    python -m jobs.pipeline --recipe tiny_cpu_demo --dry-run
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText

from llava_platform.config import recipe_argument_parser, recipe_from_args, recipe_to_yaml
from llava_platform.data.collate import collate
from llava_platform.data.conversation import tokenize_conversation
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.images import decode_image
from llava_platform.data.templates import IMAGE_PLACEHOLDER, resolve_chat_template
from llava_platform.model.build import build_model
from llava_platform.model.compose import load_processor, save_llava

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def log(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


def synthetic_samples(count: int, seed: int) -> list[tuple[bytes, list[dict[str, str]]]]:
    """PNG bytes of a coloured square on grey, with a LLaVA-format question about its colour."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        name = rng.choice(list(COLOURS))
        width, height = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        image = Image.new("RGB", (width, height), (128, 128, 128))
        side = min(width, height) // 2
        left, top = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        ImageDraw.Draw(image).rectangle((left, top, left + side, top + side), fill=COLOURS[name])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        conversation = [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nWhat colour is the square?"},
            {"from": "gpt", "value": str(name)},
        ]
        samples.append((buffer.getvalue(), conversation))
    return samples


def main(argv: list[str] | None = None) -> dict[str, object] | None:
    parser = recipe_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="where checkpoints are written")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the in-process training")
    args = parser.parse_args(argv)
    recipe = recipe_from_args(parser, args)
    if args.dry_run:
        print(recipe_to_yaml(recipe))
        return None
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    stage_name, stage = list(recipe.stages().items())[-1]
    run_dir = args.output / recipe.name

    log(f"composing {recipe.model.arch} from its towers")
    model, processor = build_model(
        recipe.model, image_mode=stage.data.image_mode, template=stage.data.template, work_dir=run_dir / "towers"
    )
    settings = ImageSettings.from_processor(processor)
    template = resolve_chat_template(stage.data.template, processor.chat_template)

    log(f"preparing samples: decode -> {stage.data.image_mode} tiles -> {stage.data.template} tokens + labels")
    rows = []
    for data, conversation in synthetic_samples(16, recipe.seed):
        image = decode_image(data, stage.data.max_image_pixels)
        size = (image.height, image.width)
        sample = tokenize_conversation(
            conversation, processor.tokenizer, template,
            tokens_per_image=[settings.token_count(size, stage.data.image_mode)], image_token=IMAGE_PLACEHOLDER,
            max_length=stage.data.model_max_length, truncation=stage.data.truncation,
        )
        rows.append((sample, settings.tile(image, stage.data.image_mode), size))
    batch = collate(
        [r[0].input_ids for r in rows], [r[0].labels for r in rows], [r[1] for r in rows], [r[2] for r in rows],
        pad_token_id=processor.tokenizer.pad_token_id, anyres=stage.data.image_mode == "anyres",
        image_mean=settings.image_mean, image_std=settings.image_std,
    )
    log(f"batch: input_ids {tuple(batch['input_ids'].shape)}, pixel_values {tuple(batch['pixel_values'].shape)}")

    log(f"{args.steps} in-process optimizer steps on {stage_name} (lr {stage.optim.lr}); Ray Train comes next")
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.optim.lr)
    model.train()
    losses = []
    for _ in range(args.steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    log(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    checkpoint = save_llava(model, processor, run_dir / "checkpoint")
    (checkpoint / "llava_platform_recipe.yaml").write_text(recipe_to_yaml(recipe))
    log(f"saved Hugging Face checkpoint to {checkpoint}; reloading it with plain transformers")
    reloaded = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    served = load_processor(str(checkpoint))
    image = Image.new("RGB", (80, 60), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((20, 15, 50, 45), fill=COLOURS["blue"])
    question = [{"type": "image", "image": image}, {"type": "text", "text": "What colour is the square?"}]
    inputs = served.apply_chat_template(  # tokenize=True: the template already holds the BOS token
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = reloaded.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = served.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    summary = {
        "checkpoint": str(checkpoint),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "question": "What colour is the square? (image: a blue square)",
        "answer": answer,
        "seconds": round(time.perf_counter() - started, 1),
    }
    for key, value in summary.items():
        print(f"{key:>10}: {value}")
    return summary


if __name__ == "__main__":
    main()
