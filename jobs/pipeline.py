"""The main job: the whole platform on one recipe, end to end (``make demo`` runs it on ``tiny_cpu_demo``).

    python -m jobs.pipeline --recipe tiny_cpu_demo                  # local Ray, local MLflow store, then stops
    python -m jobs.pipeline --recipe tiny_cpu_demo --keep-serving   # leave the endpoint up (Ctrl-C stops it)
    ray job submit --working-dir . -- python -m jobs.pipeline --recipe llava15_7b --output /mnt/shared/run1 \\
        --no-serve tracking.uri=http://mlflow:5000 checkpoint.storage_path=s3://bucket/ckpt

Each step is a job of its own, also runnable alone; this job calls their ``run`` functions and
passes each one's typed result on to the next:
  1. write the synthetic dataset (recipes with a ``synthetic`` section; reused   jobs.synthetic_data
     when the folder already holds it)
  2. compose the starting checkpoint from the towers                               jobs.compose
  3. preprocess with Ray Data into Parquet shards, for stages that name a          jobs.preprocess
     ``data.preprocessed`` folder (reused when its manifest matches); other stages
     stream their preprocessing straight into training
  4. stage 1 -> stage 2 (-> stage 3, DPO) with Ray Train + DeepSpeed, MLflow       jobs.train
     parent run with a run per stage, the last export registered in the Model Registry
  5. score the model before and after the last stage on held-out questions          jobs.evaluate
     (Ray Data batch inference; scores land on each stage's MLflow run); after DPO
     also the held-out preference pairs (pipelines.reference.preference_accuracy)
  6. deploy the registered model on Ray Serve, ask one image question over HTTP       jobs.deploy
     (OpenAI-compatible API), print the answer, delete the application (unless --keep-serving)

Everything a run writes goes to ``--output`` (default ``outputs/<recipe name>/run-<time>``, a new
folder per run, so a rerun never meets the checkpoints of the previous one), ending with
``result.json`` (``RESULT_FILE``). A run in the default place that finishes moves the link
``outputs/<recipe name>/latest`` (``LATEST_LINK``) to its folder: ``serve/config.yaml`` serves
``outputs/tiny-cpu-demo/latest/train/stage2/export``, the model the last ``make demo`` trained.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from jobs import compose, deploy, evaluate, synthetic_data, train
from jobs import preprocess as preprocess_job
from jobs.console import RAY_PROGRESS_ENV, PreflightError, job_log, job_log_file, libraries_to_log
from llava_platform import registry, tracking
from llava_platform.config import Recipe, recipe_argument_parser, recipe_from_args
from llava_platform.config.schema import EvaluationConfig, PreferenceStageConfig
from llava_platform.evaluation import eval_fields, is_correct
from llava_platform.storage import is_remote
from llava_platform.train.checkpoint import EXPORT_DIR, PROJECTOR_FILE, export_with_projector
from pipelines.shards import ManifestError, StageShards
from serve.app import default_config_path

LATEST_LINK = "latest"
"""``outputs/<recipe name>/latest``: a relative link to the last run in the default place that finished."""
RESULT_FILE = "result.json"
"""Written into ``--output`` at the end: scores per stage, the demo question and answer, the model URI,
the MLflow tracking URI and run ids, seconds per step (what the summary prints, for scripts)."""


log = job_log("pipeline")
"""This job's lines on standard error (``jobs.console.say``)."""


def main(argv: list[str] | None = None) -> PipelineResult:
    parser = recipe_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="where the run writes (default: outputs/<recipe name>/run-<time>)")
    parser.add_argument("--no-serve", action="store_true", help="stop after the evaluation (no Ray Serve step)")
    parser.add_argument("--keep-serving", action="store_true", help="leave the endpoint running until Ctrl-C")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the endpoint (on 127.0.0.1)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after options
    recipe = recipe_from_args(parser, args)
    try:
        return run(recipe, output=args.output, serve=not args.no_serve, keep_serving=args.keep_serving,
                   port=args.port)
    except (PreflightError, ManifestError) as error:
        parser.exit(2, f"{error}\n")


@dataclass(frozen=True)
class PipelineResult:
    """What the whole run produced (also written to ``<output>/result.json``)."""

    scores: dict[str, dict[str, float]]
    """Evaluation scores per stage (``evaluate.EvaluationResult.scores``)."""
    demo: dict[str, Any] | None
    """The demo question sent to the endpoint, its answer, the gold answer, and whether it is correct."""
    model_uri: str
    """The trained model: ``models:/<name>/<version>``, or a folder for stage-1-only recipes."""
    tracking_uri: str
    runs: dict[str, str]
    """MLflow ids: ``experiment``, ``parent``, ``stage1``, ``stage2``."""
    timings: dict[str, float]
    """Seconds per step."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(recipe: Recipe, *, output: Path | None = None, serve: bool = True, keep_serving: bool = False,
        port: int = 8000) -> PipelineResult:
    """Every step on ``recipe``, each job's ``run`` fed by the results of the ones before."""
    default_place = output is None
    output = output or Path("outputs") / recipe.name / time.strftime("run-%Y%m%d-%H%M%S")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    log(f"writing everything to {output}")
    job_log_file(Path(output) / "job.log")
    if libraries_to_log():
        log(f"the libraries' own output: {job_log_file()} and Ray's log folder ({RAY_PROGRESS_ENV}=1 shows it here)")
    if recipe.synthetic:
        settings = recipe.synthetic
        log(f"1. synthetic dataset -> {settings.out_dir}")
        synthetic_data.run(settings.out_dir, train=settings.train_records, eval=settings.eval_records,
                           captions=settings.caption_records, seed=recipe.seed,
                           onevision_frames=settings.onevision_frames)
        clock = _lap(timings, "synthetic data", clock)

    log(f"2. composing {recipe.model.arch} from its towers")
    initial = str(compose.run(recipe, output / "initial"))
    clock = _lap(timings, "compose", clock)

    if preprocess_stages(recipe, initial):
        clock = _lap(timings, "preprocess", clock)

    log(f"4. training {', '.join(recipe.stages())} with Ray Train + DeepSpeed")
    trained = train.run(recipe, model=initial, output=output / "train", stage="all")
    tracking_uri, runs = trained.tracking_uri, trained.runs
    model_uri, registered = trained_model_uri(trained, initial, output)
    clock = _lap(timings, "train", clock)

    scores: dict[str, dict[str, float]] = {}
    if recipe.evaluation:
        log("5. evaluating on the held-out questions with Ray Data")
        scores = evaluate_stages(recipe.evaluation, trained, initial, model_uri, output)
        if recipe.stage3 and recipe.evaluation.preference_files:
            log("5. comparing the aligned model with its reference on the held-out preference pairs")
            scores["stage3"].update(score_preferences(recipe, trained, initial, output / "train"))
        clock = _lap(timings, "evaluate", clock)

    demo, deployment = None, None
    if serve:
        log(f"6. deploying {model_uri} on Ray Serve")
        deployment = deploy.run(yaml.safe_load(default_config_path().read_text()), model=model_uri,
                                model_name=recipe.name, tracking_uri=tracking_uri, http_host="127.0.0.1",
                                http_port=port)
        if recipe.evaluation:
            demo = ask_demo_question(deployment.url, recipe.name, recipe.evaluation)
        clock = _lap(timings, "serve", clock)

    result = PipelineResult(scores=scores, demo=demo, model_uri=model_uri, tracking_uri=tracking_uri, runs=runs,
                            timings=timings)
    print_summary(recipe.name, result, registered, serving=(port, keep_serving) if serve else None)
    (output / RESULT_FILE).write_text(json.dumps(result.as_dict(), indent=1))
    if default_place:
        point_latest_at(output)
    if deployment is not None:
        _serve_until_stopped(deployment.application, keep_serving)
    return result


def point_latest_at(run_folder: Path) -> Path:
    """Make ``<run_folder's parent>/latest`` a relative link to ``run_folder``, replaced atomically (a reader
    never finds it missing); returns the link."""
    link = run_folder.parent / LATEST_LINK
    staged = run_folder.parent / f".{LATEST_LINK}.{os.getpid()}"
    staged.unlink(missing_ok=True)
    staged.symlink_to(run_folder.name, target_is_directory=True)
    os.replace(staged, link)
    return link


def preprocess_stages(recipe: Recipe, initial: str) -> bool:
    """Run ``jobs.preprocess`` for every stage whose ``data.preprocessed`` folder lacks matching shards.

    A folder whose manifest matches the stage's settings and ``initial``'s processor is reused; one
    written earlier for other settings is replaced. Stage 3's pairs are scored by the model stage 2 trains, so
    ``jobs.train`` writes them before that stage. Returns whether any stage preprocesses ahead of training.
    """
    stages = {name: stage for name, stage in recipe.stages().items()
              if stage.data.preprocessed and not isinstance(stage, PreferenceStageConfig)}
    for name, stage in stages.items():
        folder = stage.data.preprocessed
        try:
            StageShards.of(stage.data, initial, seed=recipe.seed).files()
            log(f"3. {name}: reusing the Parquet shards in {folder}")
            continue
        except ManifestError:
            pass
        log(f"3. {name}: preprocessing {', '.join(stage.data.train_files)} with Ray Data -> {folder}")
        preprocess_job.run(recipe, stage=name, model=initial, output=folder, overwrite=True)
    return bool(stages)


def trained_model_uri(trained: train.TrainResult, initial: str, output: Path) -> tuple[str, tuple[str, str] | None]:
    """The model to evaluate and serve: the last stage's registered version (``models:/name/N``; stage 2 or 3),
    or for a stage-1-only recipe the starting checkpoint with the aligned projector."""
    runs, last = trained.runs, list(trained.stage_dirs)[-1]
    registered = registry.registered_version(trained.tracking_uri, runs[last]) if last != "stage1" else None
    if registered:
        return f"models:/{registered[0]}/{registered[1]}", registered
    return str(stage1_model(trained, initial, output)), None


def stage1_model(trained: train.TrainResult, initial: str, output: Path) -> Path:
    """The starting checkpoint with stage 1's aligned projector, as a model folder of its own."""
    return export_with_projector(initial, trained.stage_dirs["stage1"] / PROJECTOR_FILE, output / "stage1-model")


def evaluate_stages(settings: EvaluationConfig, trained: train.TrainResult, initial: str, model_uri: str,
                    output: Path) -> dict[str, dict[str, float]]:
    """Scores of the final model and, with ``score_stage1``, of the stage-1 model; after stage 3 also of stage 2's
    export (where DPO started), each on its stage's run."""
    common = dict(data=settings.data_files, image_root=settings.image_root, tracking_uri=trained.tracking_uri,
                  inference=settings.inference())
    stage_dirs, runs = trained.stage_dirs, trained.runs
    scores = {}
    if settings.score_stage1 and {"stage1", "stage2"} <= set(stage_dirs):
        scores["stage1"] = evaluate.run(model=str(stage1_model(trained, initial, output)),
                                        output=output / "eval" / "stage1",
                                        run_id=runs["stage1"], **common).scores
    if {"stage2", "stage3"} <= set(stage_dirs):
        scores["stage2"] = evaluate.run(model=str(stage_dirs["stage2"] / EXPORT_DIR), output=output / "eval" / "stage2",
                                        run_id=runs["stage2"], **common).scores
    final = list(stage_dirs)[-1]
    scores[final] = evaluate.run(model=model_uri, output=output / "eval" / final, run_id=runs.get(final),
                                 **common).scores
    return scores


def score_preferences(recipe: Recipe, trained: train.TrainResult, initial: str, train_output: Path) -> dict[str, float]:
    """The aligned model against its reference (stage 3's starting model) on the held-out preference pairs
    (``evaluation.preference_files``); logged on stage 3's run."""
    from pipelines.preprocess import preprocess
    from pipelines.reference import POLICY_COLUMNS, preference_accuracy
    from pipelines.sources import read_records

    settings, stage = recipe.evaluation, recipe.stage3
    reference = preprocess_job.reference_pass(recipe, stage, train.stage_model(stage, initial, train_output))
    policy = replace(reference, model=str(trained.stage_dirs["stage3"] / EXPORT_DIR), columns=POLICY_COLUMNS)
    spec = replace(stage.data.row_spec(), image_root=settings.image_root)
    rows, _ = preprocess(read_records(settings.preference_files), processor_path=reference.model, spec=spec,
                         pairs=True, cpus_per_actor=recipe.scaling.data_cpus_per_actor)
    scores = preference_accuracy(rows, policy=policy, reference=reference)
    tracking.log_metrics(trained.tracking_uri, trained.runs["stage3"], scores.as_metrics(), step=0)
    return scores.as_metrics()


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
    """The first record with one image in a JSON array or JSON-lines text; lines that are not JSON objects
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
    return next((r for r in candidates if isinstance(r, dict) and isinstance(r.get("image"), str)), None)


def print_summary(name: str, result: PipelineResult, registered: tuple[str, str] | None,
                  serving: tuple[int, bool] | None) -> None:
    scores, demo, runs, timings = result.scores, result.demo, result.runs, result.timings
    model_uri, tracking_uri = result.model_uri, result.tracking_uri
    lines = [f"\n== {name}: done in {sum(timings.values()):.0f} s "
             f"({', '.join(f'{step} {seconds:.0f} s' for step, seconds in timings.items())})"]
    for stage, values in scores.items():
        onevision = "accuracy/video" in values or "accuracy/multi_image" in values
        kinds = ("image", "multi_image", "video") if onevision else ("short", "mc")
        parts = [f"{kind} {values[f'accuracy/{kind}']:.0%} of {int(values[f'count/{kind}'])}"
                 for kind in kinds if f"accuracy/{kind}" in values]
        chance = "chance 25% / 50% / 1 in frames - 1 on the synthetic data" if onevision else "chance 25%"
        lines.append(f"{'accuracy ' + stage:<18}{' | '.join(parts)}   ({chance})")
    if "preference/accuracy" in scores.get("stage3", {}):
        values = scores["stage3"]
        lines.append(f"{'preference stage3':<18}{values['preference/accuracy']:.0%} of "
                     f"{int(values['preference/pairs'])} held-out pairs ranked above the reference (the reference "
                     f"itself: 50%); chosen answer more likely: {values['preference/reference_prefers_chosen']:.0%} "
                     f"-> {values['preference/policy_prefers_chosen']:.0%}")
    if {"stage2", "stage3"} <= set(scores):
        before, after = (1 - scores[stage]["accuracy"] for stage in ("stage2", "stage3"))
        lines.append(f"{'wrong answers':<18}stage2 {before:.0%} -> stage3 {after:.0%} of the held-out questions")
    if demo:
        lines.append(f"{'question':<18}{demo['question'].splitlines()[0]}   [{demo['image']}]")
        lines.append(f"{'answer':<18}{demo['answer']!r}   (gold {demo['gold']!r}: "
                     f"{'correct' if demo['correct'] else 'WRONG'})")
    lines.append(f"{'MLflow runs':<18}parent {runs['parent']}, " + ", ".join(
        f"{stage} {run}" for stage, run in runs.items() if stage.startswith("stage")))
    lines.append(f"{'model':<18}{model_uri}" + (f"  (registered {registered[0]} version {registered[1]})"
                                                if registered else ""))
    ui = (f"mlflow ui --backend-store-uri {tracking_uri}   then open http://127.0.0.1:5000"
          if tracking.local_store_path(tracking_uri) else f"open {tracking_uri}")
    lines.append(f"{'MLflow UI':<18}{ui}")
    if serving:
        port, keep = serving
        lines.append(f"{'endpoint':<18}http://127.0.0.1:{port}/v1/chat/completions  "
                     + ("(running; Ctrl-C stops it)" if keep else "(stopped; --keep-serving keeps it up)"))
        if keep:
            lines.append(f"{'chat page':<18}http://127.0.0.1:{port}/   (open it in a browser: upload an image, ask)")
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
