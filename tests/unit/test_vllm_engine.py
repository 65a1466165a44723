"""The vLLM engine's settings and pure helpers (no engine started: tests/integration/serve has those)."""

import pytest
import yaml
from pydantic import ValidationError

from llava_platform.config.schema import ServeConfig, VllmConfig
from llava_platform.vllm_engine import CPU_HEAD_SIZES, default_engine_python, onevision_refusal, text_head_size
from serve.app import default_config_path


def test_settings_come_from_the_serve_config_and_unknown_keys_are_named():
    args = yaml.safe_load(default_config_path().read_text())["applications"][0]["args"]
    config = ServeConfig.model_validate(args)
    settings = config.vllm.build(config.dtype)
    assert settings.enforce_eager and settings.num_cpus == VllmConfig().num_cpus
    with pytest.raises(ValidationError, match="kv_cache_gb"):
        VllmConfig.model_validate({"kv_cache_gb": 1})
    with pytest.raises(ValidationError, match="vllm.kv_cache_gb"):
        ServeConfig.model_validate({**args, "vllm": {"kv_cache_gb": 1}})


def test_head_size_is_read_from_head_dim_or_hidden_over_heads():
    assert text_head_size({"text_config": {"hidden_size": 64, "num_attention_heads": 4}}) == 16
    assert text_head_size({"text_config": {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}}) == 32
    assert 16 not in CPU_HEAD_SIZES and 32 in CPU_HEAD_SIZES and 128 in CPU_HEAD_SIZES


def test_only_anyres_max_9_onevision_checkpoints_run_on_vllm():
    """vLLM 0.32 hard-codes anyres_max_9 for OneVision (token count and feature merge): any other N is refused."""
    assert onevision_refusal({"model_type": "llava_onevision", "vision_aspect_ratio": "anyres_max_9"}) is None
    assert onevision_refusal({"model_type": "llava_next", "vision_aspect_ratio": "anyres_max_2"}) is None
    refusal = onevision_refusal({"model_type": "llava_onevision", "vision_aspect_ratio": "anyres_max_2"})
    assert "anyres_max_2" in refusal and "engine: transformers" in refusal


def test_engine_python_is_the_env_variable_else_the_checkouts_venv(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAVA_VLLM_PYTHON", str(tmp_path / "python"))
    assert default_engine_python() == str(tmp_path / "python")
    monkeypatch.delenv("LLAVA_VLLM_PYTHON")
    found = default_engine_python()
    assert found is None or found.endswith(".venv-vllm/bin/python")
