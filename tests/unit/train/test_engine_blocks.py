"""DeepSpeed config from a recipe stage, trainability, and a real DeepSpeed engine around a tiny LLaVA."""

import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from llava_platform.config import load_recipe
from llava_platform.data.collate import collate
from llava_platform.data.conversation import tokenize_conversation
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.templates import resolve_chat_template
from llava_platform.model.trainability import (
    TrainabilityError,
    apply_lora,
    parameter_groups,
    part_of,
    set_trainable,
)
from llava_platform.train.deepspeed_config import DeepSpeedConfigError, build_deepspeed_config, build_lr_scheduler
from llava_platform.train.deepspeed_engine import init_distributed
from tests.helpers.models import compose


def config_for(stage, world_size, use_gpu=True):
    return build_deepspeed_config(
        global_batch_size=stage.global_batch_size, micro_batch_size=stage.micro_batch_size, world_size=world_size,
        zero_stage=stage.deepspeed.zero_stage, precision=stage.deepspeed.precision,
        offload_optimizer=stage.deepspeed.offload_optimizer, max_grad_norm=stage.optim.max_grad_norm,
        weight_decay=stage.optim.weight_decay, lr=stage.optim.lr, use_gpu=use_gpu,
    )


@pytest.mark.parametrize("world_size, accumulation", [(1, 8), (2, 4), (8, 1)])
def test_global_batch_holds_at_any_worker_count(world_size, accumulation):
    stage = load_recipe("llava15_7b").stage2  # global 128, micro 16
    config = config_for(stage, world_size)
    assert config["gradient_accumulation_steps"] == accumulation
    assert config["train_batch_size"] == 128 == accumulation * 16 * world_size
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert "scheduler" not in config  # ours, from transformers, keeps per-group rates


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedules_keep_each_groups_own_rate(name):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2e-5},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2e-6}]
    optimizer = torch.optim.AdamW(groups)
    scheduler = build_lr_scheduler(name, warmup_ratio=0.1, total_steps=20)(optimizer)
    seen = []
    for _ in range(15):
        optimizer.step()
        scheduler.step()
        first, second = (g["lr"] for g in optimizer.param_groups)
        assert first == pytest.approx(10 * second)
        seen.append(first)
    assert max(seen) == pytest.approx(2e-5, rel=0.01)
    assert (seen[-1] < max(seen)) == (name != "constant")
    with pytest.raises(DeepSpeedConfigError, match="unknown scheduler 'step'"):
        build_lr_scheduler("step", warmup_ratio=0.0, total_steps=1)


def test_deepspeed_config_errors():
    stage = load_recipe("llava15_7b").stage2
    # 8 micro-batches of 16 over 3 workers: 3 micro-steps each, DeepSpeed counting 9 slots (one zero-weight
    # padding slot per step: the recipe check allows that only with pad_micro_batches)
    padded = config_for(stage, 3)
    assert (padded["gradient_accumulation_steps"], padded["train_batch_size"]) == (3, 144)
    with pytest.raises(DeepSpeedConfigError, match="bf16 needs GPUs"):
        config_for(stage, 8, use_gpu=False)


def test_parts_and_freezing(towers):
    model, _ = compose(towers, "llava_next")
    assert part_of("model.image_newline") == "projector" and part_of("lm_head.weight") == "language_model"
    assert part_of("base_model.model.model.vision_tower.embeddings.patch_embedding.weight") == "vision_tower"
    counts = set_trainable(model, ["projector"])
    assert counts["projector"] > 0 and counts["vision_tower"] == counts["language_model"] == 0
    with pytest.raises(TrainabilityError, match="unknown tunable part"):
        set_trainable(model, ["projector", "llm"])


def test_parameter_groups_have_their_own_rates(towers):
    model, _ = compose(towers, "llava")
    set_trainable(model, ["projector", "language_model", "vision_tower"])
    groups = parameter_groups(model.named_parameters(), lr=2e-5, vision_tower_lr=2e-6, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["vision_tower"]["lr"] == 2e-6 and by_name["projector"]["lr"] == 2e-5
    assert by_name["language_model/no_decay"]["weight_decay"] == 0.0
    assert by_name["language_model"]["weight_decay"] == 0.1
    grouped = sum(p.numel() for g in groups for p in g["params"])
    assert grouped == sum(p.numel() for p in model.parameters())


def test_lora_trains_adapters_and_projector_only(towers):
    model, _ = compose(towers, "llava")
    set_trainable(model, ["projector"])
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n and "language_model" in n for n in trainable)
    assert all(part_of(n) == "projector" or "lora_" in n for n in trainable)
    assert not any("vision_tower" in n and "lora_" in n for n, _ in peft_model.named_parameters())


@pytest.fixture(scope="module")
def single_process_group():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    init_distributed("gloo")
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_stage1_engine_trains_the_projector_and_nothing_else(towers, single_process_group, zero_stage):
    import deepspeed

    model, processor = compose(towers, "llava")
    set_trainable(model, ["projector"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stage = load_recipe("tiny_cpu_demo", [f"stage1.deepspeed.zero_stage={zero_stage}"]).stage1
    config = config_for(stage, world_size=1, use_gpu=False)
    config["gradient_accumulation_steps"], config["train_batch_size"] = 1, stage.micro_batch_size
    groups = parameter_groups(model.named_parameters(), lr=stage.optim.lr, weight_decay=stage.optim.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config, lr_scheduler=(
        build_lr_scheduler(stage.optim.scheduler, warmup_ratio=0.25, total_steps=8)))

    settings = ImageSettings.from_processor(processor)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)) for _ in range(4)]
    samples = [tokenize_conversation(
        [{"from": "human", "value": "<image>\nCaption?"}, {"from": "gpt", "value": f"shape {i}"}],
        processor.tokenizer, resolve_chat_template("plain", None), tokens_per_image=[16], image_token="<image>",
        max_length=256, truncation="drop") for i in range(4)]
    batch = collate([s.input_ids for s in samples], [s.labels for s in samples],
                    [settings.tile(im, "square") for im in images], [(40, 70)] * 4,
                    pad_token_id=processor.tokenizer.pad_token_id, anyres=False,
                    image_mean=settings.image_mean, image_std=settings.image_std)
    rates = []
    for _ in range(6):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        rates.append(engine.get_lr()[0])
    assert engine.global_steps == 6
    peak = rates.index(max(rates))  # linear warmup to the recipe's rate, then cosine decay
    assert max(rates) == pytest.approx(stage.optim.lr, rel=0.1) and 0 < peak < 5
    assert rates[peak:] == sorted(rates[peak:], reverse=True) and rates[-1] < max(rates) / 2
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=zero_stage == 3):
        after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    for name, tensor in after.items():
        if part_of(name) == "projector":
            assert not torch.equal(tensor, before[name]), f"{name} did not train"
        else:
            assert torch.equal(tensor, before[name]), f"{name} changed although frozen"


def test_resume_from_a_folder_without_training_state_names_what_to_pass(tmp_path):
    from llava_platform.train.deepspeed_engine import ResumeError, load_training_state

    with pytest.raises(ResumeError, match="no state/ folder"):
        load_training_state(None, tmp_path)


def test_tracking_uri_falls_back_to_a_local_sqlite_store(tmp_path, monkeypatch):
    from llava_platform.tracking import flatten, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None) == "http://env:5000"
    assert resolve_tracking_uri("http://recipe:5000") == "http://recipe:5000"
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None"}


def test_a_newer_checkpoint_at_the_same_path_gets_its_own_universal_conversion(tmp_path):
    """The universal conversion is cached per node: keyed by the checkpoint's files too, so a rerun that writes
    a newer checkpoint to the same folder is never served the older one's conversion (which once resumed a
    run from stale state)."""
    import os

    from llava_platform.train.deepspeed_engine import CHECKPOINT_TAG, universal_folder

    state = tmp_path / "ckpt" / CHECKPOINT_TAG
    state.mkdir(parents=True)
    (state / "mp_rank_00_model_states.pt").write_bytes(b"first")
    first = universal_folder(tmp_path / "ckpt")
    assert universal_folder(tmp_path / "ckpt") == first  # the same checkpoint: the same folder
    (state / "mp_rank_00_model_states.pt").write_bytes(b"second run")
    os.utime(state / "mp_rank_00_model_states.pt", ns=(1, 1))
    assert universal_folder(tmp_path / "ckpt") != first
