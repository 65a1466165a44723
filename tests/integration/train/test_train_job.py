"""jobs.train on 2 Ray Train workers: ZeRO-3 + LoRA from preprocessed shards, faults on S3, manual
resume, and configurations refused before any worker starts.

The runs are shared fixtures (a stage costs about a minute on 2 cores). The fault and resume runs
use the end-to-end job's recipe, data and starting checkpoint (``pipeline_recipe``), so that its
MLflow losses are their reference: the same data order and restored optimizer state must give the
same losses, step for step (ZeRO-3 here, ZeRO-2 there: the same numbers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import load_file

from jobs import compose, faults, train
from llava_platform import tracking
from llava_platform.data.synthetic import write_synthetic_dataset
from llava_platform.model.checkpoint_index import tensor_index
from llava_platform.model.trainability import part_of
from llava_platform.train.checkpoint import PROJECTOR_FILE, save_projector
from llava_platform.train.deepspeed_engine import CHECKPOINT_TAG
from tests.helpers.losses import Loss, mlflow_steps, record_loss, resumes_loss, rows_loss, steps_loss
from tests.helpers.recipes import RECIPE, REGISTERED_NAME, STEPS, data_overrides, zero3
from tests.helpers.training import assert_export_reproduces_engine, losses, weights

EXPORT_SHARD_MB = 1
"""Streamed exports of several shards from the tiny model (~2 MB)."""


def mlflow_runs(output: Path) -> dict[str, str]:
    """The run ids jobs.train wrote into its ``--output``: ``parent``, ``stage1``, ``stage2``."""
    return json.loads((output / train.RUNS_FILE).read_text())["runs"]






# ZeRO-3 + LoRA stage 2, text-only rows among the image ones, MLflow's default local store

@dataclass(frozen=True)
class Zero3Lora:
    root: Path
    initial: Path
    overrides: list[str]
    out: dict[str, Path]
    cwd: Path
    runs: dict[str, str]


@pytest.fixture(scope="module")
def zero3_lora(ray_cluster, tmp_path_factory) -> Zero3Lora:
    """Stage 2 of tiny LLaVA under ZeRO-3 on 2 workers with LoRA adapters, gradient checkpointing and
    modality grouping, from a stage-1 projector given by path; 8 of its 32 rows text-only, streamed
    into the workers; no tracking URI anywhere: MLflow's default local store in the working directory.
    The engine is built partitioned (``train.partitioned``). Ranks with and without images at the same
    step: ``test_zero3_mixed_batches.py``.
    """
    root = tmp_path_factory.mktemp("zero3")
    files = write_synthetic_dataset(root / "data", train=24, eval=1, seed=0)
    heads = "model.tiny.text_heads=2"  # head size 32: the adapter is also served unmerged on vLLM's CPU build
    initial = compose.main(["--recipe", RECIPE, "--output", str(root / "initial"), heads])
    projector = save_projector(weights(initial), root / "aligned")  # what a stage-1 run leaves behind
    mixed = root / "data" / "stage2_with_text.jsonl"
    text_only = [{"id": f"text-{i}", "conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                                                       {"from": "gpt", "value": str(2 * i)}]} for i in range(8)]
    mixed.write_text(files["stage2"].read_text() + "".join(json.dumps(r) + "\n" for r in text_only))
    overrides = [*data_overrides(root / "data"), f"stage2.data.train_files=[{mixed}]", "stage2.data.preprocessed=null",
                 "stage2.global_batch_size=4", "stage2.micro_batch_size=1", f"stage2.max_steps={STEPS}",
                 "stage2.optim.lr=0.01", "checkpoint.every_n_steps=2", "tracking.system_metrics=false",
                 *zero3("stage2"), "stage2.deepspeed.gradient_checkpointing=true", "stage2.tunable=[projector]",
                 "stage2.lora={r: 4, alpha: 8, dropout: 0.0}", f"stage2.init_from={projector}",
                 "stage2.data.group_by_modality_length=true", heads,
                 f"checkpoint.export_shard_mb={EXPORT_SHARD_MB}"]  # a streamed export of several shards
    cwd = root / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        out = train.main(["--recipe", RECIPE, "--model", str(initial), "--output", str(root / "out"), *overrides,
                          "--stage", "2"])
    return Zero3Lora(root, initial, overrides, out, cwd, mlflow_runs(root / "out"))


def test_zero3_lora_exports_merged_weights_and_adapters(zero3_lora):
    stage2 = zero3_lora.out.stage_dirs["stage2"]
    assert (stage2 / "adapter" / "adapter_config.json").exists()
    adapters = load_file(str(stage2 / "adapter" / "adapter_model.safetensors"))
    assert adapters and all("lora_" in n for n in adapters)
    saved = tensor_index(stage2 / "export")
    assert len({location.file for location in saved.values()}) >= 2, "not streamed in several shards"
    assert not any("lora_" in n or "base_layer" in n for n in saved), "the export still holds adapter weights"
    assert all(location.read().numel() > 0 for location in saved.values()), "ZeRO-3 placeholders were saved"
    before, after = weights(zero3_lora.initial), weights(stage2 / "export")
    vision = [n for n in before if n.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(after[n], before[n]) for n in vision)
    q_proj = [n for n in before if n.startswith("model.language_model.") and n.endswith("q_proj.weight")]
    assert q_proj and all(not torch.equal(after[n], before[n]) for n in q_proj), "the LoRA update was not merged"
    assert_export_reproduces_engine(stage2)


def test_the_zero3_export_streamed_from_two_ranks_is_todays_in_memory_one(zero3_lora, tmp_path):
    """Gathered shard by shard from two ZeRO-3 ranks, the merged export is byte for byte what the in-memory route
    writes from the same weights: peft's ``merge_and_unload`` of the adapter on ``adapter_base``, then
    ``save_pretrained`` and the llava-hf names."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from llava_platform.model.layout import write_llava_hf_layout

    stage2 = zero3_lora.out.stage_dirs["stage2"]
    base = AutoModelForImageTextToText.from_pretrained(stage2 / "adapter_base")
    merged = PeftModel.from_pretrained(base, stage2 / "adapter").merge_and_unload()
    merged.save_pretrained(tmp_path, max_shard_size=EXPORT_SHARD_MB * 2**20)
    write_llava_hf_layout(tmp_path)
    weight_files = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("model"))
    assert len(weight_files) >= 3 and weight_files == sorted(p.name for p in (stage2 / "export").glob("model*"))
    for name in weight_files:
        assert (tmp_path / name).read_bytes() == (stage2 / "export" / name).read_bytes(), name


@pytest.mark.chaos  # a vLLM engine with LoRA of its own (~30 s)
def test_the_lora_adapter_is_served_unmerged_on_vllm(zero3_lora, serve_port):
    """vLLM applies the stage's peft adapter to ``adapter_base`` (the trained projector in, LoRA not merged):
    answers as the merged export; the base model's name answers as ``adapter_base`` itself."""
    from ray import serve

    from jobs import deploy
    from llava_platform.config.schema import ServeLimits
    from serve.openai_api import parse_chat_request
    from tests.helpers.endpoint import KEY, VLLM_TEST_SETTINGS, client, config, reference_engine
    from tests.helpers.requests import chat, data_url, image_part, text_part

    stage2 = zero3_lora.out.stage_dirs["stage2"]
    app = config("lora", "/lora", serve_port, num_replicas=1)
    app["applications"][0]["args"].update(vllm=VLLM_TEST_SETTINGS, lora_adapters={"tuned": str(stage2 / "adapter")})
    deploy.run(app, model=str(stage2 / "adapter_base"), model_name="base", api_key=KEY, engine="vllm")
    openai_client = client(f"http://127.0.0.1:{serve_port}/lora")
    assert [m.id for m in openai_client.models.list().data] == ["base", "tuned"]
    references = {"tuned": reference_engine(stage2 / "export"), "base": reference_engine(stage2 / "adapter_base")}
    differ = 0
    for i, size in enumerate([(40, 30), (30, 60), (56, 56)]):
        body = chat(text_part(f"What colour is shape {i}?"), image_part(data_url(size)), max_tokens=8, temperature=0)
        request = parse_chat_request(body, ServeLimits(max_tokens=8, max_images=1, max_image_bytes=10**6))
        answers = {}
        for name, reference in references.items():
            expected = reference.generate([reference.prepare(request)])[0]
            got = openai_client.chat.completions.create(**{**body, "model": name})
            assert got.model == name and got.usage.completion_tokens == expected.completion_tokens, (name, size)
            assert got.choices[0].message.content == expected.text, (name, size)
            answers[name] = got.choices[0].message.content
        differ += answers["tuned"] != answers["base"]
    assert differ, "the adapter changed no answer: it was not applied"
    serve.delete("lora")


def test_default_tracking_is_a_local_store_in_the_working_directory(zero3_lora):
    client = tracking.client_for(f"sqlite:///{zero3_lora.cwd / 'mlflow.db'}")
    runs = zero3_lora.runs
    assert client.get_run(runs["parent"]).info.status == "FINISHED"
    history = losses(client, runs["stage2"])
    assert sorted(history) == list(range(1, STEPS + 1)) and history[STEPS] < history[1], history
    stage2 = client.get_run(runs["stage2"])
    assert stage2.data.metrics["data/read"] == stage2.data.metrics["data/kept"] == 32
    assert stage2.data.params["lora.r"] == "4" and stage2.data.params["deepspeed.zero_stage"] == "3"
    versions = client.search_model_versions(f"name = '{REGISTERED_NAME}'")
    assert [v.run_id for v in versions] == [runs["stage2"]]


def test_bad_configuration_fails_before_any_worker_starts(zero3_lora, capsys):
    def run(*extra):
        return train.main(["--recipe", RECIPE, "--model", str(zero3_lora.initial), *zero3_lora.overrides, *extra])

    never = zero3_lora.root / "never"
    saved = str(zero3_lora.root / "out" / "checkpoints" / f"{REGISTERED_NAME}-stage2" / "stage2-step00000002")
    checks = [
        (["--stage", "2", "--resume", saved, "scaling.num_workers=1"], "--resume: stage2 streams its rows, each of 2 "
         "workers its own part, and this run has 1: set scaling.num_workers=2, or preprocess the stage"),
        (["--stage", "2", "--resume", saved, "stage2.global_batch_size=8"], "--resume: the checkpoint's data differs "
         "from stage2's: global_batch 4 -> 8"),
        (["--stage", "2", "--output", str(zero3_lora.root / "out")], "already holds checkpoints of an earlier "
         "stage2 run; continue it with --resume"),
        (["--stage", "1", "stage1.data.train_files=[/missing.json]"], "stage1.data.train_files: /missing.json"),
        (["--stage", "1", f"stage1.data.preprocessed={zero3_lora.root}"], "stage1.data.preprocessed:"),
        (["--stage", "all", "scaling.use_gpu=true", "stage1.deepspeed.precision=bf16",
          "stage2.deepspeed.precision=bf16"], "scaling.use_gpu"),
        (["--stage", "2", "stage2.init_from=stage1"], "stage2.init_from: 'stage1' but stage 1 does not run here"),
        (["--stage", "2", "stage2.init_from=/nonexistent/projector.safetensors"], "stage2.init_from: /nonexistent"),
        (["--stage", "2", "--resume", str(never / "no-checkpoint")], "no-checkpoint: no position.json there"),
    ]
    for extra, expected in checks:
        output = [] if "--output" in extra else ["--output", str(never)]
        with pytest.raises(SystemExit) as exit_info:
            run(*output, *extra)
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err, extra
    assert not (never / "stage1").exists()


# Faults on S3: the end-to-end job's stage 1 again (ZeRO-2 here, ZeRO-3 there), two faults in one run

@dataclass(frozen=True)
class FaultRun:
    stage_dir: Path
    run_id: str
    bucket: str
    initial: Path
    rows: list[str]
    """The ids of the rows stage 1 reads (the row ledger is armed: ``stage_dir/row-ledger``)."""

    def marker(self, action: str, step: int, rank: int) -> dict:
        path = self.stage_dir / faults.FAULT_MARKER.format(action=action, step=step, rank=rank)
        assert path.exists(), f"the {action} fault at step {step} was not injected"
        return json.loads(path.read_text())


@pytest.fixture(scope="session")
def fault_run(ray_cluster, pipeline_recipe, s3_server, mlflow_server, tmp_path_factory) -> FaultRun:
    """Rank 1 is SIGKILLed right after step 3; then, replaying step 4, rank 1 dies halfway through writing
    its part of the step-4 checkpoint. Checkpoints go to S3 (moto); rows come from the object store."""
    root = tmp_path_factory.mktemp("faults")
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="checkpoints")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(faults.KILL_AT_STEP_ENV, f"3:1,{STEPS}:1:checkpoint")
        patch.setenv(faults.ROW_LEDGER_ENV, "1")
        out = train.main(["--recipe", RECIPE, "--model", str(pipeline_recipe.initial), "--output", str(root),
                          *pipeline_recipe.overrides, "--stage", "1", "stage1.deepspeed.zero_stage=2",
                          "stage1.data.materialize=true",
                          "checkpoint.storage_path=s3://checkpoints/runs", f"checkpoint.s3_endpoint_url={s3_server}"])
    rows = [record["id"] for record in json.loads((pipeline_recipe.root / "data" / "stage1.json").read_text())]
    return FaultRun(out.stage_dirs["stage1"], mlflow_runs(root)["stage1"], "checkpoints", pipeline_recipe.initial,
                    rows)


def training_losses(fault_run: FaultRun, client) -> tuple[Loss, Loss]:
    """What the faulted run's final model lost: optimizer steps in MLflow, rows in the row ledger."""
    return (steps_loss(mlflow_steps(client, fault_run.run_id), range(1, STEPS + 1)),
            rows_loss(fault_run.stage_dir / faults.ROW_LEDGER_DIR, fault_run.rows, global_batch=4, steps=STEPS))


def resumes(client, run_id) -> list[tuple[float, float]]:
    """``(step, unix time)`` of every restart that resumed from a checkpoint."""
    return [(m.value, m.timestamp / 1000) for m in client.get_metric_history(run_id, "resumed_at_step")]


def step4_checkpoint_files(s3_server, fault_run: FaultRun) -> set[str]:
    prefix = f"runs/{REGISTERED_NAME}-stage1/stage1-step{STEPS:08d}/"
    objects = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").list_objects_v2(
        Bucket=fault_run.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"].removeprefix(prefix) for o in objects}


def test_stage1_trains_only_the_projector(fault_run, s3_server):
    """The last checkpoint of the (faulted, resumed) stage-1 run holds the whole module under ZeRO-2: every
    weight but the projector's is bit for bit the starting checkpoint's."""
    before = weights(fault_run.initial)
    key = f"runs/{REGISTERED_NAME}-stage1/stage1-step{STEPS:08d}/{CHECKPOINT_TAG}/mp_rank_00_model_states.pt"
    target = fault_run.stage_dir / "model_states.pt"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").download_file(fault_run.bucket, key,
                                                                                     str(target))
    state = torch.load(target, weights_only=False)["module"]
    frozen = [n for n in before if part_of(n) != "projector"]
    assert frozen and all(torch.equal(state[n], before[n]) for n in frozen), "a frozen weight changed in stage 1"
    projector = load_file(str(fault_run.stage_dir / PROJECTOR_FILE))
    assert set(projector) == set(before) - set(frozen) and "model.image_newline" in projector
    assert all(torch.equal(projector[n], state[n]) for n in projector)
    assert all(not torch.equal(projector[n], before[n]) for n in projector), "stage 1 left a projector weight as is"


def test_the_faulted_run_ends_with_one_continuous_history_and_registers_nothing(fault_run, mlflow_server):
    client = tracking.client_for(mlflow_server)
    steps = sorted(m.step for m in client.get_metric_history(fault_run.run_id, "loss"))
    assert steps == list(range(1, STEPS + 1)), f"not one record per step: {steps}"
    assert client.get_run(fault_run.run_id).data.metrics["optimizer_steps"] == STEPS
    assert not [v for v in client.search_model_versions(f"name = '{REGISTERED_NAME}'")
                if v.run_id == fault_run.run_id], "a stage-1-only run was registered"


@pytest.mark.fault("training: a worker SIGKILLed mid-run, checkpoints on S3 (moto)")
def test_killed_worker_resumes_from_s3_checkpoint_at_the_same_step(fault_run, pipeline_run, s3_server,
                                                                  mlflow_server, record_property):
    killed = fault_run.marker("kill", 3, 1)
    assert killed["what"] == "kill rank 1 at step 3"
    assert any(key.startswith(f"{CHECKPOINT_TAG}/") for key in step4_checkpoint_files(s3_server, fault_run))
    client = tracking.client_for(mlflow_server)
    steps, rows = record_loss(record_property, *training_losses(fault_run, client))
    assert not steps.count and not rows.count, f"{steps}; {rows}"
    resumed, reference = losses(client, fault_run.run_id), losses(client, pipeline_run.runs["stage1"])
    for step in resumed:  # same data order and restored optimizer state: the same losses as the run without failure
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), f"step {step}: {resumed} vs {reference}"


@pytest.mark.fault("storage: a worker killed halfway through writing its part of a checkpoint (S3)")
def test_a_half_written_checkpoint_is_never_resumed_from(fault_run, pipeline_run, s3_server, mlflow_server,
                                                         record_property):
    interrupted = fault_run.marker("checkpoint", STEPS, 1)
    assert interrupted["what"].startswith(f"killed rank 1 writing stage1-step{STEPS:08d}") and interrupted["written"]
    client = tracking.client_for(mlflow_server)
    resumed_from = [int(step) for step, _ in resumes(client, fault_run.run_id)]
    half, steps, rows = record_loss(record_property, resumes_loss(resumed_from, [STEPS], len(resumed_from)),
                                    *training_losses(fault_run, client))
    assert not half.count and not steps.count and not rows.count, f"{half}; {steps}; {rows}"
    after = [step for step, at in resumes(client, fault_run.run_id) if at > interrupted["at"]]
    assert after == [STEPS - 2], f"not resumed from the last complete checkpoint (step 2): {after}"
    reference = losses(client, pipeline_run.runs["stage1"])
    for step, loss in losses(client, fault_run.run_id).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), f"step {step}"
    rewritten = step4_checkpoint_files(s3_server, fault_run)
    for rank in (0, 1):  # the replayed step 4 wrote the whole checkpoint again
        assert any(f"zero_pp_rank_{rank}_" in key for key in rewritten), sorted(rewritten)


# 49 s: `make chaos` (suite budget). make test keeps --resume through test_resume_on_one_worker_from_a_two_worker_
# checkpoint (the same flag, another worker count) and the automatic resume of the fault run.
@pytest.mark.chaos
def test_manual_resume_replays_the_same_steps(pipeline_run, mlflow_server, tmp_path):
    """--resume from the end-to-end job's stage-2 step-2 checkpoint: steps 3-4 again, to the same weights,
    in the same MLflow run (one record per step: MLflow keeps the first), and a new registered version."""
    client, stage2_run = tracking.client_for(mlflow_server), pipeline_run.runs["stage2"]
    resumed = train.main(["--recipe", RECIPE, "--model", str(pipeline_run.job.output / "initial"), "--output",
                          str(tmp_path), *pipeline_run.job.overrides, "--stage", "2",
                          "--resume", str(pipeline_run.checkpoint("stage2", 2))])
    assert mlflow_runs(tmp_path)["stage2"] == stage2_run
    assert sorted(m.step for m in client.get_metric_history(stage2_run, "loss")) == list(range(1, STEPS + 1))
    assert [m.value for m in client.get_metric_history(stage2_run, "resumed_at_step")] == [2]
    replayed = weights(resumed.stage_dirs["stage2"] / "export")
    original = weights(pipeline_run.train / "stage2" / "export")
    for name, tensor in original.items():  # same data order, restored optimizer state: the same steps
        torch.testing.assert_close(replayed[name], tensor, rtol=1e-5, atol=1e-6)
    versions = client.search_model_versions(f"name = '{REGISTERED_NAME}'")
    assert [v.run_id for v in versions].count(stage2_run) >= 2, "the resumed run registered no new version"
    assert_export_reproduces_engine(resumed.stage_dirs["stage2"])


def test_resume_on_one_worker_from_a_two_worker_checkpoint(pipeline_run, mlflow_server, tmp_path):
    """--resume with ``scaling.num_workers=1`` from the 2-worker job's stage-2 step-2 checkpoint: converted to
    DeepSpeed's universal format on the worker, the global batch kept (accumulation 1 -> 2), the run ends at
    the same step and exports a model that reproduces its engine. (The same steps' losses on re-split data
    are not comparable row for row; ``test_resume_worker_count.py`` compares them on fixed batches.)"""
    client, stage2_run = tracking.client_for(mlflow_server), pipeline_run.runs["stage2"]
    before = len(client.get_metric_history(stage2_run, "resumed_at_step"))
    resumed = train.main(["--recipe", RECIPE, "--model", str(pipeline_run.job.output / "initial"), "--output",
                          str(tmp_path), *pipeline_run.job.overrides, "scaling.num_workers=1", "--stage", "2",
                          "--resume", str(pipeline_run.checkpoint("stage2", 2))])
    assert mlflow_runs(tmp_path)["stage2"] == stage2_run
    assert [m.value for m in client.get_metric_history(stage2_run, "resumed_at_step")][before:] == [2]
    assert [m.value for m in client.get_metric_history(stage2_run, "optimizer_steps")][-1] == STEPS
    assert_export_reproduces_engine(resumed.stage_dirs["stage2"])
