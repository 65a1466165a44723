"""The end-to-end job as users run it: ``ray job submit ... -- python -m jobs.pipeline`` on the tiny
recipe as LLaVA-NeXT, against the session's head node and ``mlflow server`` (``pipeline_run``).

Every assertion about that one run lives here: the jobs it chains, what reached MLflow, what stage 1
(ZeRO-3) and stage 2 trained, the export, the evaluation (bad records among the good), the endpoint
it served, and the secrets it never wrote down. Then ``jobs.deploy`` is submitted the same way and
answers over HTTP.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import mlflow
import openai
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava_platform import tracking
from llava_platform.evaluation import eval_fields, is_correct
from llava_platform.generation.engine import answer_questions
from llava_platform.generation.transformers import TransformersEngine
from llava_platform.model.compose import load_pretrained_llava
from llava_platform.model.trainability import part_of
from llava_platform.train.checkpoint import PROJECTOR_FILE
from llava_platform.train.deepspeed_engine import CHECKPOINT_TAG
from tests.helpers.console import noise
from tests.helpers.corpus import EVAL_BAD_RECORDS
from tests.helpers.losses import found_loss, record_loss
from tests.helpers.pipeline_job import SECRET
from tests.helpers.recipes import REGISTERED_NAME, STEPS
from tests.helpers.training import assert_export_reproduces_engine, losses, weights


def test_the_job_chains_every_step_and_prints_its_summary(pipeline_run):
    log = pipeline_run.log
    assert "succeeded" in log and "accuracy stage2" in log
    # rank 0's progress lines, and none of Ray Data's own bars or execution logs (jobs.console)
    assert f"step {STEPS}/{STEPS} (100%) loss" in log and "samples/s, 0 s left" in log
    assert log.count(f"step {STEPS}/{STEPS} (100%) loss") == 2, "each stage's last progress line, once"
    # the preprocessing driver's opening line counts what it then reads (its manifest's count)
    manifest = json.loads((pipeline_run.job.root / "shards2" / "manifest.json").read_text())
    assert f"[preprocess] stage2: {manifest['counts']['read']:,} records in 1 file(s)" in log
    rows = pq.read_table(pipeline_run.job.root / "shards2" / "shards", columns=["length", "num_tiles"])
    lengths = manifest["lengths"]  # what the memory planner plans with
    assert lengths["rows"] == manifest["counts"]["kept"] == rows.num_rows
    assert lengths["max_tokens"] == max(rows["length"].to_pylist()) >= lengths["p99_tokens"] > 0
    assert lengths["max_tiles"] == max(rows["num_tiles"].to_pylist()) > 0
    for ray_data_line in ("Running Dataset", "Total Progress", "Starting execution of Dataset",
                          "execution finished in"):
        assert ray_data_line not in log, f"Ray Data's own output reached the job log: {ray_data_line!r}"
    for step in ("compose", "preprocess", "train", "evaluate", "serve"):
        assert step in pipeline_run.result["timings"], f"no {step} step"
    # the job composed the same starting checkpoint as this process: composition is seeded
    ours, theirs = pipeline_run.job.initial, pipeline_run.job.output / "initial"
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()


def test_mlflow_holds_the_runs_params_metrics_and_registered_model(pipeline_run, mlflow_server):
    client, runs = tracking.client_for(mlflow_server), pipeline_run.runs
    parent = client.get_run(runs["parent"])
    assert parent.info.status == "FINISHED" and parent.data.params["model.arch"] == "llava_next"
    assert parent.data.params["model.image_size"] == "56"
    assert "recipe.yaml" in [a.path for a in client.list_artifacts(runs["parent"])]
    for stage in ("stage1", "stage2"):
        run = client.get_run(runs[stage])
        assert run.data.tags[tracking.PARENT_TAG] == runs["parent"] and run.info.status == "FINISHED"
        history = losses(client, runs[stage])
        assert sorted(history) == list(range(1, STEPS + 1)), f"{stage}: not one record per step: {history}"
        assert history[STEPS] < history[1], f"{stage} loss did not fall: {history}"
        assert run.data.metrics["data/read"] == run.data.metrics["data/kept"] == 24
    stage2_metrics = client.get_run(runs["stage2"]).data.metrics  # preprocessed: counted per source too
    assert stage2_metrics["data/source/stage2.jsonl/kept"] == stage2_metrics["data/source/stage2.jsonl/taken"] == 24
    stage2 = client.get_run(runs["stage2"])
    assert stage2.data.params["total_steps"] == str(STEPS)
    assert stage2.data.params["tunable"] == "['projector', 'language_model']"
    for name in ("grad_norm", "samples_per_s", "tokens_per_s", "data_wait_fraction", "lr/projector",
                 "lr/language_model"):
        assert client.get_metric_history(runs["stage2"], name), f"no {name} metric"
    assert any(key.startswith("system/") for key in stage2.data.metrics), "no system metrics"
    assert PROJECTOR_FILE in [a.path for a in client.list_artifacts(runs["stage1"])]

    name, version = pipeline_run.result["model_uri"].removeprefix("models:/").split("/")
    assert name == REGISTERED_NAME and client.get_model_version(name, version).run_id == runs["stage2"]
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    image = next((pipeline_run.job.data / "images").iterdir())
    answers = model.predict([{"prompt": "What is in the image?", "image": str(image)}])
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_stage1_trained_only_the_projector_under_zero3(pipeline_run):
    """Stage 1 ran under ZeRO-3 (every weight sharded over the 2 workers); its projector was gathered whole.
    (The frozen weights of stage 1, bit for bit, are checked on the fault test's ZeRO-2 run of it.)"""
    before = weights(pipeline_run.job.output / "initial")
    projector = load_file(str(pipeline_run.train / "stage1" / PROJECTOR_FILE))
    assert set(projector) == {n for n in before if part_of(n) == "projector"} and "model.image_newline" in projector
    assert all(t.shape == before[n].shape for n, t in projector.items()), "ZeRO-3 placeholders were saved"
    assert all(not torch.equal(projector[n], before[n]) for n in projector), "stage 1 left a projector weight as is"
    shards = list((pipeline_run.checkpoint("stage1", STEPS) / CHECKPOINT_TAG).glob("*zero_pp_rank_*_model_states.pt"))
    assert len(shards) == 2, "not a ZeRO-3 checkpoint of 2 ranks"


def test_stage2_export_reloads_with_plain_transformers(pipeline_run):
    before, after = weights(pipeline_run.job.output / "initial"), weights(pipeline_run.train / "stage2" / "export")
    vision = [n for n in before if n.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(after[n], before[n]) for n in vision), "the frozen tower changed"
    lm = [n for n in before if n.startswith("model.language_model.layers.")]
    assert any(not torch.equal(after[n], before[n]) for n in lm), "stage 2 did not train the language model"
    assert_export_reproduces_engine(pipeline_run.train / "stage2")


def test_both_stages_are_scored_on_their_own_runs(pipeline_run, mlflow_server):
    client, result = tracking.client_for(mlflow_server), pipeline_run.result
    assert set(result["scores"]) == {"stage1", "stage2"}
    for stage, scores in result["scores"].items():
        assert scores["count/short"] + scores["count/mc"] == 8 and 0 <= scores["accuracy"] <= 1
        metrics = client.get_run(pipeline_run.runs[stage]).data.metrics
        assert metrics["eval/accuracy"] == pytest.approx(scores["accuracy"]) and "eval/accuracy/mc" in metrics
        artifacts = {a.path for a in client.list_artifacts(pipeline_run.runs[stage], "evaluation")}
        assert artifacts >= {"evaluation/predictions.jsonl", "evaluation/scores.json", "evaluation/quarantine.jsonl"}


def test_every_good_evaluation_record_is_answered_once_as_one_at_a_time(pipeline_run):
    """Stage 2's evaluation (Ray Data batch inference on ``models:/``, 4 questions per generate call,
    left-padded) answers each good record once, as the exported model answers it alone."""
    good = [json.loads(line) for line in (pipeline_run.job.data / "eval.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (pipeline_run.job.output / "eval" / "stage2" / "predictions.jsonl")
            .read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in good)
    for row in rows:
        assert row["correct"] == is_correct(row["prediction"], row["answer"], row["type"])
    scores = pipeline_run.result["scores"]["stage2"]
    assert scores["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    model, processor = load_pretrained_llava(str(pipeline_run.train / "stage2" / "export"))
    model.eval()
    by_id = {r["id"]: r for r in good}
    for row in rows[:4]:
        question, _, _ = eval_fields(by_id[row["id"]])
        image = Image.open(pipeline_run.job.data / by_id[row["id"]]["image"]).convert("RGB")
        engine = TransformersEngine(model, processor, "cpu")
        assert answer_questions(engine, [(image, question)], max_new_tokens=8) == [row["prediction"]]


# 37 s: `make chaos` (suite budget). make test keeps vLLM's parity with transformers on the engine (LLaVA-NeXT,
# test_vllm_engine.py) and over HTTP (test_endpoint.py); make chaos also runs the benchmarks' batch path on vLLM.
@pytest.mark.chaos
def test_the_export_evaluates_to_the_same_predictions_on_the_vllm_engine(pipeline_run, mlflow_server, tmp_path):
    """``jobs.evaluate --engine vllm`` on the training export as it was written (llava-hf layout, LLaVA-NeXT):
    vLLM loads it and answers every question as transformers did in the job."""
    from jobs import evaluate
    from llava_platform.config.schema import InferenceConfig
    from tests.helpers.endpoint import VLLM_TEST_SETTINGS

    result = evaluate.run(model=str(pipeline_run.train / "stage2" / "export"), tracking_uri=mlflow_server,
                          data=[str(pipeline_run.job.data / "eval.jsonl")], image_root=str(pipeline_run.job.data),
                          output=tmp_path, inference=InferenceConfig(batch_size=8, max_new_tokens=8, engine="vllm",
                                                                     vllm=VLLM_TEST_SETTINGS))
    by_transformers = {r["id"]: r for r in map(json.loads, (pipeline_run.job.output / "eval" / "stage2" /
                                                           "predictions.jsonl").read_text().splitlines())}
    by_vllm = {r["id"]: r for r in map(json.loads, result.predictions.read_text().splitlines())}
    assert sorted(by_vllm) == sorted(by_transformers) and result.report.kept == len(by_vllm) == 8
    for key, row in by_vllm.items():
        assert row["prediction"] == by_transformers[key]["prediction"], key
    assert result.scores["accuracy"] == pipeline_run.result["scores"]["stage2"]["accuracy"]


def test_bad_evaluation_records_are_quarantined_with_their_reason(pipeline_run, mlflow_server):
    metrics = tracking.client_for(mlflow_server).get_run(pipeline_run.runs["stage2"]).data.metrics
    assert metrics["eval/data/read"] == 8 + len(EVAL_BAD_RECORDS) + 1 and metrics["eval/data/kept"] == 8
    assert {k: v for k, v in metrics.items() if k.startswith("eval/data/quarantined/")} == {
        "eval/data/quarantined/malformed_json": 1, "eval/data/quarantined/bad_eval_record": 2,
        "eval/data/quarantined/missing_image": 1}
    quarantine = pipeline_run.job.output / "eval" / "stage2" / "quarantine.jsonl"
    quarantined = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert {q["id"] for q in quarantined} >= {"no-gold", "gone", "odd-type"}
    assert any("'type' is 'essay'" in q["message"] for q in quarantined)


def test_the_jobs_console_holds_only_lines_a_person_can_act_on(pipeline_run):
    """The submitted job's console (what ``ray job submit`` shows): our lines, the summary, nothing else; the
    libraries' output went to the run's ``job.log`` and Ray's log folder."""
    job_output = pipeline_run.log[pipeline_run.log.index("[pipeline] writing everything to"):]
    assert not noise(job_output), "\n".join(noise(job_output))
    assert "the libraries' own output:" in job_output and "[train rank 0] step" in job_output


def test_the_endpoint_answered_one_question_and_was_removed(pipeline_run):
    demo = pipeline_run.result["demo"]
    assert demo["question"].startswith("What colour is the")
    assert isinstance(demo["answer"], str) and demo["correct"] == is_correct(demo["answer"], demo["gold"], "short")
    assert "question" in pipeline_run.log and repr(demo["answer"]) in pipeline_run.log
    with pytest.raises(OSError):  # the job deleted its application at the end (no --keep-serving)
        urllib.request.urlopen(f"http://127.0.0.1:{pipeline_run.port}/healthz", timeout=5)


@pytest.mark.fault("security: secrets in AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN, HF_TOKEN of a submitted job")
def test_secrets_appear_in_no_mlflow_param_or_tag_and_no_output(pipeline_run, mlflow_server, record_property):
    client = tracking.client_for(mlflow_server)
    places = {"job output": pipeline_run.log}
    for run in ("parent", "stage1", "stage2"):
        data = client.get_run(pipeline_run.runs[run]).data
        places.update({f"{run} param {k}": str(v) for k, v in data.params.items()})
        places.update({f"{run} tag {k}": str(v) for k, v in data.tags.items()})
    leaked = [place for place, text in places.items() if SECRET in text]
    loss, = record_loss(record_property, found_loss("places leaking a secret", leaked, checked=len(places)))
    assert not loss.count, loss


@pytest.mark.chaos  # a second submitted job (~27 s); the job itself deploys the registered model in make test
def test_the_deploy_job_serves_the_registered_model(pipeline_run, ray_cluster, mlflow_server, tmp_path):
    """``jobs.deploy`` returns once the deployment is accepted; the endpoint stays up after it."""
    from ray import serve

    port = pipeline_run.port
    ray_cluster.submit("jobs.deploy", "--model", pipeline_run.result["model_uri"], "--model-name", "submitted",
                       "--tracking-uri", mlflow_server, "--http-host", "127.0.0.1", "--http-port", str(port),
                       log=tmp_path / "deploy.log").wait(timeout_s=300)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    deadline = time.monotonic() + 120  # the replica may still be loading
    while True:
        try:
            reply = client.chat.completions.create(model="submitted", max_tokens=4, temperature=0,
                                                   messages=[{"role": "user", "content": "Hello"}])
            break
        except (openai.APIConnectionError, openai.InternalServerError, openai.NotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens <= 4
    serve.delete("llava")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
