"""The main job: the whole platform on one recipe, end to end (``make demo`` runs it on ``tiny_cpu_demo``).

    python -m jobs.pipeline --recipe tiny_cpu_demo                  # local Ray, local MLflow store, then stops
    python -m jobs.pipeline --recipe tiny_cpu_demo --keep-serving   # leave the endpoint up (Ctrl-C stops it)
    ray job submit --working-dir . -- python -m jobs.pipeline --recipe llava15_7b --output /mnt/shared/run1 \\
        --no-serve tracking.uri=http://mlflow:5000 checkpoint.storage_path=s3://bucket/ckpt

Each step is a job of its own, also runnable alone:
  1. write the synthetic dataset (recipes with a ``synthetic`` section; reused   jobs.synthetic_data
     when the folder already holds it)
  2. compose the starting checkpoint from the towers                               jobs.compose
  3. preprocess with Ray Data into Parquet shards, for stages that name a          jobs.preprocess
     ``data.preprocessed`` folder (reused when its manifest matches); other stages
     stream their preprocessing straight into training
  4. stage 1 -> stage 2 with Ray Train + DeepSpeed, MLflow parent run with a run   jobs.train
     per stage, export registered in the Model Registry
  5. score the stage-1 model and the registered stage-2 model on held-out questions  jobs.evaluate
     (Ray Data batch inference; scores land on each stage's MLflow run)
  6. deploy the registered model on Ray Serve, ask one image question over HTTP       jobs.deploy
     (OpenAI-compatible API), print the answer, delete the application (unless --keep-serving)

Everything a run writes goes to ``--output`` (default ``outputs/<recipe name>/run-<time>``, a new
folder per run, so a rerun never meets the checkpoints of the previous one), ending with
``result.json`` (``RESULT_FILE``).
"""

from __future__ import annotations

import base64
import json
import mimetypes
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from jobs import compose, deploy, evaluate, preprocess, train
from llava_platform import registry
from llava_platform.config import Recipe, recipe_argument_parser, recipe_from_args
from llava_platform.config.schema import EvaluationConfig, SyntheticDataConfig
from llava_platform.data.synthetic import existing_dataset, write_synthetic_dataset
from llava_platform.evaluation import eval_fields, is_correct
from llava_platform.storage import is_remote
from llava_platform.train.checkpoint import PROJECTOR_FILE, export_with_projector
from pipelines.preprocess import ManifestError, shard_files, stage_fingerprint
from serve.app import default_config_path

RESULT_FILE = "result.json"
"""Written into ``--output`` at the end: scores per stage, the demo question and answer, the model URI,
the MLflow tracking URI and run ids, seconds per step (what the summary prints, for scripts)."""


def log(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = recipe_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="where the run writes (default: outputs/<recipe name>/run-<time>)")
    parser.add_argument("--no-serve", action="store_true", help="stop after the evaluation (no Ray Serve step)")
    parser.add_argument("--keep-serving", action="store_true", help="leave the endpoint running until Ctrl-C")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the endpoint (on 127.0.0.1)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after options
    recipe = recipe_from_args(parser, args)
    output = args.output or Path("outputs") / recipe.name / time.strftime("run-%Y%m%d-%H%M%S")
    recipe_args = ["--recipe", args.recipe, *args.overrides]
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    log(f"writing everything to {output}")
    if recipe.synthetic:
        synthetic_dataset(recipe.synthetic, recipe.seed)
        clock = _lap(timings, "synthetic data", clock)

    log(f"2. composing {recipe.model.arch} from its towers")
    initial = compose.main([*recipe_args, "--output", str(output / "initial")])
    clock = _lap(timings, "compose", clock)

    if preprocess_stages(recipe, recipe_args, str(initial)):
        clock = _lap(timings, "preprocess", clock)

    log(f"4. training {', '.join(recipe.stages())} with Ray Train + DeepSpeed")
    stage_outputs = train.main([*recipe_args, "--model", str(initial), "--output", str(output / "train"),
                                "--stage", "all"])
    mlflow_runs = json.loads((output / "train" / train.RUNS_FILE).read_text())
    tracking_uri, runs = mlflow_runs["tracking_uri"], mlflow_runs["runs"]
    model_uri, registered = trained_model_uri(tracking_uri, runs, stage_outputs, str(initial), output)
    clock = _lap(timings, "train", clock)

    scores: dict[str, dict[str, float]] = {}
    if recipe.evaluation:
        log("5. evaluating on the held-out questions with Ray Data")
        scores = evaluate_stages(recipe.evaluation, tracking_uri, runs, stage_outputs, str(initial), model_uri,
                                 output)
        clock = _lap(timings, "evaluate", clock)

    demo = None
    serve_config = yaml.safe_load(default_config_path().read_text())
    if not args.no_serve:
        log(f"6. deploying {model_uri} on Ray Serve")
        url = deploy.deploy(serve_config, model=model_uri, model_name=recipe.name, tracking_uri=tracking_uri,
                            http_host="127.0.0.1", http_port=args.port)
        if recipe.evaluation:
            demo = ask_demo_question(url, recipe.name, recipe.evaluation)
        clock = _lap(timings, "serve", clock)

    print_summary(recipe.name, scores, demo, tracking_uri, runs, registered, model_uri,
                  serving=None if args.no_serve else (args.port, args.keep_serving), timings=timings)
    result = {"scores": scores, "demo": demo, "model_uri": model_uri, "tracking_uri": tracking_uri, "runs": runs,
              "timings": timings}
    (output / RESULT_FILE).write_text(json.dumps(result, indent=1))
    if not args.no_serve:
        _serve_until_stopped(serve_config["applications"][0]["name"], args.keep_serving)
    return result


def synthetic_dataset(settings: SyntheticDataConfig, seed: int) -> dict[str, Path]:
    """Write the recipe's synthetic dataset, or reuse the folder when an earlier run wrote the same one."""
    sizes = dict(train=settings.train_records, eval=settings.eval_records, captions=settings.caption_records)
    files = existing_dataset(settings.out_dir, seed=seed, **sizes)
    if files:
        log(f"1. synthetic dataset: reusing {settings.out_dir} (same sizes and seed)")
        return files
    log(f"1. synthetic dataset -> {settings.out_dir} ({settings.train_records} questions, "
        f"{settings.caption_records or settings.train_records} captions, {settings.eval_records} held out)")
    return write_synthetic_dataset(settings.out_dir, seed=seed, **sizes)


def preprocess_stages(recipe: Recipe, recipe_args: list[str], initial: str) -> bool:
    """Run ``jobs.preprocess`` for every stage whose ``data.preprocessed`` folder lacks matching shards.

    A folder whose manifest matches the stage's settings and ``initial``'s processor is reused; one
    written earlier for other settings is replaced. Returns whether any stage preprocesses ahead of training.
    """
    stages = {name: stage for name, stage in recipe.stages().items() if stage.data.preprocessed}
    for name, stage in stages.items():
        folder = stage.data.preprocessed
        try:
            shard_files(folder, recipe_hash=stage_fingerprint(stage.data.model_dump(), initial))
            log(f"3. {name}: reusing the Parquet shards in {folder}")
            continue
        except ManifestError:
            pass
        log(f"3. {name}: preprocessing {', '.join(stage.data.train_files)} with Ray Data -> {folder}")
        preprocess.main([*recipe_args, "--stage", name.removeprefix("stage"), "--model", initial,
                         "--output", folder, "--overwrite"])
    return bool(stages)


def trained_model_uri(tracking_uri: str, runs: dict[str, str], stage_outputs: dict[str, Path], initial: str,
                      output: Path) -> tuple[str, tuple[str, str] | None]:
    """The model to evaluate and serve: stage 2's registered version (``models:/name/N``), or for a
    stage-1-only recipe the starting checkpoint with the aligned projector."""
    registered = registry.registered_version(tracking_uri, runs["stage2"]) if "stage2" in runs else None
    if registered:
        return f"models:/{registered[0]}/{registered[1]}", registered
    return str(export_with_projector(initial, stage_outputs["stage1"] / PROJECTOR_FILE, output / "stage1-model")), None


def evaluate_stages(settings: EvaluationConfig, tracking_uri: str, runs: dict[str, str],
                    stage_outputs: dict[str, Path], initial: str, model_uri: str,
                    output: Path) -> dict[str, dict[str, float]]:
    """Scores of the final model and, with ``score_stage1``, of the stage-1 model, each on its stage's run."""
    common = dict(data=settings.data_files, image_root=settings.image_root, tracking_uri=tracking_uri,
                  replicas=settings.num_replicas, batch_size=settings.batch_size,
                  cpus_per_replica=settings.cpus_per_replica, gpus_per_replica=settings.gpus_per_replica,
                  max_new_tokens=settings.max_new_tokens)
    scores = {}
    if settings.score_stage1 and {"stage1", "stage2"} <= set(stage_outputs):
        stage1_model = export_with_projector(initial, stage_outputs["stage1"] / PROJECTOR_FILE,
                                             output / "stage1-model")
        scores["stage1"] = evaluate.evaluate(model=str(stage1_model), output=output / "eval" / "stage1",
                                             run_id=runs["stage1"], **common)["scores"]
    final = "stage2" if "stage2" in stage_outputs else "stage1"
    scores[final] = evaluate.evaluate(model=model_uri, output=output / "eval" / final, run_id=runs.get(final),
                                      **common)["scores"]
    return scores


def ask_demo_question(url: str, model_name: str, settings: EvaluationConfig) -> dict[str, Any] | None:
    """Send the first held-out image question to the endpoint (OpenAI chat completions, base64 image)."""
    source = Path(settings.data_files[0])
    if is_remote(settings.data_files[0]) or not settings.image_root or is_remote(settings.image_root):
        log("the demo question needs a local evaluation file and image folder; skipped")
        return None
    record = first_image_record(source.read_text())
    if record is None:
        log(f"the demo question needs an image question in {source}; none is readable there; skipped")
        return None
    question, gold, kind = eval_fields(record)
    image = Path(settings.image_root) / record["image"]
    mime = mimetypes.guess_type(image.name)[0] or "image/png"
    data_url = f"data:{mime};base64,{base64.b64encode(image.read_bytes()).decode()}"
    body = {"model": model_name, "max_tokens": settings.max_new_tokens, "temperature": 0, "messages": [{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                    {"type": "text", "text": question}]}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())["choices"][0]["message"]["content"]
    return {"image": str(image), "question": question, "answer": answer, "gold": gold,
            "correct": is_correct(answer, gold, kind)}


def first_image_record(text: str) -> dict[str, Any] | None:
    """The first record with an image in a JSON array or JSON-lines text; lines that are not JSON objects
    are passed over (the evaluation quarantines them)."""
    if text.lstrip().startswith("["):
        candidates = json.loads(text)
    else:
        candidates = []
        for line in text.splitlines():
            try:
                candidates.append(json.loads(line))
            except ValueError:
                continue
    return next((r for r in candidates if isinstance(r, dict) and r.get("image")), None)


def print_summary(name: str, scores: dict[str, dict[str, float]], demo: dict[str, Any] | None, tracking_uri: str,
                  runs: dict[str, str], registered: tuple[str, str] | None, model_uri: str,
                  serving: tuple[int, bool] | None, timings: dict[str, float]) -> None:
    lines = [f"\n== {name}: done in {sum(timings.values()):.0f} s "
             f"({', '.join(f'{step} {seconds:.0f} s' for step, seconds in timings.items())})"]
    for stage, values in scores.items():
        parts = [f"{kind} {values[f'accuracy/{kind}']:.0%} of {int(values[f'count/{kind}'])}"
                 for kind in ("short", "mc") if f"accuracy/{kind}" in values]
        lines.append(f"{'accuracy ' + stage:<18}{' | '.join(parts)}   (chance 25%)")
    if demo:
        lines.append(f"{'question':<18}{demo['question'].splitlines()[0]}   [{demo['image']}]")
        lines.append(f"{'answer':<18}{demo['answer']!r}   (gold {demo['gold']!r}: "
                     f"{'correct' if demo['correct'] else 'WRONG'})")
    lines.append(f"{'MLflow runs':<18}parent {runs['parent']}, " + ", ".join(
        f"{stage} {run}" for stage, run in runs.items() if stage.startswith("stage")))
    lines.append(f"{'model':<18}{model_uri}" + (f"  (registered {registered[0]} version {registered[1]})"
                                                if registered else ""))
    ui = (f"mlflow ui --backend-store-uri {tracking_uri}   then open http://127.0.0.1:5000"
          if tracking_uri.startswith("sqlite:") else f"open {tracking_uri}")
    lines.append(f"{'MLflow UI':<18}{ui}")
    if serving:
        port, keep = serving
        lines.append(f"{'endpoint':<18}http://127.0.0.1:{port}/v1/chat/completions  "
                     + ("(running; Ctrl-C stops it)" if keep else "(stopped; --keep-serving keeps it up)"))
        lines.append(f"{'':<18}curl http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' "
                     f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")
    print("\n".join(lines), flush=True)


def _serve_until_stopped(application: str, keep_serving: bool) -> None:
    """Keep the endpoint up until Ctrl-C (``--keep-serving``), then delete this job's application only:
    on a shared cluster, other applications on Ray Serve keep running."""
    from ray import serve

    try:
        while keep_serving:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(application)


def _lap(timings: dict[str, float], step: str, since: float) -> float:
    now = time.perf_counter()
    timings[step] = now - since
    return now


if __name__ == "__main__":
    main()
