"""The main job: the platform end to end on one recipe (``make demo`` runs it on ``tiny_cpu_demo``).

Today it runs the parts that exist, in the order the finished pipeline runs them:
  1. write the synthetic dataset (coloured shapes, Q&A, held-out questions)
  2. compose the model from its towers (``jobs.compose``)
  3. preprocess the last stage's data with Ray Data on an embedded local Ray (decode, tile, tokenise,
     quarantine)
  4. train in-process on the streamed rows, grouped by modality and length (the demo moves onto
     ``jobs.train`` (Ray Train + DeepSpeed) once that job has checkpoints and MLflow; see the README)
  5. save a Hugging Face checkpoint, reload it with plain transformers, score the held-out questions
     and answer one image question through the checkpoint's own processor

    python -m jobs.pipeline --recipe tiny_cpu_demo
    python -m jobs.pipeline --recipe tiny_cpu_demo --dry-run
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from llava_platform.config import recipe_argument_parser, recipe_from_args, recipe_to_yaml
from llava_platform.data.collate import collate
from llava_platform.data.grouping import regroup
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.synthetic import write_synthetic_dataset
from llava_platform.evaluation import is_correct
from llava_platform.model.build import build_model
from llava_platform.model.compose import load_processor, save_llava
from llava_platform.model.trainability import set_trainable
from pipelines.preprocess import finish, preprocess
from pipelines.sources import read_records


def log(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


def train_in_process(model, rows: list[dict], settings: ImageSettings, *, pad_token_id: int, anyres: bool,
                     steps: int, batch_size: int, lr: float, seed: int, group: bool) -> list[float]:
    """Plain AdamW steps over the preprocessed rows, an epoch at a time (grouped by length if ``group``)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        for batch in regroup(rows, batch_size, group=group, seed=seed + epoch):
            inputs = collate(batch["input_ids"], batch["labels"], list(batch["tiles"]), list(batch["image_size"]),
                             pad_token_id=pad_token_id, anyres=anyres, image_mean=settings.image_mean,
                             image_std=settings.image_std)
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if len(losses) % 25 == 0 or len(losses) == steps:
                log(f"step {len(losses):>4}/{steps}  loss {np.mean(losses[-25:]):.3f}")
            if len(losses) == steps:
                break
        epoch += 1
    return losses


def answer(model, processor, image: Image.Image, question: str, max_new_tokens: int = 12) -> str:
    """Greedy answer through the checkpoint's own processor and chat template."""
    content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
    inputs = processor.apply_chat_template(  # tokenize=True: the template already holds the BOS token
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def evaluate(model, processor, eval_file: Path, image_root: Path) -> dict[str, float]:
    """Accuracy on the held-out split, by question type (``short``: exact match, ``mc``: letter)."""
    records = [json.loads(line) for line in eval_file.read_text().splitlines()]
    correct: dict[str, list[bool]] = {"short": [], "mc": []}
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        image = Image.open(image_root / record["image"]).convert("RGB")
        correct[record["type"]].append(is_correct(answer(model, processor, image, question), record["answer"],
                                                  record["type"]))
    return {kind: float(np.mean(hits)) for kind, hits in correct.items() if hits}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = recipe_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="where data and checkpoints go")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of the in-process training")
    parser.add_argument("--records", type=int, default=200, help="synthetic training records")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after options
    recipe = recipe_from_args(parser, args)
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    stage_name, stage = list(recipe.stages().items())[-1]
    run_dir = args.output / recipe.name

    log(f"1. synthetic dataset -> {run_dir / 'data'}")
    files = write_synthetic_dataset(run_dir / "data", train=args.records, eval=40, seed=recipe.seed)

    log(f"2. composing {recipe.model.arch} from its towers")
    model, processor = build_model(recipe.model, image_mode=stage.data.image_mode, template=stage.data.template,
                                   work_dir=run_dir / "towers")
    initial = save_llava(model, processor, run_dir / "initial")

    log(f"3. Ray Data: {stage.data.image_mode} tiles + {stage.data.template} tokens for {stage_name}")
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    data = stage.data
    rows, quarantine = preprocess(
        read_records([str(files["stage2"])], cpus_per_task=0.5), processor_path=str(initial),
        template=data.template, image_mode=data.image_mode, max_length=data.model_max_length,
        truncation=data.truncation, max_image_pixels=data.max_image_pixels, image_root=str(run_dir / "data"),
        cpus_per_actor=0.5,
    )
    windows = list(rows.iter_batches(batch_size=4 * stage.micro_batch_size, batch_format="numpy"))
    report = finish(quarantine)

    log(f"4. {args.steps} in-process optimizer steps on {stage_name} (lr {stage.optim.lr})")
    settings = ImageSettings.from_processor(processor)
    set_trainable(model, stage.tunable)
    losses = train_in_process(
        model, windows, settings, pad_token_id=processor.tokenizer.pad_token_id,
        anyres=data.image_mode == "anyres", steps=args.steps, batch_size=stage.micro_batch_size,
        lr=stage.optim.lr, seed=recipe.seed, group=data.group_by_modality_length,
    )

    checkpoint = save_llava(model, processor, run_dir / "checkpoint")
    (checkpoint / "llava_platform_recipe.yaml").write_text(recipe_to_yaml(recipe))
    log(f"5. saved {checkpoint}; reloading with plain transformers and scoring the held-out split")
    reloaded = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    served = load_processor(str(checkpoint))
    accuracy = evaluate(reloaded, served, files["eval"], run_dir / "data")
    demo_record = json.loads(files["eval"].read_text().splitlines()[0])
    question = demo_record["conversations"][0]["value"].replace("<image>", "").strip()
    reply = answer(reloaded, served, Image.open(run_dir / "data" / demo_record["image"]).convert("RGB"), question)

    summary = {
        "checkpoint": str(checkpoint),
        "kept / read": f"{report.kept} / {report.read}",
        "loss": f"{np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}",
        "eval short": f"{accuracy.get('short', 0):.0%} exact match (chance <= 33%)",
        "eval mc": f"{accuracy.get('mc', 0):.0%} (chance 25%)",
        "question": f"{question}  [{demo_record['image']}]",
        "answer": f"{reply}  (gold: {demo_record['answer']})",
        "seconds": round(time.perf_counter() - started, 1),
    }
    for key, value in summary.items():
        print(f"{key:>12}: {value}")
    return {"accuracy": accuracy, "losses": losses, "report": report, "checkpoint": checkpoint, "answer": reply}


if __name__ == "__main__":
    main()
