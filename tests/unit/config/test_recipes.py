"""Every shipped recipe validates; overrides apply; mistakes are reported all at once by dotted path."""

import subprocess
import sys

import pytest
import yaml

from llava_platform.config import RecipeError, load_recipe, shipped_recipes
from tests.helpers import REPO_ROOT

EXPECTED_RECIPES = {"tiny_cpu_demo", "llava15_7b", "llava15_13b", "llava15_7b_lora", "llava_next_vicuna_7b",
                    "llava_next_mistral_7b", "llava_next_vicuna_13b", "llava_next_34b", "llama3_llava_next_8b",
                    "llava_next_72b", "llava_next_110b", "llava_onevision_qwen2_7b", "llava_onevision_qwen2_7b_ov",
                    "llava_onevision_qwen2_7b_mid", "tiny_onevision_cpu", "llava_onevision_qwen2_7b_dpo",
                    "tiny_dpo_cpu"}


def test_expected_recipes_ship():
    assert EXPECTED_RECIPES <= set(shipped_recipes())


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    for stage in recipe.stages().values():
        accumulation = stage.gradient_accumulation_steps(recipe.scaling.num_workers)
        assert accumulation * stage.micro_batch_size * recipe.scaling.num_workers == stage.global_batch_size


@pytest.mark.parametrize("name", ["llava15_7b", "llava15_13b"])
def test_llava15_published_hyperparameters(name):
    recipe = load_recipe(name)
    s1, s2 = recipe.stage1, recipe.stage2
    assert recipe.model.vision_tower == "openai/clip-vit-large-patch14-336"
    assert recipe.model.language_model == f"lmsys/vicuna-{name.split('_')[1]}-v1.5"
    assert (s1.tunable, s1.optim.lr, s1.global_batch_size, s1.epochs) == (["projector"], 1e-3, 256, 1)
    assert (s1.data.template, s1.data.image_mode) == ("plain", "square")
    assert sorted(s2.tunable) == ["language_model", "projector"]
    assert (s2.optim.lr, s2.global_batch_size, s2.epochs, s2.optim.warmup_ratio) == (2e-5, 128, 1, 0.03)
    assert (s2.optim.scheduler, s2.optim.weight_decay, s2.data.model_max_length) == ("cosine", 0.0, 2048)
    assert (s2.deepspeed.zero_stage, s2.deepspeed.precision, s2.deepspeed.gradient_checkpointing) == (3, "bf16", True)
    assert (s2.data.template, s2.data.image_mode, s2.init_from) == ("vicuna_v1", "pad", "stage1")


def test_lora_recipe():
    s2 = load_recipe("llava15_7b_lora").stage2
    assert (s2.lora.r, s2.lora.alpha, s2.optim.lr, s2.optim.projector_lr) == (128, 256, 2e-4, 2e-5)
    assert s2.tunable == ["projector"]


def test_llava_next_recipe():
    recipe = load_recipe("llava_next_vicuna_7b")
    assert recipe.model.arch == "llava_next"
    assert recipe.model.image_grid_pinpoints == [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    assert "vision_tower" in recipe.stage2.tunable and recipe.stage2.optim.vision_tower_lr == 2e-6
    assert recipe.stage2.data.image_mode == "anyres"


def test_llava_next_72b_is_its_model_cards_training_script():
    """The seed model card's script (lmms-lab/llava-next-72b): every value it sets that a recipe holds."""
    recipe = load_recipe("llava_next_72b")
    model, s1, s2 = recipe.model, recipe.stage1, recipe.stage2
    assert (model.arch, model.language_model, model.vision_tower) == (
        "llava_next", "Qwen/Qwen1.5-72B-Chat", "openai/clip-vit-large-patch14-336")
    assert (model.projector, model.vision_feature_layer, model.image_size) == ("mlp2x_gelu", -2, 336)
    assert model.image_grid_pinpoints == [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    assert (s1.data.template, s1.tunable, s1.data.train_files) == (
        "plain", ["projector"], ["data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"])  # blip558k
    assert (s2.data.template, s2.data.image_mode, s2.data.model_max_length) == ("qwen_1_5", "anyres", 32768)
    assert sorted(s2.tunable) == ["language_model", "projector", "vision_tower"] and s2.init_from == "stage1"
    optim = s2.optim
    assert (optim.lr, optim.vision_tower_lr, optim.weight_decay, optim.warmup_ratio, optim.scheduler) == (
        1e-5, 2e-6, 0.0, 0.03, "cosine")
    assert (s2.epochs, s2.max_steps, s2.data.group_by_modality_length) == (1, None, True)
    ds = s2.deepspeed
    assert (ds.zero_stage, ds.precision, ds.tf32, ds.gradient_checkpointing) == (3, "bf16", True, True)
    # per-device batch 1 x accumulation 2 on 8 x 8 GPUs
    assert (recipe.scaling.num_workers, recipe.scaling.use_gpu, s2.micro_batch_size) == (64, True, 1)
    assert s2.gradient_accumulation_steps(recipe.scaling.num_workers) == 2 and s2.global_batch_size == 128
    assert s1.deepspeed.zero_stage == 3, "145 GB of bf16 weights: stage 1 must shard the frozen LM too"


@pytest.mark.parametrize(("name", "language_model", "template"), [
    ("llava_next_mistral_7b", "mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
    ("llava_next_vicuna_13b", "lmsys/vicuna-13b-v1.5", "vicuna_v1"),
    ("llava_next_34b", "NousResearch/Nous-Hermes-2-Yi-34B", "chatml_direct"),
    ("llama3_llava_next_8b", "meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
    ("llava_next_110b", "Qwen/Qwen1.5-110B-Chat", "qwen_1_5"),
])
def test_llava_next_family_recipes(name, language_model, template):
    recipe = load_recipe(name)
    assert (recipe.model.arch, recipe.model.language_model, recipe.stage2.data.template) == (
        "llava_next", language_model, template)
    assert recipe.stage2.optim.vision_tower_lr == 2e-6 and recipe.stage2.deepspeed.zero_stage == 3
    assert recipe.scaling.gpu_memory_gb == 80 and recipe.stage2.deepspeed.tf32


def test_llava_onevision_7b_is_its_published_recipe():
    """LLaVA-NeXT's OneVision scripts and paper: SigLIP so400m/14-384 + Qwen2-7B-Instruct, anyres_max_9 over the
    1x1..6x6 grids of 384 px, qwen_1_5; stage 1 projector at 1e-3 (batch 512); the single-image and the
    OneVision stages tune everything at 1e-5 with the tower at 2e-6, batch 256, 1 epoch, 32768 tokens."""
    recipe, ov = load_recipe("llava_onevision_qwen2_7b"), load_recipe("llava_onevision_qwen2_7b_ov")
    model = recipe.model
    assert (model.arch, model.vision_tower, model.language_model) == (
        "llava_onevision", "google/siglip-so400m-patch14-384", "Qwen/Qwen2-7B-Instruct")
    assert (model.image_size, model.anyres_max_tiles, len(model.image_grid_pinpoints)) == (384, 9, 36)
    assert model.image_grid_pinpoints[0] == (384, 384) and model.image_grid_pinpoints[-1] == (2304, 2304)
    s1 = recipe.stage1
    assert (s1.tunable, s1.optim.lr, s1.global_batch_size, s1.data.template) == (["projector"], 1e-3, 512, "plain")
    for stage in (recipe.stage2, ov.stage2):
        assert sorted(stage.tunable) == ["language_model", "projector", "vision_tower"]
        assert (stage.optim.lr, stage.optim.vision_tower_lr, stage.global_batch_size, stage.epochs) == (
            1e-5, 2e-6, 256, 1)
        assert (stage.data.template, stage.data.model_max_length, stage.deepspeed.zero_stage) == (
            "qwen_1_5", 32768, 3)
    assert ov.model.pretrained.endswith("llava-onevision-qwen2-7b/train/stage2/export")  # it continues the SI model
    assert ov.stage2.data.video.frames == 32  # frames_upbound 32
    assert recipe.scaling.num_workers == ov.scaling.num_workers == 64
    mid = load_recipe("llava_onevision_qwen2_7b_mid")
    assert mid.model == recipe.model and mid.stage1 == recipe.stage1
    assert mid.stage2.model_dump(exclude={"data"}) == recipe.stage2.model_dump(exclude={"data"})


def test_llava_onevision_7b_dpo_is_dpo_ov7b_sh():
    """LLaVA-NeXT's scripts/train/dpo_ov7b.sh: from the OneVision model, beta 0.1, dpo_alpha 1.0, gamma 0, lr 5e-7,
    warmup 0.1, cosine, 1 epoch, ZeRO-3, tower + projector + LM, bf16, tf32, gradient checkpointing, 32768
    tokens, qwen_1_5, anyres_max_9, per-device batch 1 with 8 accumulation steps."""
    recipe = load_recipe("llava_onevision_qwen2_7b_dpo")
    assert list(recipe.stages()) == ["stage3"]
    assert recipe.model.pretrained == "llava-hf/llava-onevision-qwen2-7b-ov-hf" and recipe.model.anyres_max_tiles == 9
    stage = recipe.stage3
    assert stage.init_from is None  # --model: the composed OneVision checkpoint
    p, o, ds = stage.preference, stage.optim, stage.deepspeed
    assert (p.beta, p.dpo_alpha, p.gamma, p.label_smoothing, p.loss_type) == (0.1, 1.0, 0.0, 0.0, "sigmoid")
    assert (o.lr, o.warmup_ratio, o.scheduler, o.weight_decay, stage.epochs) == (5e-7, 0.1, "cosine", 0.0, 1)
    assert (ds.zero_stage, ds.precision, ds.tf32, ds.gradient_checkpointing) == (3, "bf16", True, True)
    assert sorted(stage.tunable) == ["language_model", "projector", "vision_tower"]
    assert (stage.data.template, stage.data.image_mode, stage.data.model_max_length) == ("qwen_1_5", "anyres", 32768)
    assert stage.micro_batch_size == 1 and stage.gradient_accumulation_steps(recipe.scaling.num_workers) == 8


def test_the_dpo_dry_run_shows_both_references_memory():
    """The plan counts both answers of a pair and names what each way of keeping the reference costs."""
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--recipe", "llava_onevision_qwen2_7b_dpo", "--dry-run"],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert "stage3: ~" in out and "micro-batch 1 pair(s) x 2 answers x 32768 tokens" in out
    reference = next(line for line in out.splitlines() if "reference " in line and "computed once" in line)
    assert "+0.0 GB here" in reference and "A second model beside the policy instead: +" in reference


def test_preference_stage_rules():
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny_dpo_cpu", ["stage2=null", "stage3.data.preprocessed=null",
                                     "stage3.data.packing={max_tokens: 512}", "stage3.data.truncation=truncate"])
    text = str(err.value)
    assert "stage3.init_from: 'stage2' needs a stage2 section" in text
    assert "stage3.data.preprocessed: the reference log-probabilities are computed once" in text
    assert "stage3.data.packing: a preference row holds one pair" in text
    assert "stage3.data.truncation: a truncated answer is another answer" in text
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny_dpo_cpu", ["stage3.preference.beta=0", "stage3.preference.loss_type=kto",
                                     "stage3.loss=token_mean"])
    assert "stage3.loss: Input should be 'pair_mean'" in str(err.value)
    assert "stage3.preference.beta: Input should be greater than 0" in str(err.value)
    assert "stage3.preference.loss_type: Input should be 'sigmoid', 'ipo' or 'hinge'" in str(err.value)
    spec = load_recipe("tiny_dpo_cpu", ["stage3.preference.label_smoothing=0.1"]).stage3.preference.build()
    assert (spec.beta, spec.label_smoothing, spec.loss_type) == (0.1, 0.1, "sigmoid")


@pytest.mark.parametrize(("name", "stage", "sources", "rule"), [
    ("llava_onevision_qwen2_7b_mid", "stage2", 8, "all"),
    ("llava_onevision_qwen2_7b", "stage2", 90, "first:10%"),
    ("llava_onevision_qwen2_7b_ov", "stage2", 82, "end:20%"),
])
def test_the_onevision_stages_read_llava_next_data_yamls_and_dry_run_a_per_source_plan(name, stage, sources, rule):
    """The published data YAMLs (recipes/data/, LLaVA-NeXT's scripts/train/*.yaml with placeholder paths): the
    dry run lists every source with its strategy before anything is read."""
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--recipe", name, "--dry-run"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert f"# {stage} data mixture: {sources} sources" in out
    listed = [line for line in out.splitlines() if line.startswith("#   ") and "data/llava_onevision/" in line]
    assert len(listed) == sources and any(line.split()[1] == rule for line in listed)


def test_onevision_rules():
    with pytest.raises(RecipeError) as err:
        load_recipe("llava15_7b", ["model.anyres_max_tiles=9"])
    assert "model.anyres_max_tiles: only used by arch llava_onevision" in str(err.value)
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny_onevision_cpu", ["model.image_grid_pinpoints=null", "stage2.data.image_mode=pad"])
    text = str(err.value)
    assert "model.image_grid_pinpoints: llava_onevision needs anyres pinpoints" in text
    assert "stage2.data.image_mode: 'pad' does not fit model.arch 'llava_onevision'; allowed: anyres" in text


def test_overrides_are_typed_and_nested():
    recipe = load_recipe(
        "llava15_7b", ["stage2.optim.lr=1e-5", "scaling.num_workers=4", "stage2.data.train_files=[a.json, b.json]"]
    )
    assert recipe.stage2.optim.lr == 1e-5 and isinstance(recipe.stage2.optim.lr, float)
    assert recipe.scaling.num_workers == 4
    assert recipe.stage2.data.train_files == ["a.json", "b.json"]
    assert recipe.stage2.gradient_accumulation_steps(4) == 2


def test_all_problems_reported_at_once_with_dotted_paths():
    with pytest.raises(RecipeError) as err:
        load_recipe(
            "llava15_7b",
            ["stage1.optim.lr=-1", "model.arch=llava2", "stage2.data.imagemode=pad", "stage2.optim.momentum=0.9"],
        )
    problems = err.value.problems
    assert len(problems) == 4
    text = str(err.value)
    assert "model.arch: Input should be 'llava', 'llava_next' or 'llava_onevision'" in text
    assert "stage1.optim.lr: Input should be greater than 0" in text
    assert "stage2.data.imagemode: unknown key; allowed here:" in text and "image_mode" in text
    assert "stage2.optim.momentum: unknown key; allowed here:" in text and "weight_decay" in text


def test_cross_field_rules():
    with pytest.raises(RecipeError) as err:
        load_recipe(
            "llava15_7b",
            [
                "stage1.tunable=[projector, language_model]",
                "stage2.global_batch_size=100",
                "stage2.data.image_mode=anyres",
                "stage2.optim.vision_tower_lr=2e-6",
                "scaling.use_gpu=false",
            ],
        )
    text = str(err.value)
    assert "stage1.tunable: stage 1 aligns the projector only" in text
    assert ("stage2.global_batch_size: 100 is not a whole number of micro-batches of 16 (stage2.micro_batch_size)"
            in text)
    assert "stage2.data.image_mode: 'anyres' does not fit model.arch 'llava'; allowed: square, pad" in text
    assert "stage2.optim.vision_tower_lr: set, but vision_tower is not in stage2.tunable" in text
    assert "stage1.deepspeed.precision: bf16 needs GPUs (scaling.use_gpu: true); use fp32 on CPU" in text


def test_elastic_scaling_rules():
    recipe = load_recipe("llava_next_72b", ["scaling.min_workers=32", "stage1.data.preprocessed=/shards/1",
                                            "stage2.data.preprocessed=/shards/2", "stage1.pad_micro_batches=true",
                                            "stage2.pad_micro_batches=true"])
    assert (recipe.scaling.min_workers, recipe.scaling.num_workers) == (32, 64)
    with pytest.raises(RecipeError) as err:
        load_recipe("llava15_7b", ["scaling.min_workers=9", "scaling.placement_strategy=STRICT_SPREAD"])
    text = str(err.value)
    assert "scaling.min_workers: 9 is above scaling.num_workers 8" in text
    assert "scaling.placement_strategy: STRICT_SPREAD cannot be elastic (scaling.min_workers)" in text


def test_model_source_and_pinpoint_rules():
    with pytest.raises(RecipeError) as err:
        load_recipe("llava_next_vicuna_7b", ["model.pretrained=llava-hf/x", "model.image_grid_pinpoints=[[336, 500]]"])
    text = str(err.value)
    assert "model: set exactly one model source" in text
    assert "model.image_grid_pinpoints.0: (336, 500) is not a multiple of model.image_size 336" in text


def test_bad_override_and_unknown_recipe():
    with pytest.raises(RecipeError, match="overrides look like key.sub=value"):
        load_recipe("llava15_7b", ["stage1"])
    with pytest.raises(RecipeError, match="is a value, not a section"):
        load_recipe("llava15_7b", ["name.x=1"])
    with pytest.raises(RecipeError, match="no shipped recipe of that name; shipped:"):
        load_recipe("llava99")


def test_recipe_from_a_user_file(tmp_path):
    path = tmp_path / "mine.yaml"
    raw = yaml.safe_load((REPO_ROOT / "platform/llava_platform/recipes/llava15_7b.yaml").read_text())
    raw["stage2"]["optim"]["lr"] = 3e-5
    path.write_text(yaml.safe_dump(raw))
    assert load_recipe(str(path)).stage2.optim.lr == 3e-5


def test_dry_run_prints_resolved_recipe(capsys):
    from jobs import compose

    with pytest.raises(SystemExit) as exit_info:  # like --help: status 0, before anything is built
        compose.main(["--recipe", "llava15_7b", "--dry-run", "stage2.optim.lr=1e-5"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["stage2"]["optim"]["lr"] == 1e-5
    assert resolved["stage2"]["deepspeed"]["zero_stage"] == 3


def test_job_reports_recipe_errors_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.compose", "--recipe", "llava15_7b", "--dry-run", "model.arch=llava2"],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "model.arch: Input should be 'llava', 'llava_next' or 'llava_onevision'" in proc.stderr
    assert "Traceback" not in proc.stderr
