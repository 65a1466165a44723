"""jobs.train on 2 CPU workers: both stages under ZeRO-2 and ZeRO-3 + LoRA, MLflow, checkpoints, resume.

The runs are module fixtures shared by several tests: a stage takes about a minute on 2 cores.
"""

import json

import boto3
import mlflow
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from jobs import compose, train
from jobs import preprocess as preprocess_job
from jobs.train_worker import EXPORT_CHECK_FILE
from llava_platform import tracking
from llava_platform.data.synthetic import write_synthetic_dataset
from llava_platform.train.checkpoint import PROJECTOR_FILE
from llava_platform.train.engine import CHECKPOINT_TAG

RECIPE = "tiny-cpu-demo"
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    files = write_synthetic_dataset(root / "data", train=24, eval=1, seed=0)
    initial = compose.main(["--recipe", "tiny_cpu_demo", "--output", str(root / "initial")])
    overrides = [
        f"stage1.data.train_files=[{files['stage1']}]", f"stage2.data.train_files=[{files['stage2']}]",
        f"stage1.data.image_root={root / 'data'}", f"stage2.data.image_root={root / 'data'}",
        "stage1.global_batch_size=4", "stage1.micro_batch_size=2", "stage2.global_batch_size=4",
        "stage2.micro_batch_size=1", f"stage1.max_steps={STEPS}", f"stage2.max_steps={STEPS}",
        "stage1.optim.lr=0.01", "checkpoint.every_n_steps=2", "tracking.system_metrics_interval_s=1",
        "stage1.data.preprocessed=null", "stage2.data.preprocessed=null",  # streamed into the workers
    ]
    return root, initial, files, overrides


def run(setup, output, *extra):
    root, initial, _, overrides = setup
    return train.main(["--recipe", "tiny_cpu_demo", "--model", str(initial), "--output", str(root / output),
                       *overrides, *extra])


def weights(path):
    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


def checkpoint_dir(out, stage, step):
    return out[stage].parent / "checkpoints" / f"{RECIPE}-{stage}" / f"{stage}-step{step:08d}"


def mlflow_runs(out):
    """The run ids jobs.train wrote next to its outputs: ``parent``, ``stage1``, ``stage2``."""
    return json.loads((next(iter(out.values())).parent / train.RUNS_FILE).read_text())["runs"]


def stage_runs(client, parent_run_id):
    children = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {run.info.run_name: run for run in children}


def losses(client, run_id):
    """The loss per step."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)}


def latest_version(client):
    return max(client.search_model_versions(f"name = '{RECIPE}'"), key=lambda v: int(v.version))


def assert_export_reproduces_engine(stage_dir):
    check = torch.load(stage_dir / EXPORT_CHECK_FILE)
    model = AutoModelForImageTextToText.from_pretrained(stage_dir / "export").eval()
    with torch.no_grad():
        logits = model(**check["batch"]).logits[:, -16:]
    torch.testing.assert_close(logits, check["logits"], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def zero2(ray_local, setup, mlflow_server):
    out = run(setup, "zero2", "--stage", "all", f"tracking.uri={mlflow_server}")
    return out, tracking.client_for(mlflow_server), mlflow_runs(out)["parent"]


def test_stage1_trains_only_the_projector(zero2, setup):
    out, *_ = zero2
    before = weights(setup[1])
    state = torch.load(checkpoint_dir(out, "stage1", STEPS) / CHECKPOINT_TAG / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]  # the full DeepSpeed checkpoint of the last step
    frozen = [n for n in before if "multi_modal_projector" not in n]
    assert frozen and all(torch.equal(state[n], before[n]) for n in frozen), "a frozen weight changed in stage 1"
    projector = load_file(str(out["stage1"] / PROJECTOR_FILE))
    assert set(projector) == set(before) - set(frozen)
    assert all(torch.equal(projector[n], state[n]) for n in projector)
    assert all(not torch.equal(projector[n], before[n]) for n in projector), "stage 1 left a projector weight as is"


def test_stage2_export_reloads_with_plain_transformers(zero2, setup):
    out, *_ = zero2
    before, after = weights(setup[1]), weights(out["stage2"] / "export")
    vision = [n for n in before if n.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(after[n], before[n]) for n in vision), "the frozen tower changed"
    lm = [n for n in before if n.startswith("model.language_model.layers.")]
    assert any(not torch.equal(after[n], before[n]) for n in lm), "stage 2 did not train the language model"
    assert_export_reproduces_engine(out["stage2"])


def test_mlflow_holds_params_metrics_and_registered_model(zero2, setup, mlflow_server):
    out, client, parent = zero2
    parent_run = client.get_run(parent)
    assert parent_run.data.params["model.image_size"] == "56" and parent_run.info.status == "FINISHED"
    assert "recipe.yaml" in [a.path for a in client.list_artifacts(parent)]
    runs = stage_runs(client, parent)
    assert set(runs) == {"stage1", "stage2"}
    stage2 = runs["stage2"]
    assert stage2.data.params["total_steps"] == str(STEPS) and stage2.data.params["tunable"] == "['projector', " \
        "'language_model']"
    history = losses(client, stage2.info.run_id)
    assert sorted(history) == list(range(1, STEPS + 1))
    assert history[STEPS] < history[1], f"stage-2 loss did not fall: {history}"
    assert losses(client, runs["stage1"].info.run_id)[STEPS] < losses(client, runs["stage1"].info.run_id)[1]
    for name in ("grad_norm", "samples_per_s", "tokens_per_s", "data_wait_fraction", "lr/projector",
                 "lr/language_model", "data/read", "data/kept"):
        assert client.get_metric_history(stage2.info.run_id, name), f"no {name} metric"
    assert stage2.data.metrics["data/read"] == 24
    assert any(key.startswith("system/") for key in stage2.data.metrics), "no system metrics"
    assert PROJECTOR_FILE in [a.path for a in client.list_artifacts(runs["stage1"].info.run_id)]

    version = latest_version(client)
    assert version.run_id == stage2.info.run_id
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{RECIPE}/{version.version}")
    image = next((setup[0] / "data" / "images").iterdir())
    answers = model.predict([{"prompt": "What is in the image?", "image": str(image)}])
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.fault("training: a worker SIGKILLed mid-run, checkpoints on S3 (moto)")
def test_killed_worker_resumes_from_s3_checkpoint_at_the_same_step(ray_local, setup, zero2, s3_server, monkeypatch,
                                                                  mlflow_server):
    out, client, parent = zero2
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="checkpoints")
    monkeypatch.setenv(train.KILL_AT_STEP_ENV, "3:1")  # SIGKILL rank 1 right after optimizer step 3
    killed = run(setup, "killed", "--stage", "1", f"tracking.uri={mlflow_server}",
                 "checkpoint.storage_path=s3://checkpoints/runs", f"checkpoint.s3_endpoint_url={s3_server}",
                 "stage1.data.materialize=true")  # the rows from the object store: the same as streamed ones
    assert (killed["stage1"] / ".fault-fired").exists(), "the fault was not injected"
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").list_objects_v2(
        Bucket="checkpoints", Prefix="runs/")["Contents"]]
    assert any(f"stage1-step{STEPS:08d}/{CHECKPOINT_TAG}/" in key for key in keys)
    resumed = losses(client, mlflow_runs(killed)["stage1"])
    reference = losses(client, stage_runs(client, parent)["stage1"].info.run_id)
    assert sorted(resumed) == list(range(1, STEPS + 1)), "the resumed run did not end at the same step count"
    steps = [m.step for m in client.get_metric_history(mlflow_runs(killed)["stage1"], "loss")]
    assert sorted(steps) == list(range(1, STEPS + 1)), f"not one continuous history: {sorted(steps)}"
    for step in resumed:  # same data order and restored optimizer state: the same losses as the run without failure
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), f"step {step}: {resumed} vs {reference}"


@pytest.mark.fault("storage: a worker killed halfway through writing its part of a checkpoint (S3)")
def test_a_half_written_checkpoint_is_never_resumed_from(ray_local, setup, zero2, s3_server, monkeypatch,
                                                         mlflow_server):
    out, client, parent = zero2
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="interrupted")
    monkeypatch.setenv(train.KILL_AT_STEP_ENV, f"{STEPS}:1:checkpoint")  # rank 1, writing the step-4 checkpoint
    interrupted = run(setup, "interrupted", "--stage", "1", f"tracking.uri={mlflow_server}",
                      "checkpoint.storage_path=s3://interrupted/runs", f"checkpoint.s3_endpoint_url={s3_server}")
    fault = json.loads((interrupted["stage1"] / ".fault-fired").read_text())
    assert fault["what"].startswith(f"killed rank 1 writing stage1-step{STEPS:08d}") and fault["written"], fault
    run_id = mlflow_runs(interrupted)["stage1"]
    assert [m.value for m in client.get_metric_history(run_id, "resumed_at_step")] == [STEPS - 2], \
        "not resumed from the last complete checkpoint (step 2)"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, STEPS + 1))
    reference = losses(client, stage_runs(client, parent)["stage1"].info.run_id)
    for step, loss in losses(client, run_id).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), f"step {step}"
    prefix = f"runs/{RECIPE}-stage1/stage1-step{STEPS:08d}/"
    objects = s3.list_objects_v2(Bucket="interrupted", Prefix=prefix)["Contents"]
    rewritten = {o["Key"].removeprefix(prefix) for o in objects}
    for rank in (0, 1):  # the replayed step 4 wrote the whole checkpoint again
        assert any(f"zero_pp_rank_{rank}_" in key for key in rewritten), sorted(rewritten)


def test_manual_resume_replays_the_same_steps(ray_local, setup, zero2, mlflow_server):
    """--resume from stage 2's step-2 checkpoint: steps 3-4 again, to the same weights, in the same MLflow
    run (one record per step: MLflow keeps the first), and a new registered version."""
    out, client, parent = zero2
    stage2_run = stage_runs(client, parent)["stage2"].info.run_id
    resumed = run(setup, "resumed", "--stage", "2", f"tracking.uri={mlflow_server}",
                  "--resume", str(checkpoint_dir(out, "stage2", 2)))
    assert mlflow_runs(resumed)["stage2"] == stage2_run
    assert sorted(m.step for m in client.get_metric_history(stage2_run, "loss")) == list(range(1, STEPS + 1))
    assert [m.value for m in client.get_metric_history(stage2_run, "resumed_at_step")] == [2]
    replayed, original = weights(resumed["stage2"] / "export"), weights(out["stage2"] / "export")
    for name, tensor in original.items():  # same data order, restored optimizer state: the same steps
        torch.testing.assert_close(replayed[name], tensor, rtol=1e-5, atol=1e-6)
    assert int(latest_version(client).version) >= 2
    assert_export_reproduces_engine(resumed["stage2"])


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def zero3_lora(ray_local, setup, tmp_path_factory, monkeypatch_module):
    """ZeRO-3 for both stages, run one at a time (stage 2 gets stage 1's projector by path); stage 1
    from jobs.preprocess's Parquet shards; LoRA and text-only rows in stage 2; MLflow's default local store.

    Returns:
        The stage outputs, the working directory, and each invocation's MLflow run ids.
    """
    root, initial, files, overrides = setup
    preprocessed = root / "stage1-shards"
    preprocess_job.main(["--recipe", "tiny_cpu_demo", "--stage", "1", "--model", str(initial), "--output",
                         str(preprocessed), *overrides])
    mixed = root / "data" / "stage2_with_text.jsonl"
    text_only = [{"id": f"text-{i}", "conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                                                       {"from": "gpt", "value": str(2 * i)}]} for i in range(8)]
    mixed.write_text(files["stage2"].read_text() + "".join(json.dumps(r) + "\n" for r in text_only))
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch_module.chdir(cwd)
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    zero3 = ["stage1.deepspeed.zero_stage=3", "stage2.deepspeed.zero_stage=3",
             "stage1.deepspeed.zero3_param_persistence_threshold=0",  # shard every weight of the tiny model
             "stage2.deepspeed.zero3_param_persistence_threshold=0"]
    out = run(setup, "zero3_lora", "--stage", "1", *zero3, f"stage1.data.preprocessed={preprocessed}")
    stage1_runs = mlflow_runs(out)
    out |= run(setup, "zero3_lora", "--stage", "2", *zero3, "stage2.deepspeed.gradient_checkpointing=true",
               "stage2.tunable=[projector]", "stage2.lora={r: 4, alpha: 8, dropout: 0.0}",
               f"stage2.init_from={out['stage1'] / PROJECTOR_FILE}", f"stage2.data.train_files=[{mixed}]",
               "stage2.optim.lr=0.01", "stage2.data.group_by_modality_length=true")
    return out, cwd, stage1_runs, mlflow_runs(out)


def test_zero3_lora_exports_merged_weights_and_adapters(zero3_lora, setup):
    out, *_ = zero3_lora
    stage2 = out["stage2"]
    assert (stage2 / "adapter" / "adapter_config.json").exists()
    adapters = load_file(str(stage2 / "adapter" / "adapter_model.safetensors"))
    assert adapters and all("lora_" in n for n in adapters)
    saved = load_file(str(stage2 / "export" / "model.safetensors"))
    assert not any("lora_" in n or "base_layer" in n for n in saved), "the export still holds adapter weights"
    assert all(t.numel() > 0 for t in saved.values()), "ZeRO-3 placeholders were saved instead of weights"
    before, after = weights(setup[1]), weights(stage2 / "export")
    vision = [n for n in before if n.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(after[n], before[n]) for n in vision)
    q_proj = [n for n in before if n.startswith("model.language_model.") and n.endswith("q_proj.weight")]
    assert q_proj and all(not torch.equal(after[n], before[n]) for n in q_proj), "the LoRA update was not merged"
    assert_export_reproduces_engine(stage2)


def test_default_tracking_is_a_local_store_in_the_working_directory(zero3_lora):
    out, cwd, stage1_runs, runs = zero3_lora
    client = tracking.client_for(f"sqlite:///{cwd / 'mlflow.db'}")
    assert client.get_run(runs["parent"]).info.status == "FINISHED"
    for run_id in (stage1_runs["stage1"], runs["stage2"]):  # ZeRO-3 stage 1, then ZeRO-3 + LoRA stage 2
        history = losses(client, run_id)
        assert sorted(history) == list(range(1, STEPS + 1)) and history[STEPS] < history[1], history
    stage1 = client.get_run(stage1_runs["stage1"])
    assert stage1.data.metrics["data/read"] == 24 and stage1.data.params["data.preprocessed"].endswith("stage1-shards")
    assert latest_version(client).run_id == runs["stage2"]
    assert len(client.search_model_versions(f"name = '{RECIPE}'")) == 1, "a stage-1-only run was registered"


def test_bad_configuration_fails_before_any_worker_starts(ray_local, setup, zero2, capsys):
    checks = [
        (["--stage", "all", "--output", str(zero2[0]["stage1"].parent)], "already holds checkpoints of an earlier "
         "stage1 run; continue it with --resume"),
        (["--stage", "1", "stage1.data.train_files=[/missing.json]"], "stage1.data.train_files: /missing.json"),
        (["--stage", "1", f"stage1.data.preprocessed={setup[0]}"], "stage1.data.preprocessed:"),
        (["--stage", "all", "scaling.use_gpu=true", "stage1.deepspeed.precision=bf16",
          "stage2.deepspeed.precision=bf16"], "scaling.use_gpu"),
        (["--stage", "2"], "stage2.init_from: 'stage1' but stage 1 does not run here"),
        (["--stage", "2", "stage2.init_from=/nonexistent/projector.safetensors"], "stage2.init_from: /nonexistent"),
    ]
    for extra, expected in checks:
        with pytest.raises(SystemExit) as exit_info:
            run(setup, "never", *extra)
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err, extra
    assert not (setup[0] / "never" / "stage1").exists()
